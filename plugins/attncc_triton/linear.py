"""Generating the chunked linear-attention kernels ``_linear`` and ``_linear_bwd``.

One program per (batch, query head) walks the sequence in chunks of ``CHUNK`` positions, keeping
the running state ``S = Σ φ(k_j) v_jᵀ`` and ``z = Σ φ(k_j)``; with ``CAUSAL`` a chunk adds its own
lower-triangular block, else a first pass sums the whole sequence. The feature maps φ run in
torch before the kernel (they are cheap and elementwise), so the kernel sees φ(q) and φ(k).
``_linear_bwd`` is the same scan for the gradients, forward in query order for dφ(q) and
backward in key order for dφ(k) and dv.

Every ``tl.dot`` takes its operands in the input dtype (tensor cores in bf16/fp16): the loaded
tiles as they are, the running float32 values (the state, the chunk's ``a`` or ``dA``) cast to
it right before the dot, which accumulates in ``ACC``; sums and the denominator stay in ``ACC``.
For float32/float64 inputs the casts are no-ops.

The host launches are ``runtime.Program.linear`` and ``linear_backward``.
"""

from __future__ import annotations


def linear_kernel() -> str:
    """The Triton source of ``_linear`` and ``_linear_bwd``."""
    return _FORWARD + "\n\n" + linear_backward_kernel()


_FORWARD = '''@triton.jit
def _linear(
    PQ, PK, V, OUT,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    heads, kv_heads, seq_q, seq_k, feats, value_dim,
    ACC: tl.constexpr, PREC: tl.constexpr, CAUSAL: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """out_i = Σ_j φq_i·φk_j v_j / Σ_j φq_i·φk_j (over j <= i when CAUSAL), for one (b, h)."""
    bh = tl.program_id(0)
    b = bh // heads
    h = bh % heads
    kvh = h // (heads // kv_heads)
    offs_f = tl.arange(0, BLOCK_F)
    offs_dv = tl.arange(0, BLOCK_DV)
    f_ok = offs_f < feats
    dv_ok = offs_dv < value_dim
    state = tl.zeros([BLOCK_F, BLOCK_DV], ACC)
    total = tl.zeros([BLOCK_F], ACC)
    if not CAUSAL:
        for c in range(0, seq_k, CHUNK):
            offs = c + tl.arange(0, CHUNK)
            k_ok = offs < seq_k
            pk = tl.load(PK + b * skb + kvh * skh + offs[:, None] * skn + offs_f[None, :],
                         mask=k_ok[:, None] & f_ok[None, :], other=0.0)
            v = tl.load(V + b * svb + kvh * svh + offs[:, None] * svn + offs_dv[None, :],
                        mask=k_ok[:, None] & dv_ok[None, :], other=0.0)
            state += tl.dot(tl.trans(pk), v, out_dtype=ACC, input_precision=PREC)
            total += tl.sum(pk.to(ACC), 0)
    end = tl.maximum(seq_q, seq_k) if CAUSAL else seq_q
    for c in range(0, end, CHUNK):
        offs = c + tl.arange(0, CHUNK)
        q_ok = offs < seq_q
        pq = tl.load(PQ + b * sqb + h * sqh + offs[:, None] * sqn + offs_f[None, :],
                     mask=q_ok[:, None] & f_ok[None, :], other=0.0)
        num = tl.dot(pq, state.to(pq.dtype), out_dtype=ACC, input_precision=PREC)
        den = tl.sum(pq.to(ACC) * total[None, :], 1)
        if CAUSAL:
            k_ok = offs < seq_k
            pk = tl.load(PK + b * skb + kvh * skh + offs[:, None] * skn + offs_f[None, :],
                         mask=k_ok[:, None] & f_ok[None, :], other=0.0)
            v = tl.load(V + b * svb + kvh * svh + offs[:, None] * svn + offs_dv[None, :],
                        mask=k_ok[:, None] & dv_ok[None, :], other=0.0)
            a = tl.dot(pq, tl.trans(pk), out_dtype=ACC, input_precision=PREC)
            a = tl.where(offs[:, None] >= offs[None, :], a, 0.0)
            num += tl.dot(a.to(v.dtype), v, out_dtype=ACC, input_precision=PREC)
            den += tl.sum(a, 1)
            state += tl.dot(tl.trans(pk), v, out_dtype=ACC, input_precision=PREC)
            total += tl.sum(pk.to(ACC), 0)
        safe = tl.where(den == 0.0, 1.0, den)
        out = tl.where(den[:, None] == 0.0, 0.0, num / safe[:, None])
        tl.store(OUT + b * sob + h * soh + offs[:, None] * son + offs_dv[None, :],
                 out.to(OUT.dtype.element_ty), mask=q_ok[:, None] & dv_ok[None, :])
'''


