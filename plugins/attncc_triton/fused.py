"""Generating the fused attention kernels (forward, dq, dk/dv, block classifier) from the IR.

Everything spec-specific is decided here, in Python, while the text is written: the score
(``tl.dot`` or the additive tanh sum), the score_mod and the mask printed inline, the mask only in
the PARTIAL-block loop, the normalization's update, the top-k threshold pass, the memory-token
loop, and one atomic gradient accumulation per floating input element the score_mod reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from attncc.spec.symbols import SIZE_NAMES
from attncc.spec.symbols import score as score_symbol

from .printer import TritonPrinter, derivatives, input_atoms

_BH = {"b", "h", *SIZE_NAMES}


@dataclass
class FusedSpec:
    """What the generator needs from the FusedAttention node and the spec."""

    score: str
    score_mod: sympy.Expr | None
    mask: sympy.Basic | None
    normalize: str
    topk: int | None
    memory_tokens: int
    float_inputs: set[str] = field(default_factory=set)

    @property
    def expr_inputs(self) -> list[str]:
        """Inputs read by the score_mod or the mask, sorted."""
        atoms = input_atoms(self.score_mod) + input_atoms(self.mask)
        return sorted({str(a.base.label) for a in atoms})

    @property
    def grad_inputs(self) -> list[str]:
        """Floating inputs of the score_mod, whose gradients the dk/dv kernel accumulates."""
        return sorted({str(a.base.label) for a in input_atoms(self.score_mod)
                       if str(a.base.label) in self.float_inputs})


class _Lines:
    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, indent: int, *texts: str):
        for text in texts:
            self.lines.append("    " * indent + text if text else "")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def expr_args(fs: FusedSpec, ndims: dict[str, int]) -> str:
    """The kernel parameters of the expression inputs: pointer, strides, sizes."""
    parts = []
    for name in fs.expr_inputs:
        parts.append(f"{name}_ptr")
        parts += [f"{name}_s{i}" for i in range(ndims[name])]
        parts += [f"{name}_n{i}" for i in range(ndims[name])]
    return "".join(p + ", " for p in parts)


_SIZES = "scale, batch, heads, kv_heads, seq_q, seq_k, head_dim, value_dim"
_CONST = ("ACC: tl.constexpr, PREC: tl.constexpr, MEM: tl.constexpr, TOPK: tl.constexpr, "
          "BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, "
          "BLOCK_DV: tl.constexpr")
_TENSORS = ("Q, K, V, MK, MV, W, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, "
            "smkh, smkn, smvh, smvn, swh")


class FusedGenerator:
    """Writes the four kernels of one FusedAttention node."""

    def __init__(self, fs: FusedSpec, ndims: dict[str, int]):
        self.fs = fs
        self.args = expr_args(fs, ndims)
        self.pr = TritonPrinter(fs.float_inputs)
        if fs.score_mod is not None:
            self.d_score, self.d_inputs = derivatives(fs.score_mod, score_symbol,
                                                      fs.float_inputs)

    # ---- shared pieces -------------------------------------------------------------------
    def prologue(self, out: _Lines, per_query: bool, backward: bool = False):
        """Program ids -> b, h (or kv head), the index vectors, and q (per query block)."""
        out(1, "pid = tl.program_id(0)", "bh = tl.program_id(1)",
            "offs_d = tl.arange(0, BLOCK_D)", "offs_dv = tl.arange(0, BLOCK_DV)",
            "d_ok = offs_d < head_dim", "dv_ok = offs_dv < value_dim")
        if per_query:
            out(1, "b = bh // heads", "h = bh % heads", "kvh = h // (heads // kv_heads)")
            self.load_rows(out, 1, "pid", backward)
        else:
            out(1, "b = bh // kv_heads", "kvh = bh % kv_heads")

    def load_rows(self, out: _Lines, i: int, block: str, backward: bool = False):
        out(i, f"offs_m = {block} * BLOCK_M + tl.arange(0, BLOCK_M)", "q_idx = offs_m[:, None]",
            "row_ok = offs_m < seq_q",
            "q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], "
            "mask=row_ok[:, None] & d_ok[None, :], other=0.0)")
        if self.fs.score == "additive":
            out(i, "w = tl.load(W + h * swh + offs_d, mask=d_ok, other=0.0).to(ACC)")
        if backward:
            out(i, "do = tl.load(DO + b * sob + h * soh + offs_m[:, None] * som + "
                "offs_dv[None, :], mask=row_ok[:, None] & dv_ok[None, :], other=0.0)",
                "stat = (b * heads + h) * seq_q + offs_m",
                )
            if self.fs.normalize != "sigmoid":
                out(i, "lse = tl.load(LSE + stat, mask=row_ok, other=0.0)",
                    "lse = tl.where(lse == float('-inf'), 0.0, lse)",
                    "delta = tl.load(DELTA + stat, mask=row_ok, other=0.0)")
            if self.fs.normalize == "topk":
                out(i, "thr = tl.load(THR + stat, mask=row_ok, other=0.0)")

    def load_cols(self, out: _Lines, i: int, mem: bool):
        """k, v of one key block (``n_blk``) or one memory chunk (``j``), and the scores."""
        if mem:
            out(i, "offs_n = j + tl.arange(0, BLOCK_N)", "col_ok = offs_n < MEM",
                "k = tl.load(MK + kvh * smkh + offs_n[:, None] * smkn + offs_d[None, :], "
                "mask=col_ok[:, None] & d_ok[None, :], other=0.0)",
                "v = tl.load(MV + kvh * smvh + offs_n[:, None] * smvn + offs_dv[None, :], "
                "mask=col_ok[:, None] & dv_ok[None, :], other=0.0)")
        else:
            out(i, "offs_n = n_blk * BLOCK_N + tl.arange(0, BLOCK_N)", "kv_idx = offs_n[None, :]",
                "col_ok = offs_n < seq_k",
                "k = tl.load(K + b * skb + kvh * skh + offs_n[:, None] * skn + offs_d[None, :], "
                "mask=col_ok[:, None] & d_ok[None, :], other=0.0)",
                "v = tl.load(V + b * svb + kvh * svh + offs_n[:, None] * svn + offs_dv[None, :], "
                "mask=col_ok[:, None] & dv_ok[None, :], other=0.0)")
        if self.fs.score == "additive":
            out(i, "t = _tanh(q[:, None, :].to(ACC) + k[None, :, :].to(ACC))",
                "score = tl.sum(t * w[None, None, :], 2)")
        else:
            out(i, "score = tl.dot(q, tl.trans(k), out_dtype=ACC, input_precision=PREC) * scale")
        out(i, "keep = row_ok[:, None] & col_ok[None, :]")
        mod = self.fs.score_mod
        if mod is not None and not mem:
            text = self.pr(mod)
            if score_symbol not in mod.free_symbols:
                text = f"score * 0 + {text}"
            out(i, f"s = {text}")
        else:
            out(i, "s = score")

    def mask_line(self, out: _Lines, i: int):
        if self.fs.mask is not None:
            out(i, f"keep = keep & ({self.pr(self.fs.mask)})")

    def block(self, out: _Lines, i: int, mem: bool, partial: bool, role: str):
        """One key block (or memory chunk) of a kernel: ``role`` is fwd, topk, delta, dq or
        dkdv."""
        self.load_cols(out, i, mem)
        if partial:
            self.mask_line(out, i)
        if role == "topk":
            out(i, "sm = tl.where(keep, s, float('-inf'))",
                "both = tl.reshape(tl.join(top, sm), [BLOCK_M, 2 * BLOCK_N])",
                "both = tl.sort(both, 1, descending=True)",
                "top, _ = tl.split(tl.permute(tl.reshape(both, [BLOCK_M, 2, BLOCK_N]), "
                "[0, 2, 1]))")
            return
        if self.fs.normalize == "topk":
            out(i, "keep = keep & (s >= thr[:, None])")
        if role == "delta":
            out(i, "dp = tl.dot(do, tl.trans(v), out_dtype=ACC, input_precision=PREC)",
                "p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)",
                "corr += tl.sum(p * (dp - delta[:, None]), 1)")
        elif role == "fwd":
            self.forward_update(out, i)
        else:
            self.backward_update(out, i, mem, role)

    def forward_update(self, out: _Lines, i: int):
        if self.fs.normalize == "sigmoid":
            out(i, "p = tl.where(keep, tl.sigmoid(s), 0.0)",
                "acc += tl.dot(p.to(v.dtype), v, out_dtype=ACC, input_precision=PREC)")
            return
        out(i, "s = tl.where(keep, s, float('-inf'))",
            "m_new = tl.maximum(m_i, tl.max(s, 1))",
            "m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)",
            "alpha = tl.exp(m_i - m_safe)", "p = tl.exp(s - m_safe[:, None])",
            "l_i = l_i * alpha + tl.sum(p, 1)",
            "acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, out_dtype=ACC, "
            "input_precision=PREC)",
            "m_i = m_new")

    def backward_update(self, out: _Lines, i: int, mem: bool, role: str):
        fs = self.fs
        out(i, "dp = tl.dot(do, tl.trans(v), out_dtype=ACC, input_precision=PREC)")
        if fs.normalize == "sigmoid":
            out(i, "sg = tl.sigmoid(s)", "p = tl.where(keep, sg, 0.0)",
                "ds = tl.where(keep, dp * sg * (1.0 - sg), 0.0)")
        else:
            out(i, "p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)",
                "ds = p * (dp - delta[:, None])")
        if fs.score_mod is not None and not mem:
            out(i, f"dsr = tl.where(keep, ds * ({self.pr(self.d_score)}), 0.0)")
        else:
            out(i, "dsr = ds")
        additive = fs.score == "additive"
        if additive:
            out(i, "dt = dsr[:, :, None] * w[None, None, :] * (1.0 - t * t)")
        if role == "dq":
            if additive:
                out(i, "dq += tl.sum(dt, 1)")
            else:
                out(i, "dq += tl.dot(dsr.to(k.dtype), k, out_dtype=ACC, "
                    "input_precision=PREC) * scale")
        dk = ("tl.sum(dt, 0)" if additive else "tl.dot(tl.trans(dsr).to(q.dtype), q, "
              "out_dtype=ACC, input_precision=PREC) * scale")
        dv = "tl.dot(tl.trans(p).to(do.dtype), do, out_dtype=ACC, input_precision=PREC)"
        if role == "dkdv":
            out(i, f"dk += {dk}", f"dv += {dv}")
        if mem:
            out(i, "mem_at = kvh * smkh + offs_n[:, None] * smkn + offs_d[None, :]",
                f"tl.atomic_add(DMK + mem_at, {dk}, mask=col_ok[:, None] & d_ok[None, :])",
                "mem_at = kvh * smvh + offs_n[:, None] * smvn + offs_dv[None, :]",
                f"tl.atomic_add(DMV + mem_at, {dv}, mask=col_ok[:, None] & dv_ok[None, :])")
        if additive and (mem or role == "dkdv"):
            out(i, "tl.atomic_add(DW + h * swh + offs_d, "
                "tl.sum(tl.sum(dsr[:, :, None] * t, 0), 0), mask=d_ok)")
        if role == "dkdv" and fs.score_mod is not None:
            self.input_grads(out, i)

    def input_grads(self, out: _Lines, i: int):
        for atom, d_atom in self.d_inputs:
            name = str(atom.base.label)
            off = self.pr.offset(atom)
            # not ``g``: that is the query-head loop variable of the dk/dv kernel
            out(i, f"g_in = tl.where(keep, ds * ({self.pr(d_atom)}), 0.0)")
            names = {str(s) for s in sympy.Tuple(*atom.indices).free_symbols}
            if names <= _BH:
                out(i, f"tl.atomic_add({name}_grad + {off}, tl.sum(tl.sum(g_in, 1), 0))")
            else:
                out(i, f"tl.atomic_add({name}_grad + ({off}) + 0 * (q_idx + kv_idx), g_in, "
                    "mask=keep)")

    def table_loops(self, out: _Lines, i: int, block: str, var: str, body):
        """Iterate the FULL then the PARTIAL blocks of row ``block`` of the block plan."""
        out(i, f"row = b * c_b + h * c_h + {block} * c_m",
            f"irow = b * i_b + h * i_h + {block} * i_m")
        for kind, partial in (("F", False), ("P", True)):
            out(i, f"for it in range(0, tl.load({kind}C + row)):",
                f"    {var} = tl.load({kind}I + irow + it)")
            body(out, i + 1, partial)

    # ---- the kernels ---------------------------------------------------------------------
    def forward(self) -> str:
        fs, out = self.fs, _Lines()
        out(0, "@triton.jit",
            f"def _fwd({_TENSORS}, O, LSE, THR, sob, soh, som, FC, FI, PC, PI, c_b, c_h, c_m, "
            f"i_b, i_h, i_m, {self.args}{_SIZES}, {_CONST}):",
            '    """One query block of one (batch, head): out, lse (and the top-k threshold)."""')
        self.prologue(out, per_query=True)
        passes = ["topk", "fwd"] if fs.normalize == "topk" else ["fwd"]
        for role in passes:
            if role == "topk":
                out(1, "top = tl.full([BLOCK_M, BLOCK_N], float('-inf'), ACC)")
            elif fs.normalize == "sigmoid":
                out(1, "acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC)")
            else:
                out(1, "m_i = tl.full([BLOCK_M], float('-inf'), ACC)",
                    "l_i = tl.zeros([BLOCK_M], ACC)", "acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC)")
            if fs.memory_tokens:
                out(1, "for j in range(0, MEM, BLOCK_N):")
                self.block(out, 2, mem=True, partial=False, role=role)
            self.table_loops(out, 1, "pid", "n_blk",
                             lambda o, i, partial, r=role: self.block(o, i, False, partial, r))
            if role == "topk":
                out(1, "col = tl.arange(0, BLOCK_N)[None, :]",
                    "thr = tl.max(tl.where(col == TOPK - 1, top, float('-inf')), 1)",
                    "tl.store(THR + (b * heads + h) * seq_q + offs_m, thr, mask=row_ok)")
        out(1, "o_at = O + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :]")
        if fs.normalize == "sigmoid":
            out(1, "tl.store(o_at, acc.to(O.dtype.element_ty), "
                "mask=row_ok[:, None] & dv_ok[None, :])")
        else:
            out(1, "l_safe = tl.where(l_i == 0.0, 1.0, l_i)",
                "tl.store(o_at, (acc / l_safe[:, None]).to(O.dtype.element_ty), "
                "mask=row_ok[:, None] & dv_ok[None, :])",
                "lse = tl.where(l_i == 0.0, float('-inf'), m_i + tl.log(l_safe))",
                "tl.store(LSE + (b * heads + h) * seq_q + offs_m, lse, mask=row_ok)")
        return out.text()

    def backward_dq(self) -> str:
        fs, out = self.fs, _Lines()
        out(0, "@triton.jit",
            f"def _bwd_dq({_TENSORS}, DO, DQ, DMK, DMV, DW, LSE, DELTA, DLSE, THR, sob, soh, som, "
            f"FC, FI, PC, PI, c_b, c_h, c_m, i_b, i_h, i_m, {self.args}{_SIZES}, {_CONST}):",
            '    """dq of one query block; memory-token and (additive) w gradients by atomics."""')
        self.prologue(out, per_query=True, backward=True)
        if fs.normalize != "sigmoid":
            self.exact_delta(out)
        out(1, "dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)")
        if fs.memory_tokens:
            out(1, "for j in range(0, MEM, BLOCK_N):")
            self.block(out, 2, mem=True, partial=False, role="dq")
        self.table_loops(out, 1, "pid", "n_blk",
                         lambda o, i, partial: self.block(o, i, False, partial, "dq"))
        out(1, "tl.store(DQ + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], "
            "dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])")
        return out.text()

    def exact_delta(self, out: _Lines):
        """``D' = D + rowsum(P ∘ (dP − D))`` over every kept key of the query block, then
        ``D' − dlse`` stored back to DELTA for the dk/dv kernel (launched after this one).

        ``D = rowsum(dO ∘ O)`` is off by ~1 ulp of O's rounding, and dS carries that error
        times the keys (|k| ~ 1e2 where scores are ~1e3): recomputing the row sum from the
        tiles makes every row of dS sum to 0 as autograd through a softmax does, at the cost of
        one more pass over the row's blocks."""
        out(1, "corr = tl.zeros([BLOCK_M], ACC)")
        if self.fs.memory_tokens:
            out(1, "for j in range(0, MEM, BLOCK_N):")
            self.block(out, 2, mem=True, partial=False, role="delta")
        self.table_loops(out, 1, "pid", "n_blk",
                         lambda o, i, partial: self.block(o, i, False, partial, "delta"))
        out(1, "dlse = tl.load(DLSE + stat, mask=row_ok, other=0.0)",
            "delta = delta + corr - dlse",
            "tl.store(DELTA + stat, delta, mask=row_ok)")

    def backward_dkdv(self) -> str:
        out = _Lines()
        grads = "".join(f"{n}_grad, " for n in self.fs.grad_inputs)
        out(0, "@triton.jit",
            f"def _bwd_dkdv({_TENSORS}, DO, DK, DV, DW, LSE, DELTA, THR, sob, soh, som, "
            f"FC, FI, PC, PI, c_b, c_h, c_m, i_b, i_h, i_m, {grads}{self.args}{_SIZES}, "
            f"{_CONST}):",
            '    """dk, dv of one key block of one (batch, kv head), summed over its query heads;',
            '    the gradients of the score_mod\'s floating inputs by atomics."""')
        self.prologue(out, per_query=False)
        out(1, "n_blk = pid", "dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)",
            "dv = tl.zeros([BLOCK_N, BLOCK_DV], ACC)",
            "for g in range(0, heads // kv_heads):",
            "    h = kvh * (heads // kv_heads) + g")

        def body(o, i, partial):
            self.load_rows(o, i, "m_blk", backward=True)
            self.block(o, i, False, partial, "dkdv")
        self.table_loops(out, 2, "n_blk", "m_blk", body)
        out(1, "offs_n = n_blk * BLOCK_N + tl.arange(0, BLOCK_N)", "col_ok = offs_n < seq_k",
            "tl.store(DK + b * skb + kvh * skh + offs_n[:, None] * skn + offs_d[None, :], "
            "dk.to(DK.dtype.element_ty), mask=col_ok[:, None] & d_ok[None, :])",
            "tl.store(DV + b * svb + kvh * svh + offs_n[:, None] * svn + offs_dv[None, :], "
            "dv.to(DV.dtype.element_ty), mask=col_ok[:, None] & dv_ok[None, :])")
        return out.text()

    def classify(self) -> str:
        """The block classifier the standalone module uses to build its own plan tables."""
        out = _Lines()
        mask = self.pr(self.fs.mask) if self.fs.mask is not None else "True"
        out(0, "@triton.jit",
            f"def _classify(STATES, {self.args}batch, heads, kv_heads, seq_q, seq_k, head_dim, "
            "value_dim, n_q, n_k, plan_h, ACC: tl.constexpr, BLOCK_M: tl.constexpr, "
            "BLOCK_N: tl.constexpr):",
            '    """State of one (query block, key block) pair: 0 EMPTY, 1 PARTIAL, 2 FULL."""',
            "    pid = tl.program_id(0)", "    bh = tl.program_id(1)",
            "    b = bh // plan_h", "    h = bh % plan_h", "    m_blk = pid // n_k",
            "    n_blk = pid % n_k",
            "    offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)",
            "    offs_n = n_blk * BLOCK_N + tl.arange(0, BLOCK_N)",
            "    q_idx = offs_m[:, None]", "    kv_idx = offs_n[None, :]",
            "    inside = (q_idx < seq_q) & (kv_idx < seq_k)",
            f"    keep = inside & ({mask})",
            "    kept = tl.sum(keep.to(tl.int32), 1)", "    kept = tl.sum(kept, 0)",
            "    total = tl.sum(tl.sum(inside.to(tl.int32), 1), 0)",
            "    state = tl.where(kept == 0, 0, tl.where(kept == total, 2, 1))",
            "    tl.store(STATES + bh * n_q * n_k + pid, state.to(tl.int8))")
        return out.text()
