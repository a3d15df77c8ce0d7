"""Generating the chunked linear-attention kernel.

One program per (batch, query head) walks the sequence in chunks of ``CHUNK`` positions, keeping
the running state ``S = Σ φ(k_j) v_jᵀ`` and ``z = Σ φ(k_j)``; with ``CAUSAL`` a chunk adds its own
lower-triangular block, else a first pass sums the whole sequence. The feature maps φ run in
torch before the kernel (they are cheap and elementwise), so the kernel sees φ(q) and φ(k).
"""

from __future__ import annotations


def linear_kernel() -> str:
    """The Triton source of ``_linear``."""
    return '''@triton.jit
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
