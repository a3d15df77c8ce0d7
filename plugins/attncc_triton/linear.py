"""Generating the chunked linear-attention kernels, and their host launches for ``triton_op``s.

One program per (batch, query head) walks the sequence in chunks of ``CHUNK`` positions, keeping
the running state ``S = Σ φ(k_j) v_jᵀ`` and ``z = Σ φ(k_j)``; with ``CAUSAL`` a chunk adds its own
lower-triangular block, else a first pass sums the whole sequence. The feature maps φ run in
torch before the kernel (they are cheap and elementwise), so the kernel sees φ(q) and φ(k).
``_linear_bwd`` is the same scan for the gradients, forward in query order for dφ(q) and
backward in key order for dφ(k) and dv.

The host functions below (``launch_linear``, ``launch_linear_backward``, ``denominator``,
``features_vjp``) are made of torch ops and kernel launches through ``wrap`` only, so that they
can form the body of a ``torch.library.triton_op`` (``attncc.integrations.triton_linear``).
"""

from __future__ import annotations

import math

import torch


def linear_kernel() -> str:
    """The Triton source of ``_linear`` and ``_linear_bwd``."""
    return _FORWARD + "\n\n" + linear_backward_kernel()


_FORWARD = '''@triton.jit
def _linear(PQ, PK, V, O, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
            heads, kv_heads, seq_q, seq_k, feats, value_dim, ACC: tl.constexpr,
            PREC: tl.constexpr, CAUSAL: tl.constexpr, CHUNK: tl.constexpr,
            BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr):
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
                         mask=k_ok[:, None] & f_ok[None, :], other=0.0).to(ACC)
            v = tl.load(V + b * svb + kvh * svh + offs[:, None] * svn + offs_dv[None, :],
                        mask=k_ok[:, None] & dv_ok[None, :], other=0.0).to(ACC)
            state += tl.dot(tl.trans(pk), v, out_dtype=ACC, input_precision=PREC)
            total += tl.sum(pk, 0)
    end = tl.maximum(seq_q, seq_k) if CAUSAL else seq_q
    for c in range(0, end, CHUNK):
        offs = c + tl.arange(0, CHUNK)
        q_ok = offs < seq_q
        pq = tl.load(PQ + b * sqb + h * sqh + offs[:, None] * sqn + offs_f[None, :],
                     mask=q_ok[:, None] & f_ok[None, :], other=0.0).to(ACC)
        num = tl.dot(pq, state, out_dtype=ACC, input_precision=PREC)
        den = tl.sum(pq * total[None, :], 1)
        if CAUSAL:
            k_ok = offs < seq_k
            pk = tl.load(PK + b * skb + kvh * skh + offs[:, None] * skn + offs_f[None, :],
                         mask=k_ok[:, None] & f_ok[None, :], other=0.0).to(ACC)
            v = tl.load(V + b * svb + kvh * svh + offs[:, None] * svn + offs_dv[None, :],
                        mask=k_ok[:, None] & dv_ok[None, :], other=0.0).to(ACC)
            a = tl.dot(pq, tl.trans(pk), out_dtype=ACC, input_precision=PREC)
            a = tl.where(offs[:, None] >= offs[None, :], a, 0.0)
            num += tl.dot(a, v, out_dtype=ACC, input_precision=PREC)
            den += tl.sum(a, 1)
            state += tl.dot(tl.trans(pk), v, out_dtype=ACC, input_precision=PREC)
            total += tl.sum(pk, 0)
        safe = tl.where(den == 0.0, 1.0, den)
        out = tl.where(den[:, None] == 0.0, 0.0, num / safe[:, None])
        tl.store(O + b * sob + h * soh + offs[:, None] * son + offs_dv[None, :],
                 out.to(O.dtype.element_ty), mask=q_ok[:, None] & dv_ok[None, :])
'''


