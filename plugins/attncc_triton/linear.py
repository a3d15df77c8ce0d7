"""Generating the chunked linear-attention kernels ``_linear`` and ``_linear_bwd``.

One program per (batch, query head) walks the sequence in chunks of ``CHUNK`` positions, keeping
the running state ``S = Σ φ(k_j) v_jᵀ`` and ``z = Σ φ(k_j)``; with ``CAUSAL`` a chunk adds its own
lower-triangular block, else a first pass sums the whole sequence. The feature maps φ run in
torch before the kernel (they are cheap and elementwise), so the kernel sees φ(q) and φ(k).

``_linear_bwd`` gives the gradients of ``_linear`` in φ(q), φ(k), v. With ``out_i = num_i /
den_i``, ``num_i = Σ_j a_ij v_j``, ``den_i = Σ_j a_ij`` and ``a_ij = φq_i·φk_j``, the host passes
``DNUM = ∂L/∂num`` (in the dtype of φq, φk, v) and ``DDEN = ∂L/∂den`` (in ``ACC``); then
``dA_ij = DNUM_i·v_j + DDEN_i``, ``dφq_i = Σ_j dA_ij φk_j`` (a scan in query order with the
state ``S``, ``z`` of the forward) and ``dφk_j = Σ_i dA_ij φq_i``, ``dv_j = Σ_i a_ij DNUM_i``
(a scan in reverse key order with ``R = Σ_i φq_i DNUM_iᵀ`` and ``r = Σ_i DDEN_i φq_i``).
All tensors are contiguous; dφk and dv are written per query head (the host sums a group).

Every ``tl.dot`` takes its operands in the input dtype (tensor cores in bf16/fp16): the loaded
tiles as they are, the running float32 values (the state, the chunk's ``a`` or ``dA``) cast to
it right before the dot, which accumulates in ``ACC``; sums and the denominator stay in ``ACC``.
For float32/float64 inputs the casts are no-ops.

The host launches are ``runtime.Program.linear`` and ``linear_backward``.
"""

from __future__ import annotations


def linear_kernel() -> str:
    """The Triton source of ``_linear`` and ``_linear_bwd`` (every tensor contiguous)."""
    return _ROWS + "\n\n" + _FORWARD + "\n\n" + _BACKWARD


_ROWS = '''@triton.jit
def _rows(X, row, offs, n, width, offs_w, w_ok):
    """Rows ``row + offs`` (those below ``n``), columns ``offs_w`` of a contiguous tensor."""
    return tl.load(X + (row + offs[:, None]) * width + offs_w[None, :],
                   mask=(offs < n)[:, None] & w_ok[None, :], other=0.0)


@triton.jit
def _store_rows(X, row, offs, n, width, offs_w, w_ok, x):
    """``x`` stored where ``_rows`` with the same arguments loads."""
    tl.store(X + (row + offs[:, None]) * width + offs_w[None, :], x.to(X.dtype.element_ty),
             mask=(offs < n)[:, None] & w_ok[None, :])
'''

#: the kernels' sizes and constexprs, and their first lines: the program's (b, h) rows, the
#: chunk's columns and, without CAUSAL, the state ``S``, ``z`` summed over every key
_HEAD = '''    heads, kv_heads, seq_q, seq_k, feats, value_dim,
    ACC: tl.constexpr, PREC: tl.constexpr, CAUSAL: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """{doc}"""
    bh = tl.program_id(0)
    kvh = (bh % heads) // (heads // kv_heads)
    row_q = bh * seq_q
    row_k = (bh // heads * kv_heads + kvh) * seq_k
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
            pk = _rows(PK, row_k, offs, seq_k, feats, offs_f, f_ok)
            v = _rows(V, row_k, offs, seq_k, value_dim, offs_dv, dv_ok)
            state += tl.dot(tl.trans(pk), v, out_dtype=ACC, input_precision=PREC)
            total += tl.sum(pk.to(ACC), 0)'''

_FORWARD = '''@triton.jit
def _linear(
    PQ, PK, V, OUT,
''' + _HEAD.format(doc="out_i = Σ_j φq_i·φk_j v_j / Σ_j φq_i·φk_j (over j <= i when CAUSAL), "
                       "for one (b, h).") + '''
    for c in range(0, end, CHUNK):
        offs = c + tl.arange(0, CHUNK)
        pq = _rows(PQ, row_q, offs, seq_q, feats, offs_f, f_ok)
        num = tl.dot(pq, state.to(pq.dtype), out_dtype=ACC, input_precision=PREC)
        den = tl.sum(pq.to(ACC) * total[None, :], 1)
        if CAUSAL:
            pk = _rows(PK, row_k, offs, seq_k, feats, offs_f, f_ok)
            v = _rows(V, row_k, offs, seq_k, value_dim, offs_dv, dv_ok)
            a = tl.dot(pq, tl.trans(pk), out_dtype=ACC, input_precision=PREC)
            a = tl.where(offs[:, None] >= offs[None, :], a, 0.0)
            num += tl.dot(a.to(v.dtype), v, out_dtype=ACC, input_precision=PREC)
            den += tl.sum(a, 1)
            state += tl.dot(tl.trans(pk), v, out_dtype=ACC, input_precision=PREC)
            total += tl.sum(pk.to(ACC), 0)
        safe = tl.where(den == 0.0, 1.0, den)
        out = tl.where(den[:, None] == 0.0, 0.0, num / safe[:, None])
        _store_rows(OUT, row_q, offs, seq_q, value_dim, offs_dv, dv_ok, out)
'''