def linear_backward_kernel() -> str:
    """The Triton source of ``_linear_bwd``: the gradients of ``_linear`` in φ(q), φ(k), v.

    With ``out_i = num_i / den_i``, ``num_i = Σ_j a_ij v_j``, ``den_i = Σ_j a_ij`` and
    ``a_ij = φq_i·φk_j``, the host passes ``DNUM = ∂L/∂num`` (in the dtype of φq, φk, v) and
    ``DDEN = ∂L/∂den`` (in ``ACC``); then
    ``dA_ij = DNUM_i·v_j + DDEN_i``, ``dφq_i = Σ_j dA_ij φk_j`` (a scan in query order with the
    state ``S``, ``z`` of the forward) and ``dφk_j = Σ_i dA_ij φq_i``, ``dv_j = Σ_i a_ij DNUM_i``
    (a scan in reverse key order with ``R = Σ_i φq_i DNUM_iᵀ`` and ``r = Σ_i DDEN_i φq_i``).
    All tensors are contiguous; dφk and dv are written per query head (the host sums a group).
    """
    return '''@triton.jit
def _linear_bwd(
    PQ, PK, V, DNUM, DDEN, DPQ, DPK, DV,
    heads, kv_heads, seq_q, seq_k, feats, value_dim,
    ACC: tl.constexpr, PREC: tl.constexpr, CAUSAL: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dφq (B, H, Nq, F), dφk (B, H, Nk, F) and dv (B, H, Nk, Dv) of ``_linear``, one (b, h)."""
    bh = tl.program_id(0)
    b = bh // heads
    h = bh % heads
    kvh = h // (heads // kv_heads)
    row_q = bh * seq_q
    row_k = (b * kv_heads + kvh) * seq_k
    row_o = bh * seq_k
    offs_f = tl.arange(0, BLOCK_F)
    offs_dv = tl.arange(0, BLOCK_DV)
    f_ok = offs_f < feats
    dv_ok = offs_dv < value_dim
    end = tl.maximum(seq_q, seq_k) if CAUSAL else seq_q
    state = tl.zeros([BLOCK_F, BLOCK_DV], ACC)
    total = tl.zeros([BLOCK_F], ACC)
    if not CAUSAL:
        for c in range(0, seq_k, CHUNK):
            offs = c + tl.arange(0, CHUNK)
            k_ok = offs < seq_k
            pk = tl.load(PK + (row_k + offs[:, None]) * feats + offs_f[None, :],
                         mask=k_ok[:, None] & f_ok[None, :], other=0.0)
            v = tl.load(V + (row_k + offs[:, None]) * value_dim + offs_dv[None, :],
                        mask=k_ok[:, None] & dv_ok[None, :], other=0.0)
            state += tl.dot(tl.trans(pk), v, out_dtype=ACC, input_precision=PREC)
            total += tl.sum(pk.to(ACC), 0)
    for c in range(0, end, CHUNK):
        offs = c + tl.arange(0, CHUNK)
        q_ok = offs < seq_q
        dnum = tl.load(DNUM + (row_q + offs[:, None]) * value_dim + offs_dv[None, :],
                       mask=q_ok[:, None] & dv_ok[None, :], other=0.0)
        dden = tl.load(DDEN + row_q + offs, mask=q_ok, other=0.0)
        dpq = tl.dot(dnum, tl.trans(state.to(dnum.dtype)), out_dtype=ACC, input_precision=PREC)
        dpq += dden[:, None] * total[None, :]
        if CAUSAL:
            k_ok = offs < seq_k
            pk = tl.load(PK + (row_k + offs[:, None]) * feats + offs_f[None, :],
                         mask=k_ok[:, None] & f_ok[None, :], other=0.0)
            v = tl.load(V + (row_k + offs[:, None]) * value_dim + offs_dv[None, :],
                        mask=k_ok[:, None] & dv_ok[None, :], other=0.0)
            da = tl.dot(dnum, tl.trans(v), out_dtype=ACC, input_precision=PREC) + dden[:, None]
            da = tl.where(offs[:, None] >= offs[None, :], da, 0.0)
            dpq += tl.dot(da.to(pk.dtype), pk, out_dtype=ACC, input_precision=PREC)
            state += tl.dot(tl.trans(pk), v, out_dtype=ACC, input_precision=PREC)
            total += tl.sum(pk.to(ACC), 0)
        tl.store(DPQ + (row_q + offs[:, None]) * feats + offs_f[None, :],
                 dpq.to(DPQ.dtype.element_ty), mask=q_ok[:, None] & f_ok[None, :])
    rstate = tl.zeros([BLOCK_F, BLOCK_DV], ACC)
    rtotal = tl.zeros([BLOCK_F], ACC)
    if not CAUSAL:
        for c in range(0, seq_q, CHUNK):
            offs = c + tl.arange(0, CHUNK)
            q_ok = offs < seq_q
            pq = tl.load(PQ + (row_q + offs[:, None]) * feats + offs_f[None, :],
                         mask=q_ok[:, None] & f_ok[None, :], other=0.0)
            dnum = tl.load(DNUM + (row_q + offs[:, None]) * value_dim + offs_dv[None, :],
                           mask=q_ok[:, None] & dv_ok[None, :], other=0.0)
            dden = tl.load(DDEN + row_q + offs, mask=q_ok, other=0.0)
            rstate += tl.dot(tl.trans(pq), dnum, out_dtype=ACC, input_precision=PREC)
            rtotal += tl.sum(pq.to(ACC) * dden[:, None], 0)
    n_chunks = tl.cdiv(end if CAUSAL else seq_k, CHUNK)
    for t in range(0, n_chunks):
        c = (n_chunks - 1 - t) * CHUNK if CAUSAL else t * CHUNK
        offs = c + tl.arange(0, CHUNK)
        k_ok = offs < seq_k
        pk = tl.load(PK + (row_k + offs[:, None]) * feats + offs_f[None, :],
                     mask=k_ok[:, None] & f_ok[None, :], other=0.0)
        v = tl.load(V + (row_k + offs[:, None]) * value_dim + offs_dv[None, :],
                    mask=k_ok[:, None] & dv_ok[None, :], other=0.0)
        rs = rstate.to(pk.dtype)
        dv = tl.dot(pk, rs, out_dtype=ACC, input_precision=PREC)
        dpk = tl.dot(v, tl.trans(rs), out_dtype=ACC, input_precision=PREC)
        dpk += rtotal[None, :]
        if CAUSAL:
            q_ok = offs < seq_q
            pq = tl.load(PQ + (row_q + offs[:, None]) * feats + offs_f[None, :],
                         mask=q_ok[:, None] & f_ok[None, :], other=0.0)
            dnum = tl.load(DNUM + (row_q + offs[:, None]) * value_dim + offs_dv[None, :],
                           mask=q_ok[:, None] & dv_ok[None, :], other=0.0)
            dden = tl.load(DDEN + row_q + offs, mask=q_ok, other=0.0)
            below = offs[:, None] >= offs[None, :]
            a = tl.where(below, tl.dot(pq, tl.trans(pk), out_dtype=ACC, input_precision=PREC),
                         0.0)
            da = tl.dot(dnum, tl.trans(v), out_dtype=ACC, input_precision=PREC) + dden[:, None]
            da = tl.where(below, da, 0.0)
            dv += tl.dot(tl.trans(a.to(dnum.dtype)), dnum, out_dtype=ACC, input_precision=PREC)
            dpk += tl.dot(tl.trans(da.to(pq.dtype)), pq, out_dtype=ACC, input_precision=PREC)
            rstate += tl.dot(tl.trans(pq), dnum, out_dtype=ACC, input_precision=PREC)
            rtotal += tl.sum(pq.to(ACC) * dden[:, None], 0)
        tl.store(DPK + (row_o + offs[:, None]) * feats + offs_f[None, :],
                 dpk.to(DPK.dtype.element_ty), mask=k_ok[:, None] & f_ok[None, :])
        tl.store(DV + (row_o + offs[:, None]) * value_dim + offs_dv[None, :],
                 dv.to(DV.dtype.element_ty), mask=k_ok[:, None] & dv_ok[None, :])
'''