def linear_backward_kernel() -> str:
    """The Triton source of ``_linear_bwd``: the gradients of ``_linear`` in φ(q), φ(k), v.

    With ``out_i = num_i / den_i``, ``num_i = Σ_j a_ij v_j``, ``den_i = Σ_j a_ij`` and
    ``a_ij = φq_i·φk_j``, the host passes ``DNUM = ∂L/∂num`` and ``DDEN = ∂L/∂den``; then
    ``dA_ij = DNUM_i·v_j + DDEN_i``, ``dφq_i = Σ_j dA_ij φk_j`` (a scan in query order with the
    state ``S``, ``z`` of the forward) and ``dφk_j = Σ_i dA_ij φq_i``, ``dv_j = Σ_i a_ij DNUM_i``
    (a scan in reverse key order with ``R = Σ_i φq_i DNUM_iᵀ`` and ``r = Σ_i DDEN_i φq_i``).
    All tensors are contiguous; dφk and dv are written per query head (the host sums a group).
    """
    return '''@triton.jit
def _linear_bwd(PQ, PK, V, DNUM, DDEN, DPQ, DPK, DV, heads, kv_heads, seq_q, seq_k, feats,
                value_dim, ACC: tl.constexpr, PREC: tl.constexpr, CAUSAL: tl.constexpr,
                CHUNK: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr):
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
                         mask=k_ok[:, None] & f_ok[None, :], other=0.0).to(ACC)
            v = tl.load(V + (row_k + offs[:, None]) * value_dim + offs_dv[None, :],
                        mask=k_ok[:, None] & dv_ok[None, :], other=0.0).to(ACC)
            state += tl.dot(tl.trans(pk), v, out_dtype=ACC, input_precision=PREC)
            total += tl.sum(pk, 0)
    for c in range(0, end, CHUNK):
        offs = c + tl.arange(0, CHUNK)
        q_ok = offs < seq_q
        dnum = tl.load(DNUM + (row_q + offs[:, None]) * value_dim + offs_dv[None, :],
                       mask=q_ok[:, None] & dv_ok[None, :], other=0.0).to(ACC)
        dden = tl.load(DDEN + row_q + offs, mask=q_ok, other=0.0).to(ACC)
        dpq = tl.dot(dnum, tl.trans(state), out_dtype=ACC, input_precision=PREC)
        dpq += dden[:, None] * total[None, :]
        if CAUSAL:
            k_ok = offs < seq_k
            pk = tl.load(PK + (row_k + offs[:, None]) * feats + offs_f[None, :],
                         mask=k_ok[:, None] & f_ok[None, :], other=0.0).to(ACC)
            v = tl.load(V + (row_k + offs[:, None]) * value_dim + offs_dv[None, :],
                        mask=k_ok[:, None] & dv_ok[None, :], other=0.0).to(ACC)
            da = tl.dot(dnum, tl.trans(v), out_dtype=ACC, input_precision=PREC) + dden[:, None]
            da = tl.where(offs[:, None] >= offs[None, :], da, 0.0)
            dpq += tl.dot(da, pk, out_dtype=ACC, input_precision=PREC)
            state += tl.dot(tl.trans(pk), v, out_dtype=ACC, input_precision=PREC)
            total += tl.sum(pk, 0)
        tl.store(DPQ + (row_q + offs[:, None]) * feats + offs_f[None, :],
                 dpq.to(DPQ.dtype.element_ty), mask=q_ok[:, None] & f_ok[None, :])
    rstate = tl.zeros([BLOCK_F, BLOCK_DV], ACC)
    rtotal = tl.zeros([BLOCK_F], ACC)
    if not CAUSAL:
        for c in range(0, seq_q, CHUNK):
            offs = c + tl.arange(0, CHUNK)
            q_ok = offs < seq_q
            pq = tl.load(PQ + (row_q + offs[:, None]) * feats + offs_f[None, :],
                         mask=q_ok[:, None] & f_ok[None, :], other=0.0).to(ACC)
            dnum = tl.load(DNUM + (row_q + offs[:, None]) * value_dim + offs_dv[None, :],
                           mask=q_ok[:, None] & dv_ok[None, :], other=0.0).to(ACC)
            dden = tl.load(DDEN + row_q + offs, mask=q_ok, other=0.0).to(ACC)
            rstate += tl.dot(tl.trans(pq), dnum, out_dtype=ACC, input_precision=PREC)
            rtotal += tl.sum(pq * dden[:, None], 0)
    n_chunks = tl.cdiv(end if CAUSAL else seq_k, CHUNK)
    for t in range(0, n_chunks):
        c = (n_chunks - 1 - t) * CHUNK if CAUSAL else t * CHUNK
        offs = c + tl.arange(0, CHUNK)
        k_ok = offs < seq_k
        pk = tl.load(PK + (row_k + offs[:, None]) * feats + offs_f[None, :],
                     mask=k_ok[:, None] & f_ok[None, :], other=0.0).to(ACC)
        v = tl.load(V + (row_k + offs[:, None]) * value_dim + offs_dv[None, :],
                    mask=k_ok[:, None] & dv_ok[None, :], other=0.0).to(ACC)
        dv = tl.dot(pk, rstate, out_dtype=ACC, input_precision=PREC)
        dpk = tl.dot(v, tl.trans(rstate), out_dtype=ACC, input_precision=PREC)
        dpk += rtotal[None, :]
        if CAUSAL:
            q_ok = offs < seq_q
            pq = tl.load(PQ + (row_q + offs[:, None]) * feats + offs_f[None, :],
                         mask=q_ok[:, None] & f_ok[None, :], other=0.0).to(ACC)
            dnum = tl.load(DNUM + (row_q + offs[:, None]) * value_dim + offs_dv[None, :],
                           mask=q_ok[:, None] & dv_ok[None, :], other=0.0).to(ACC)
            dden = tl.load(DDEN + row_q + offs, mask=q_ok, other=0.0).to(ACC)
            below = offs[:, None] >= offs[None, :]
            a = tl.where(below, tl.dot(pq, tl.trans(pk), out_dtype=ACC, input_precision=PREC),
                         0.0)
            da = tl.dot(dnum, tl.trans(v), out_dtype=ACC, input_precision=PREC) + dden[:, None]
            da = tl.where(below, da, 0.0)
            dv += tl.dot(tl.trans(a), dnum, out_dtype=ACC, input_precision=PREC)
            dpk += tl.dot(tl.trans(da), pq, out_dtype=ACC, input_precision=PREC)
            rstate += tl.dot(tl.trans(pq), dnum, out_dtype=ACC, input_precision=PREC)
            rtotal += tl.sum(pq * dden[:, None], 0)
        tl.store(DPK + (row_o + offs[:, None]) * feats + offs_f[None, :],
                 dpk.to(DPK.dtype.element_ty), mask=k_ok[:, None] & f_ok[None, :])
        tl.store(DV + (row_o + offs[:, None]) * value_dim + offs_dv[None, :],
                 dv.to(DV.dtype.element_ty), mask=k_ok[:, None] & dv_ok[None, :])
'''


