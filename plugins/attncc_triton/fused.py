"""Generating the fused attention kernels (forward, dq, dk/dv) from the FusedAttention node.

Everything spec-specific is decided here, in Python, while the text is written. The module has
one score block, ``_scores`` (the ``tl.dot`` or additive tanh score, the score_mod, and the mask
under the ``MASK`` flag), called by one tile function per pass (``_fwd_tile``, ``_topk_tile``,
``_delta_tile``, ``_dq_tile``, ``_dkdv_tile``); each kernel calls its tile for the FULL blocks
(``MASK=False``), the PARTIAL ones (``MASK=True``) and the memory tokens (``MEMORY=True``: no
score_mod, no mask). Input elements indexed by ``b``, ``h`` and sizes only (``slope[h]``) are
loaded once per (batch, head) and passed in. Every function takes only the names its body
reads (``Fn``), and a kernel launched by keyword gets only those (``runtime``).
"""

from __future__ import annotations

import sympy

from attncc.errors import BackendError
from attncc.spec.symbols import SIZE_NAMES
from attncc.spec.symbols import score as score_symbol

from .printer import TritonPrinter, derivatives, input_atoms, summed
from .text import CONSTS, Fn, indent, paren

_BH = {"b", "h", *SIZE_NAMES}
_DOT = "out_dtype=ACC, input_precision=PREC"
_SIZES = ("scale", *SIZE_NAMES)
_INF = "float('-inf')"
#: the offset of THR's second row, the top-k threshold (its first: the lse residual ``lse_lo``)
_ROWS = "batch * heads * seq_q"
#: the softmax (and top-k) probability of a tile from the row's lse and its rounding residual
#: ``lse_lo``, so that rows whose scores all sit near the dtype's minimum keep their 1/n weights
_P = "tl.exp((s - lse[:, None]) - lse_lo[:, None])"