_BACKWARD = '''@triton.jit
def _linear_bwd(
    PQ, PK, V, DNUM, DDEN, DPQ, DPK, DV,
''' + _HEAD.format(doc="dφq (B, H, Nq, F), dφk (B, H, Nk, F) and dv (B, H, Nk, Dv) of "
                       "``_linear``, one (b, h).") + '''
    for c in range(0, end, CHUNK):
        offs = c + tl.arange(0, CHUNK)
        dnum = _rows(DNUM, row_q, offs, seq_q, value_dim, offs_dv, dv_ok)
        dden = tl.load(DDEN + row_q + offs, mask=offs < seq_q, other=0.0)
        dpq = tl.dot(dnum, tl.trans(state.to(dnum.dtype)), out_dtype=ACC, input_precision=PREC)
        dpq += dden[:, None] * total[None, :]
        if CAUSAL:
            pk = _rows(PK, row_k, offs, seq_k, feats, offs_f, f_ok)
            v = _rows(V, row_k, offs, seq_k, value_dim, offs_dv, dv_ok)
            da = tl.dot(dnum, tl.trans(v), out_dtype=ACC, input_precision=PREC) + dden[:, None]
            da = tl.where(offs[:, None] >= offs[None, :], da, 0.0)
            dpq += tl.dot(da.to(pk.dtype), pk, out_dtype=ACC, input_precision=PREC)
            state += tl.dot(tl.trans(pk), v, out_dtype=ACC, input_precision=PREC)
            total += tl.sum(pk.to(ACC), 0)
        _store_rows(DPQ, row_q, offs, seq_q, feats, offs_f, f_ok, dpq)
    row_o = bh * seq_k
    rstate = tl.zeros([BLOCK_F, BLOCK_DV], ACC)
    rtotal = tl.zeros([BLOCK_F], ACC)
    if not CAUSAL:
        for c in range(0, seq_q, CHUNK):
            offs = c + tl.arange(0, CHUNK)
            pq = _rows(PQ, row_q, offs, seq_q, feats, offs_f, f_ok)
            dnum = _rows(DNUM, row_q, offs, seq_q, value_dim, offs_dv, dv_ok)
            dden = tl.load(DDEN + row_q + offs, mask=offs < seq_q, other=0.0)
            rstate += tl.dot(tl.trans(pq), dnum, out_dtype=ACC, input_precision=PREC)
            rtotal += tl.sum(pq.to(ACC) * dden[:, None], 0)
    n_chunks = tl.cdiv(end if CAUSAL else seq_k, CHUNK)
    for t in range(0, n_chunks):
        c = (n_chunks - 1 - t) * CHUNK if CAUSAL else t * CHUNK
        offs = c + tl.arange(0, CHUNK)
        pk = _rows(PK, row_k, offs, seq_k, feats, offs_f, f_ok)
        v = _rows(V, row_k, offs, seq_k, value_dim, offs_dv, dv_ok)
        rs = rstate.to(pk.dtype)
        dv = tl.dot(pk, rs, out_dtype=ACC, input_precision=PREC)
        dpk = tl.dot(v, tl.trans(rs), out_dtype=ACC, input_precision=PREC)
        dpk += rtotal[None, :]
        if CAUSAL:
            pq = _rows(PQ, row_q, offs, seq_q, feats, offs_f, f_ok)
            dnum = _rows(DNUM, row_q, offs, seq_q, value_dim, offs_dv, dv_ok)
            dden = tl.load(DDEN + row_q + offs, mask=offs < seq_q, other=0.0)
            below = offs[:, None] >= offs[None, :]
            a = tl.where(below, tl.dot(pq, tl.trans(pk), out_dtype=ACC, input_precision=PREC),
                         0.0)
            da = tl.dot(dnum, tl.trans(v), out_dtype=ACC, input_precision=PREC) + dden[:, None]
            da = tl.where(below, da, 0.0)
            dv += tl.dot(tl.trans(a.to(dnum.dtype)), dnum, out_dtype=ACC, input_precision=PREC)
            dpk += tl.dot(tl.trans(da.to(pq.dtype)), pq, out_dtype=ACC, input_precision=PREC)
            rstate += tl.dot(tl.trans(pq), dnum, out_dtype=ACC, input_precision=PREC)
            rtotal += tl.sum(pq.to(ACC) * dden[:, None], 0)
        _store_rows(DPK, row_o, offs, seq_k, feats, offs_f, f_ok, dpk)
        _store_rows(DV, row_o, offs, seq_k, value_dim, offs_dv, dv_ok, dv)
'''