def _identity(kernel):
    return kernel


def _acc(dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block(n: int) -> int:
    return max(16, 1 << (max(1, int(n)) - 1).bit_length())


def _constants(module, config: dict, dtype) -> dict:
    return dict(ACC=module._acc(dtype), PREC="ieee", CAUSAL=module.SPEC["causal"],
                CHUNK=config["chunk"], num_warps=config["num_warps"],
                num_stages=config["num_stages"])


def launch_linear(module, config: dict, phi_q, phi_k, v, wrap=None):
    """``out (B, H, Nq, Dv)`` of the generated ``module``'s ``_linear`` on φ(q), φ(k), v; not
    differentiable. Launched through ``wrap`` (``torch.library.wrap_triton`` in a triton_op)."""
    wrap = wrap or _identity
    phi_q, phi_k, v = (x.contiguous() for x in (phi_q, phi_k, v))
    batch, heads, n_q, feats = phi_q.shape
    kv_heads, n_k, value_dim = v.shape[1], v.shape[2], v.shape[3]
    out = v.new_empty((batch, heads, n_q, value_dim))
    wrap(module._KERNELS.linear)[(batch * heads,)](
        phi_q, phi_k, v, out, *phi_q.stride()[:3], *phi_k.stride()[:3], *v.stride()[:3],
        *out.stride()[:3], heads, kv_heads, n_q, n_k, feats, value_dim,
        BLOCK_F=_block(feats), BLOCK_DV=_block(value_dim), **_constants(module, config, v.dtype))
    return out


def launch_linear_backward(module, config: dict, phi_q, phi_k, v, d_num, d_den, wrap=None):
    """``(dφq (B, H, Nq, F), dφk (B, Hkv, Nk, F), dv (B, Hkv, Nk, Dv))`` in the accumulation
    dtype, from ``d_num = ∂L/∂num (B, H, Nq, Dv)`` and ``d_den = ∂L/∂den (B, H, Nq)``."""
    wrap = wrap or _identity
    acc = _acc(v.dtype)
    phi_q, phi_k, v = (x.contiguous() for x in (phi_q, phi_k, v))
    d_num, d_den = d_num.to(acc).contiguous(), d_den.to(acc).contiguous()
    batch, heads, n_q, feats = phi_q.shape
    kv_heads, n_k, value_dim = v.shape[1], v.shape[2], v.shape[3]
    d_pq = torch.empty(phi_q.shape, dtype=acc, device=v.device)
    d_pk = torch.empty((batch, heads, n_k, feats), dtype=acc, device=v.device)
    d_v = torch.empty((batch, heads, n_k, value_dim), dtype=acc, device=v.device)
    wrap(module._linear_bwd)[(batch * heads,)](
        phi_q, phi_k, v, d_num, d_den, d_pq, d_pk, d_v, heads, kv_heads, n_q, n_k, feats,
        value_dim, BLOCK_F=_block(feats), BLOCK_DV=_block(value_dim),
        **_constants(module, config, v.dtype))
    group = heads // kv_heads
    d_pk = d_pk.unflatten(1, (kv_heads, group)).sum(2)
    d_v = d_v.unflatten(1, (kv_heads, group)).sum(2)
    return d_pq, d_pk, d_v


def denominator(phi_q, phi_k, causal: bool):
    """``den_i = Σ_j φq_i·φk_j`` (over ``j <= i`` when ``causal``), ``(B, H, Nq)`` in the
    accumulation dtype: what ``_linear`` divides by."""
    acc = _acc(phi_q.dtype)
    group = phi_q.shape[1] // phi_k.shape[1]
    pk = phi_k.to(acc)
    if causal:
        rows = torch.arange(phi_q.shape[2], device=pk.device).clamp(max=pk.shape[2] - 1)
        sums = pk.cumsum(2).index_select(2, rows)
    else:
        sums = pk.sum(2, keepdim=True)
    return (phi_q.to(acc) * sums.repeat_interleave(group, 1)).sum(-1)


def features_vjp(feature_map: str, x, omega, d_phi):
    """``(dx, d_omega or None)`` of the runtime's feature map φ(x) for the gradient ``d_phi``,
    in the dtype of ``d_phi`` (elu1: elu(x) + 1; relu; performer: exp(xs ωᵀ - |xs|²/2) / √m
    with xs = x d^-1/4)."""
    x = x.to(d_phi.dtype)
    if feature_map == "elu1":
        return d_phi * torch.where(x > 0, torch.ones_like(x), torch.exp(x.clamp(max=0))), None
    if feature_map == "relu":
        return d_phi * (x > 0).to(x.dtype), None
    omega = omega.to(x.dtype)
    c = x.shape[-1] ** -0.25
    xs = x * c
    phi = torch.exp(xs @ omega.transpose(0, 1) - (xs * xs).sum(-1, keepdim=True) / 2.0)
    g = d_phi * phi / math.sqrt(omega.shape[0])
    d_xs = g @ omega - xs * g.sum(-1, keepdim=True)
    d_omega = g.flatten(0, -2).transpose(0, 1) @ xs.flatten(0, -2)
    return d_xs * c, d_omega