class FusedGenerator:
    """Writes the score block, the tile functions and the three kernels of one node."""

    def __init__(self, node, float_inputs: set[str], ndims: dict[str, int]):
        """``node``: a FusedAttention; ``float_inputs``: the spec's floating inputs;
        ``ndims``: each input's number of axes."""
        self.node, self.float_inputs = node, float_inputs
        self.mask = node.mask.expr if node.mask is not None else None
        self.additive = node.score == "additive"
        atoms = input_atoms(node.score_mod) + input_atoms(self.mask)
        #: the inputs the score_mod or the mask reads, sorted; the score_mod's floating ones,
        #: whose gradients the dk/dv kernel accumulates
        self.expr_inputs = sorted({str(a.base.label) for a in atoms})
        self.grad_inputs = sorted({str(a.base.label) for a in input_atoms(node.score_mod)}
                                  & float_inputs)
        self.hoisted = {a: _element_name(a, i) for i, a in enumerate(dict.fromkeys(atoms))
                        if _names(a) <= _BH and not summed(a)}
        self.expr = []
        for name in self.expr_inputs:
            self.expr += [f"{name}_ptr", *(f"{name}_s{i}" for i in range(ndims[name])),
                          *(f"{name}_n{i}" for i in range(ndims[name]))]
        self.flags = ((("MEMORY",) if node.memory_tokens else ())
                      + (("MASK",) if self.mask is not None else ()))
        #: why no backward is generated (a derivative Triton cannot print), else None; the
        #: derivatives are taken only by ``functions(backward=True)``
        self.no_backward = None
        self.d_score, self.d_inputs, self.d_summed = None, [], []
        self.scores = self._scores()
        self.kv = self._kv()

    # ---- the score block -----------------------------------------------------------------
    def _scores(self) -> Fn:
        node, body = self.node, []
        if self.additive:
            body += ["t = _tanh(q[:, None, :].to(ACC) + k[None, :, :].to(ACC))",
                     "score = tl.sum(t * w[None, None, :], 2)"]
        else:
            body.append(f"score = tl.dot(q, tl.trans(k), {_DOT}) * scale")
        s = "score"
        mod_atoms = self._locals(node.score_mod)
        if node.score_mod is not None:
            body += self._loads(mod_atoms)
            pr = self._printer(mod_atoms)
            s = (pr.bare(node.score_mod) if score_symbol in node.score_mod.free_symbols
                 else f"score * 0 + {pr(node.score_mod)}")
            body += (["if MEMORY:", "    s = score", "else:", *indent([*pr.take(), f"s = {s}"])]
                     if node.memory_tokens else [*pr.take(), f"s = {s}"])
            if node.score_mod.has(sympy.S.NegativeInfinity):  # a -inf score drops its pair
                body.append('keep = keep & (s > float("-inf"))')
            s = "s"
        if self.mask is not None:
            atoms = {**mod_atoms, **self._locals(self.mask)}
            mask = self._printer(atoms)(self.mask)
            body += ["if MASK:", *indent(self._loads(atoms, skip=mod_atoms)),
                     f"    keep = keep & {paren(mask)}"]
        body.append(f"return score, {s}, keep" + (", t" if self.additive else ""))
        doc = ("The raw score of a tile, after the score_mod (not on memory tokens), and the "
               "kept pairs\n    (``keep`` narrowed by the mask under ``MASK``).")
        return Fn("_scores", doc, [["q", "k", "w", "keep"], ["b", "h", "q_idx", "kv_idx"],
                                   list(self.hoisted.values()), self.expr, list(_SIZES),
                                   ["ACC", "PREC"]], body, self.flags)

    def _kv(self) -> Fn:
        body = ["offs_n = start + tl.arange(0, BLOCK_N)", "col_ok = offs_n < n_keys",
                "offs_d = tl.arange(0, BLOCK_D)", "offs_dv = tl.arange(0, BLOCK_DV)",
                "k = tl.load(k_at + offs_n[:, None] * sk + offs_d[None, :],",
                "            mask=col_ok[:, None] & (offs_d < head_dim)[None, :], other=0.0)",
                "v = tl.load(v_at + offs_n[:, None] * sv + offs_dv[None, :],",
                "            mask=col_ok[:, None] & (offs_dv < value_dim)[None, :], other=0.0)",
                "return offs_n, col_ok, k, v"]
        return Fn("_kv", "The k and v rows ``start .. start + BLOCK_N`` of ``n_keys``.",
                  [["k_at", "v_at", "sk", "sv", "start", "n_keys", "head_dim", "value_dim"],
                   ["BLOCK_N", "BLOCK_D", "BLOCK_DV"]], body)

    def _locals(self, *exprs) -> dict:
        """Local names of the input elements ``exprs`` read that are not hoisted."""
        atoms = dict.fromkeys(a for e in exprs for a in input_atoms(e)
                              if a not in self.hoisted and not summed(a))
        return {a: _element_name(a, i) for i, a in enumerate(atoms)}

    def _printer(self, local: dict) -> TritonPrinter:
        return TritonPrinter(self.float_inputs, {**self.hoisted, **local})

    def _loads(self, local: dict, skip: dict = ()) -> list[str]:
        """One line per input element: ``doc_b_q_idx = tl.load(...)``."""
        plain = TritonPrinter(self.float_inputs)
        return [f"{name} = {plain(atom)}" for atom, name in local.items() if atom not in skip]

    def _score_call(self, **flags) -> list[str]:
        """The score block called in a tile."""
        result = "score, s, keep" + (", t" if self.additive else "")
        return self.scores.call(result, {"keep": "row_ok[:, None] & col_ok[None, :]"}, **flags)

    def _thr(self) -> list[str]:
        return ["keep = keep & (s >= thr[:, None])"] if self.node.normalize == "topk" else []

    def _row_tile(self, name: str, state: str, update: list[str], doc: str,
                  memory: list[str] = (), thr: bool = True, ret: str = "") -> Fn:
        """A tile of one query block against the keys ``start ..``: load, score, ``update``;
        it takes and returns ``state`` (returns ``ret`` where given)."""
        body = self.kv.call("offs_n, col_ok, k, v")
        if "kv_idx" in self.scores.params:
            body.append("kv_idx = offs_n[None, :]")
        body += [*self._score_call(), *(self._thr() if thr else []), *update]
        if memory:
            body += ["if MEMORY:", *("    " + m for m in memory)]
        body.append(f"return {ret or state}")
        groups = [state.split(", "), ["q", "q_idx", "row_ok", "w", "do", "lse", "lse_lo", "delta",
                   "thr"],
                  ["k_at", "v_at", "sk", "sv", "start", "n_keys", "dmk_at", "dmv_at", "b", "h"],
                  list(self.hoisted.values()), self.expr, ["DW", "swh"], list(_SIZES),
                  list(CONSTS)]
        return Fn(name, doc, groups, body, self.flags)

    # ---- the tile functions --------------------------------------------------------------
    def fwd_tile(self) -> Fn:
        if self.node.normalize == "sigmoid":
            update = ["p = tl.where(keep, tl.sigmoid(s), 0.0)",
                      f"acc += tl.dot(p.to(v.dtype), v, {_DOT})"]
            return self._row_tile("_fwd_tile", "acc", update, "The sigmoid-weighted sum of a tile.")
        update = [f"s = tl.where(keep, s, {_INF})", "m_new = tl.maximum(m_i, tl.max(s, 1))",
                  f"m_safe = tl.where(m_new == {_INF}, 0.0, m_new)",
                  "alpha = tl.exp(m_i - m_safe)", "p = tl.exp(s - m_safe[:, None])",
                  "l_i = l_i * alpha + tl.sum(p, 1)",
                  f"acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, {_DOT})"]
        return self._row_tile("_fwd_tile", "acc, m_i, l_i", update,
                              "The online-softmax update of one tile: running max, sum, output.",
                              ret="acc, m_new, l_i")

    def topk_tile(self) -> Fn:
        update = [f"s = tl.where(keep, s, {_INF})",
                  "both = tl.reshape(tl.join(top, s), [BLOCK_M, 2 * BLOCK_N])",
                  "both = tl.sort(both, 1, descending=True)",
                  "both = tl.permute(tl.reshape(both, [BLOCK_M, 2, BLOCK_N]), [0, 2, 1])",
                  "top, _ = tl.split(both)"]
        return self._row_tile("_topk_tile", "top", update,
                              "The BLOCK_N largest kept scores of each row so far.", thr=False)

    def delta_tile(self) -> Fn:
        update = [f"dp = tl.dot(do, tl.trans(v), {_DOT})",
                  f"p = tl.where(keep, {_P}, 0.0)",
                  "corr += tl.sum(p * (dp - delta[:, None]), 1)"]
        return self._row_tile("_delta_tile", "corr", update,
                              "Row sums of P * (dP - D) of one tile, for the exact delta.")

    def _grads(self, memory: bool, local: dict, p: bool = True) -> list[str]:
        """dp, p (where ``p``), ds and the raw-score gradient ``dsr`` (and ``dt`` of the
        additive score); ``local``: the input elements loaded in the tile."""
        node, pr = self.node, self._printer(local)
        lines = [f"dp = tl.dot(do, tl.trans(v), {_DOT})"]
        if node.normalize == "sigmoid":
            lines += ["sg = tl.sigmoid(s)", *(["p = tl.where(keep, sg, 0.0)"] if p else []),
                      "ds = tl.where(keep, dp * sg * (1.0 - sg), 0.0)"]
        else:
            lines += [f"p = tl.where(keep, {_P}, 0.0)",
                      "ds = p * (dp - delta[:, None])"]
        if node.score_mod is None:
            lines.append("dsr = ds")
        else:
            d = paren(pr(self.d_score))
            dsr = [*pr.take(), f"dsr = tl.where(keep, ds * {d}, 0.0)"]
            lines += (["if MEMORY:", "    dsr = ds", "else:", *indent(dsr)]
                      if memory and node.memory_tokens else dsr)
        if self.additive:
            lines.append("dt = dsr[:, :, None] * w[None, None, :] * (1.0 - t * t)")
        return lines

    def _dk_dv(self) -> tuple[str, str]:
        dk = ("tl.sum(dt, 0)" if self.additive
              else f"tl.dot(tl.trans(dsr).to(q.dtype), q, {_DOT}) * scale")
        return dk, f"tl.dot(tl.trans(p).to(do.dtype), do, {_DOT})"

    def _dw(self) -> list[str]:
        return ["dw = tl.sum(tl.sum(dsr[:, :, None] * t, 0), 0)",
                "tl.atomic_add(DW + h * swh + offs_d, dw, mask=offs_d < head_dim)"]

    def dq_tile(self) -> Fn:
        local = self._locals(self.d_score) if self.node.score_mod is not None else {}
        update = [*self._loads(local),
                  *self._grads(memory=True, local=local, p=bool(self.node.memory_tokens))]
        update.append("dq += tl.sum(dt, 1)" if self.additive else
                      f"dq += tl.dot(dsr.to(k.dtype), k, {_DOT}) * scale")
        memory = []
        if self.node.memory_tokens:
            dk, dv = self._dk_dv()
            memory = ["offs_d = tl.arange(0, BLOCK_D)", "offs_dv = tl.arange(0, BLOCK_DV)",
                      "d_ok = (offs_d < head_dim)[None, :]",
                      "dv_ok = (offs_dv < value_dim)[None, :]",
                      f"dk = {dk}", f"dv = {dv}",
                      "tl.atomic_add(dmk_at + offs_n[:, None] * sk + offs_d[None, :], dk,",
                      "              mask=col_ok[:, None] & d_ok)",
                      "tl.atomic_add(dmv_at + offs_n[:, None] * sv + offs_dv[None, :], dv,",
                      "              mask=col_ok[:, None] & dv_ok)",
                      *(self._dw() if self.additive else [])]
        return self._row_tile("_dq_tile", "dq", update,
                              "dq of one tile; the memory tokens' dk, dv (and dw) by atomics.",
                              memory)

    def dkdv_tile(self) -> Fn:
        node = self.node
        body = ["offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)", *self._rows(True),
                *self._score_call(MEMORY=False), *self._thr()]
        local = {}
        if node.score_mod is not None:
            local = self._locals(self.d_score, *(d for _, d in self.d_inputs),
                                 *(d for _, _, d in self.d_summed))
        body += [*self._loads(local), *self._grads(memory=False, local=local)]
        dk, dv = self._dk_dv()
        body += [f"dk += {dk}", f"dv += {dv}", *(self._dw() if self.additive else [])]
        pr = self._printer(local)
        for atom, total, outer in self.d_summed:  # inputs read on a reduction's axis
            d = paren(pr(outer))
            body += [*pr.take(), f"g_sum = tl.where(keep, ds * {d}, 0.0)",
                     *pr.scatter(atom, total, "g_sum")]
        for atom, d_atom in self.d_inputs:
            name, off = str(atom.base.label), self._printer({}).offset(atom)
            d = paren(pr(d_atom))
            body += [*pr.take(), f"g_in = tl.where(keep, ds * {d}, 0.0)"]
            if _names(atom) <= _BH:
                body.append(f"tl.atomic_add({name}_grad + {off}, tl.sum(tl.sum(g_in, 1), 0))")
            else:
                body.append(f"tl.atomic_add({name}_grad + {off} + 0 * (q_idx + kv_idx), g_in, "
                            "mask=keep)")
        body.append("return dk, dv")
        groups = [["dk", "dv", "k", "v", "offs_n", "kv_idx", "col_ok", "m_blk"],
                  ["q_at", "do_at", "sqm", "som", "LSE", "DELTA", "THR", "b", "h", "w"],
                  list(self.hoisted.values()), self.expr,
                  [f"{n}_grad" for n in self.grad_inputs], ["DW", "swh"], list(_SIZES),
                  list(CONSTS)]
        return Fn("_dkdv_tile", "dk, dv of a key block from query block ``m_blk``; the "
                  "score_mod's floating inputs'\n    gradients by atomics.", groups, body,
                  ("MASK",) if self.mask is not None else ())

    # ---- the kernels ---------------------------------------------------------------------
    def _rows(self, backward: bool) -> list[str]:
        """Query rows ``offs_m``: index, bounds, q (and the backward's do, lse, delta, thr)."""
        node = self.node
        lines = ["q_idx = offs_m[:, None]", "row_ok = offs_m < seq_q",
                 "offs_d = tl.arange(0, BLOCK_D)", "offs_dv = tl.arange(0, BLOCK_DV)",
                 "q = tl.load(q_at + q_idx * sqm + offs_d[None, :],",
                 "            mask=row_ok[:, None] & (offs_d < head_dim)[None, :], other=0.0)"]
        if node.normalize != "sigmoid":
            lines.append("stat = (b * heads + h) * seq_q + offs_m")
        if not backward:
            return lines
        lines += ["do = tl.load(do_at + q_idx * som + offs_dv[None, :],",
                  "             mask=row_ok[:, None] & (offs_dv < value_dim)[None, :], "
                  "other=0.0)"]
        if node.normalize != "sigmoid":
            lines += ["lse = tl.load(LSE + stat, mask=row_ok, other=0.0)",
                      f"lse = tl.where(lse == {_INF}, 0.0, lse)",
                      "delta = tl.load(DELTA + stat, mask=row_ok, other=0.0)",
                      "lse_lo = tl.load(THR + stat, mask=row_ok, other=0.0)"]
        if node.normalize == "topk":
            lines.append(f"thr = tl.load(THR + {_ROWS} + stat, mask=row_ok, other=0.0)")
        return lines

    def _per_head(self) -> list[str]:
        """Loads that depend on (b, h) only: the additive w, the hoisted input elements."""
        lines = self._loads(self.hoisted)
        if self.additive:
            lines.append("w = tl.load(W + h * swh + offs_d, mask=offs_d < head_dim, "
                         "other=0.0).to(ACC)")
        return lines

    def _head(self, backward: bool) -> list[str]:
        """Program ids -> b, h, the query block's rows, per-head loads, base pointers, the
        block plan's rows."""
        lines = ["pid = tl.program_id(0)", "bh = tl.program_id(1)", "b = bh // heads",
                 "h = bh % heads", "kvh = h // (heads // kv_heads)",
                 "q_at = Q + b * sqb + h * sqh"]
        if backward:
            lines.append("do_at = DO + b * sob + h * soh")
        lines += ["offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)", *self._rows(backward),
                  *self._per_head(), "k_at = K + b * skb + kvh * skh",
                  "v_at = V + b * svb + kvh * svh"]
        if self.node.memory_tokens:
            lines += ["mk_at = MK + kvh * smkh", "mv_at = MV + kvh * smvh"]
        return [*lines, "row = b * c_b + h * c_h + pid * c_m",
                "irow = b * i_b + h * i_h + pid * i_m"]

    def _loops(self, tile: Fn, result: str, block: str = "n_blk") -> list[str]:
        """Calls of ``tile`` for the memory chunks, then the FULL and PARTIAL blocks."""
        lines = []
        if self.node.memory_tokens and block == "n_blk":  # the dk/dv kernel's keys are no memory
            subs = {"k_at": "mk_at", "v_at": "mv_at", "sk": "smkn", "sv": "smvn",
                    "start": "j", "n_keys": "MEM"}
            lines += ["for j in range(0, MEM, BLOCK_N):",
                      *indent(tile.call(result, subs, MEMORY=True, MASK=False))]
        subs = {"sk": "skn", "sv": "svn", "start": "n_blk * BLOCK_N", "n_keys": "seq_k"}
        for table, partial in (("F", False), ("P", True)):
            lines += [f"for it in range(0, tl.load({table}C + row)):",
                      f"    {block} = tl.load({table}I + irow + it)",
                      *indent(tile.call(result, subs, MEMORY=False, MASK=partial))]
        return lines

    def _kernel(self, name: str, doc: str, body: list[str]) -> Fn:
        groups = [["Q", "K", "V", "MK", "MV", "W", "OUT", "DO", "DQ", "DK", "DV", "DMK", "DMV",
                   "DW", "LSE", "DELTA", "DLSE", "THR"],
                  ["sqb", "sqh", "sqm", "skb", "skh", "skn", "svb", "svh", "svn", "sob", "soh",
                   "som"], ["sdkb", "sdkh", "sdkn", "sdvb", "sdvh", "sdvn"],
                  ["smkh", "smkn", "smvh", "smvn", "swh"],
                  ["FC", "FI", "PC", "PI", "c_b", "c_h", "c_m", "i_b", "i_h", "i_m"],
                  [f"{n}_grad" for n in self.grad_inputs], self.expr, list(_SIZES),
                  list(CONSTS)]
        return Fn(name, doc, groups, body)

    def forward(self) -> Fn:
        node, body = self.node, self._head(backward=False)
        if node.normalize == "topk":
            body += [f"top = tl.full([BLOCK_M, BLOCK_N], {_INF}, ACC)",
                     *self._loops(self.topk_tile(), "top"),
                     "col = tl.arange(0, BLOCK_N)[None, :]",
                     f"thr = tl.max(tl.where(col == TOPK - 1, top, {_INF}), 1)",
                     f"tl.store(THR + {_ROWS} + stat, thr, mask=row_ok)"]
        body += ["o_at = OUT + b * sob + h * soh + q_idx * som + offs_dv[None, :]",
                 "o_ok = row_ok[:, None] & (offs_dv < value_dim)[None, :]"]
        if node.normalize == "sigmoid":
            body += ["acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC)",
                     *self._loops(self.fwd_tile(), "acc"),
                     "tl.store(o_at, acc.to(OUT.dtype.element_ty), mask=o_ok)"]
        else:
            body += [f"m_i = tl.full([BLOCK_M], {_INF}, ACC)", "l_i = tl.zeros([BLOCK_M], ACC)",
                     "acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC)",
                     *self._loops(self.fwd_tile(), "acc, m_i, l_i"),
                     "l_safe = tl.where(l_i == 0.0, 1.0, l_i)",
                     "tl.store(o_at, (acc / l_safe[:, None]).to(OUT.dtype.element_ty), "
                     "mask=o_ok)",
                     f"lse = tl.where(l_i == 0.0, {_INF}, m_i + tl.log(l_safe))",
                     "tl.store(LSE + stat, lse, mask=row_ok)",
                     # THR[0] keeps the rounding residual of lse (see _P)
                     "lse_lo = tl.where(l_i == 0.0, 0.0, (m_i - lse) + tl.log(l_safe))",
                     "tl.store(THR + stat, lse_lo, mask=row_ok)"]
        return self._kernel("_fwd", "One query block of one (batch, head): out, lse (and the "
                            "top-k threshold).", body)

    def backward_dq(self) -> Fn:
        """dq of a query block. First the exact ``D' = D + rowsum(P * (dP - D))`` over the
        row's kept keys, stored as ``D' - dlse`` for the dk/dv kernel (launched after this
        one): ``D = rowsum(dO * O)`` is off by ~1 ulp of O's rounding, and dS carries that
        error times the keys, which matters where scores are ~1e3."""
        node, body = self.node, self._head(backward=True)
        if node.normalize != "sigmoid":
            body += ["corr = tl.zeros([BLOCK_M], ACC)", *self._loops(self.delta_tile(), "corr"),
                     "dlse = tl.load(DLSE + stat, mask=row_ok, other=0.0)",
                     "delta = delta + corr - dlse", "tl.store(DELTA + stat, delta, mask=row_ok)"]
        if node.memory_tokens:
            body += ["dmk_at = DMK + kvh * smkh", "dmv_at = DMV + kvh * smvh"]
        body += ["dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)", *self._loops(self.dq_tile(), "dq"),
                 "tl.store(DQ + b * sqb + h * sqh + q_idx * sqm + offs_d[None, :], "
                 "dq.to(DQ.dtype.element_ty),",
                 "         mask=row_ok[:, None] & (offs_d < head_dim)[None, :])"]
        return self._kernel("_bwd_dq", "dq of one query block (exact delta first); memory-token "
                            "and additive w gradients\n    by atomics.", body)

    def backward_dkdv(self) -> Fn:
        tile = self.dkdv_tile()
        body = ["pid = tl.program_id(0)", "bh = tl.program_id(1)", "b = bh // kv_heads",
                "kvh = bh % kv_heads", "offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)",
                *(["kv_idx = offs_n[None, :]"] if "kv_idx" in tile.params else []),
                "col_ok = offs_n < seq_k", "offs_d = tl.arange(0, BLOCK_D)",
                "offs_dv = tl.arange(0, BLOCK_DV)",
                "d_ok = col_ok[:, None] & (offs_d < head_dim)[None, :]",
                "dv_ok = col_ok[:, None] & (offs_dv < value_dim)[None, :]",
                "k_at = K + b * skb + kvh * skh + offs_n[:, None] * skn + offs_d[None, :]",
                "v_at = V + b * svb + kvh * svh + offs_n[:, None] * svn + offs_dv[None, :]",
                "k = tl.load(k_at, mask=d_ok, other=0.0)",
                "v = tl.load(v_at, mask=dv_ok, other=0.0)",
                "dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)", "dv = tl.zeros([BLOCK_N, BLOCK_DV], ACC)",
                "for g in range(0, heads // kv_heads):",
                *indent(["h = kvh * (heads // kv_heads) + g", "q_at = Q + b * sqb + h * sqh",
                          "do_at = DO + b * sob + h * soh", *self._per_head(),
                          "row = b * c_b + h * c_h + pid * c_m",
                          "irow = b * i_b + h * i_h + pid * i_m",
                          *self._loops(tile, "dk, dv", "m_blk")]),
                "tl.store(DK + b * sdkb + kvh * sdkh + offs_n[:, None] * sdkn + offs_d[None, :],",
                "         dk.to(DK.dtype.element_ty), mask=d_ok)",
                "tl.store(DV + b * sdvb + kvh * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :],",
                "         dv.to(DV.dtype.element_ty), mask=dv_ok)"]
        return self._kernel("_bwd_dkdv", "dk, dv of one key block of one (batch, kv head), summed "
                            "over its query heads.", body)

    def functions(self, backward: bool) -> list[Fn]:
        """Every function of the module, callees first: the forward's, and with ``backward``
        the backward's too, unless a derivative cannot be printed (``no_backward`` says why)."""
        node = self.node
        tiles = [self.topk_tile()] if node.normalize == "topk" else []
        forward = [self.scores, self.kv, *tiles, self.fwd_tile(), self.forward()]
        if not backward:
            return forward
        try:
            if node.score_mod is not None:
                self.d_score, self.d_inputs, self.d_summed = derivatives(
                    node.score_mod, score_symbol, self.float_inputs)
            return [*forward, *([self.delta_tile()] if node.normalize != "sigmoid" else []),
                    self.dq_tile(), self.dkdv_tile(), self.backward_dq(), self.backward_dkdv()]
        except BackendError as err:
            self.no_backward = str(err)
            return forward


def _names(atom: sympy.Indexed) -> set[str]:
    """The symbols an input element's indices read."""
    return {str(s) for s in sympy.Tuple(*atom.indices).free_symbols}


def _element_name(atom: sympy.Indexed, number: int) -> str:
    """``doc_b_q_idx`` for ``doc[b, q_idx]``; ``x_e<number>`` for computed indices."""
    parts = [str(i) for i in atom.indices if i.is_Symbol or i.is_Integer]
    name = str(atom.base.label)
    if len(parts) == len(atom.indices):
        return f"{name}_{'_'.join(parts)}"
    return f"{name}_e{number}"
