"""Host side of the generated Triton modules: launches, autograd, the standalone entry point.

A generated module imports this file as a sibling module (``attncc compile --backend triton -o
DIR`` writes both, this one through ``Kernel.companions``; in process attncc registers this very
module under the name the generated one imports), so it needs only torch and triton and imports
nothing from attncc. The module builds one ``Program(SPEC, CONFIG, kernels)``; attncc's Triton
plugin calls its launches (``forward``, ``backward``, ``linear``, ``linear_backward``, each
through an optional ``wrap``, which ``torch.library.triton_op`` bodies set to ``wrap_triton``)
with the block plan's tables from ``attncc.plan``. ``attention`` is the standalone entry point.

Kernels are launched by keyword with the names their signature has: a generated kernel takes only
the arguments its body reads. Plan tables are a dict of int32 tensors: per query block ``fc``,
``pc`` (FULL, PARTIAL counts ``(Bp, Hp, nQ)``) and ``fi``, ``pi`` (their key blocks ``(Bp, Hp,
nQ, width)``), and the transposed ``fct``, ``pct``, ``fit``, ``pit`` per key block.
"""

import math
import os

import torch
import triton
import triton.language as tl

TABLES = ("fc", "fi", "pc", "pi", "fct", "fit", "pct", "pit")
SIZES = ("batch", "heads", "kv_heads", "seq_q", "seq_k", "head_dim", "value_dim")
FULL, PARTIAL = 2, 1


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pow2(n: int) -> int:
    """The block size covering ``n`` (a power of two, at least 16)."""
    return max(16, triton.next_power_of_2(int(n)))


def acc_dtype(dtype) -> torch.dtype:
    """The accumulation dtype of tensors of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sizes_of(q, k, v) -> dict:
    """The size names of a call on q (B, H, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv)."""
    return dict(zip(SIZES, (*q.shape[:2], k.shape[1], q.shape[2], k.shape[2], q.shape[3],
                            v.shape[3]), strict=True))


def _launch(fn, grid, wrap, values: dict, config: dict):
    """``fn[grid]`` with the arguments its signature names, taken from ``values``."""
    (wrap(fn) if wrap is not None else fn)[grid](
        **{name: values[name] for name in fn.arg_names},
        num_warps=config["num_warps"], num_stages=config["num_stages"])


def _table_values(tables: dict, transposed: bool) -> dict:
    """FC, FI, PC, PI and their row strides (0 along a plan axis of size 1)."""
    t = "t" if transposed else ""
    fc, fi, pc, pi = (tables[n + t] for n in ("fc", "fi", "pc", "pi"))
    width = max(fi.shape[-1], pi.shape[-1])
    fi, pi = (torch.nn.functional.pad(x, (0, width - x.shape[-1])).contiguous()
              if x.shape[-1] < width else x for x in (fi, pi))
    c = [s if n > 1 else 0 for s, n in zip(fc.stride(), fc.shape, strict=True)]
    i = [s if n > 1 else 0 for s, n in zip(fi.stride()[:3], fi.shape[:3], strict=True)]
    return dict(FC=fc, FI=fi, PC=pc, PI=pi, c_b=c[0], c_h=c[1], c_m=c[2], i_b=i[0], i_h=i[1],
                i_m=i[2])


class Program:
    """The host code of one generated module: ``spec`` (its SPEC), ``config`` (its CONFIG),
    ``kernels`` (name -> jit function: fwd, bwd_dq, bwd_dkdv, or linear, linear_bwd) and
    ``scale_of(**sizes)``, the spec's score scale."""

    def __init__(self, spec: dict, config: dict, kernels: dict, scale_of):
        self.spec, self.config, self.kernels = spec, dict(config), kernels
        self.scale_of = scale_of
        self._dense: dict = {}

    def backward_kernels(self) -> dict:
        """The backward kernels (``bwd_dq``, ``bwd_dkdv``) of a module generated without them:
        attncc's Triton kernel sets this to its generator of them (on the first backward call);
        a standalone module raises NotImplementedError, SPEC["no_backward"] saying why."""
        raise NotImplementedError(f"no Triton backward in this module: "
                                  f"{self.spec.get('no_backward')}")

    def scale(self, q, k, v) -> float:
        """The spec's score scale for this call (sizes before any projection)."""
        return float(self.scale_of(**sizes_of(q, k, v)))

    def dense_tables(self, seq_q: int, seq_k: int, state: int, device) -> dict:
        """Tables of a plan whose blocks all have ``state`` (FULL or PARTIAL), one row."""
        n_q = triton.cdiv(seq_q, self.config["block_m"])
        n_k = triton.cdiv(seq_k, self.config["block_n"])
        key = (n_q, n_k, state, str(device))
        if key not in self._dense:
            made = {}
            for t, n, m in (("", n_q, n_k), ("t", n_k, n_q)):
                count = torch.full((1, 1, n), m, dtype=torch.int32, device=device)
                none = torch.zeros_like(count)
                made["fc" + t], made["pc" + t] = (count, none) if state == FULL else (none, count)
                made["fi" + t] = made["pi" + t] = torch.arange(
                    m, dtype=torch.int32, device=device).expand(1, 1, n, m).contiguous()
            self._dense[key] = made
        return self._dense[key]

    def _values(self, q, k, v, inputs: dict, scale: float) -> dict:
        """Every argument a fused kernel may name, but for the output- and pass-specific ones."""
        spec, config = self.spec, self.config
        dummy = q.new_zeros(1)
        mk, mv, w = (inputs.get(n, dummy) for n in ("mem_k", "mem_v", "w"))
        values = dict(Q=q, K=k, V=v, MK=mk, MV=mv, W=w, scale=scale, **sizes_of(q, k, v),
                      ACC=tl.float64 if q.dtype == torch.float64 else tl.float32, PREC="ieee",
                      MEM=spec["memory_tokens"], TOPK=spec["topk"] or 1,
                      BLOCK_M=config["block_m"], BLOCK_N=config["block_n"],
                      BLOCK_D=pow2(q.shape[3]), BLOCK_DV=pow2(v.shape[3]))
        values.update(**_strides("sq", q), **_strides("sk", k, "n"), **_strides("sv", v, "n"))
        mem = mk.dim() == 3
        values.update(smkh=mk.stride(0) if mem else 0, smkn=mk.stride(1) if mem else 0,
                      smvh=mv.stride(0) if mem else 0, smvn=mv.stride(1) if mem else 0,
                      swh=w.stride(0) if w.dim() == 2 else 0)
        for name in spec["expr_inputs"]:
            x = inputs[name]
            values[f"{name}_ptr"] = x
            values.update({f"{name}_s{i}": s for i, s in enumerate(x.stride())})
            values.update({f"{name}_n{i}": n for i, n in enumerate(x.shape)})
        return values

    def _grids(self, q, k):
        return ((triton.cdiv(q.shape[2], self.config["block_m"]), q.shape[0] * q.shape[1]),
                (triton.cdiv(k.shape[2], self.config["block_n"]), k.shape[0] * k.shape[1]))

    def forward(self, q, k, v, inputs: dict, tables: dict, scale: float, wrap=None):
        """``(out, lse, thr)`` of the fused forward kernel, not differentiable: torch ops and
        one launch through ``wrap``; ``thr`` ``(2, B, H, Nq)`` holds lse's rounding residual
        (softmax, top-k) and the top-k threshold, which the backward reads. ``inputs``: the
        spec's inputs by name. k, v shared by the batch (batch stride 0,
        ``attncc.bind.shared_kv``) are read in place, not copied."""
        q = q.contiguous()
        k, v = (x if x[0].is_contiguous() else x.contiguous() for x in (k, v))
        inputs = prepared(q, inputs)
        acc = acc_dtype(q.dtype)
        out = q.new_empty((*q.shape[:3], v.shape[3]))
        lse = torch.full(q.shape[:3], -math.inf, dtype=acc, device=q.device)
        thr = lse.new_zeros((2, *lse.shape))
        values = self._values(q, k, v, inputs, scale)
        values.update(OUT=out, LSE=lse, THR=thr, **_strides("so", out),
                      **_table_values(tables, False))
        _launch(self.kernels["fwd"], self._grids(q, k)[0], wrap, values, self.config)
        return out, lse, thr

    def backward(self, q, k, v, inputs: dict, tables: dict, scale: float, out, lse, thr,
                 d_out, d_lse=None, wrap=None):
        """``(dq, dk, dv, {floating input: grad in the accumulation dtype})`` of ``forward``'s
        out (and lse): torch ops and the dq then the dk/dv launch through ``wrap``. Raises
        ``backward_kernels``' error where the module has no backward kernels. k, v shared by
        the batch are read in place (dk, dv are per batch entry; autograd sums them)."""
        if "bwd_dq" not in self.kernels:
            self.kernels.update(self.backward_kernels())
        q = q.contiguous()
        k, v = (x if x[0].is_contiguous() else x.contiguous() for x in (k, v))
        inputs = prepared(q, inputs)
        acc = lse.dtype
        d_out = d_out.contiguous()
        # rowsum(dO * O) (unused under sigmoid): the dq kernel corrects it exactly from the
        # tiles and writes ``delta - d_lse`` back for the dk/dv kernel, which runs after it
        delta = (d_out.to(acc) * out.to(acc)).sum(-1).contiguous()
        d_lse = torch.zeros_like(delta) if d_lse is None else d_lse.to(acc).contiguous()
        dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
        grads = {n: torch.zeros(x.shape, dtype=acc, device=x.device) for n, x in inputs.items()
                 if x.is_floating_point()}
        dummy = lse.new_zeros(1)
        values = self._values(q, k, v, inputs, scale)
        values.update(DO=d_out, DQ=dq, DK=dk, DV=dv, LSE=lse, DELTA=delta, DLSE=d_lse, THR=thr,
                      DMK=grads.get("mem_k", dummy), DMV=grads.get("mem_v", dummy),
                      DW=grads.get("w", dummy), **_strides("so", d_out),
                      **_strides("sdk", dk, "n"), **_strides("sdv", dv, "n"),
                      **{f"{n}_grad": g for n, g in grads.items()})
        grid_q, grid_k = self._grids(q, k)
        _launch(self.kernels["bwd_dq"], grid_q, wrap, {**values, **_table_values(tables, False)},
                self.config)
        _launch(self.kernels["bwd_dkdv"], grid_k, wrap,
                {**values, **_table_values(tables, True)}, self.config)
        return dq, dk, dv, grads

    def fused(self, q, k, v, inputs: dict, tables: dict, scale: float):
        """``(out, lse)`` of the fused kernel, differentiable in q, k, v and the floating
        inputs (torch autograd calls ``backward``)."""
        inputs = prepared(q, inputs)
        names = tuple(n for n, x in inputs.items() if x.is_floating_point())
        return _Fused.apply(self, tables, scale, inputs, names, q, k, v,
                            *(inputs[n] for n in names))

    # linear attention ------------------------------------------------------------------------
    def _linear(self, name: str, phi_q, phi_k, v, wrap, **tensors):
        """One launch of the linear kernel ``name`` per (batch, query head)."""
        batch, heads, seq_q, feats = phi_q.shape
        values = dict(PQ=phi_q, PK=phi_k, V=v, heads=heads, kv_heads=v.shape[1], seq_q=seq_q,
                      seq_k=v.shape[2], feats=feats, value_dim=v.shape[3],
                      ACC=tl.float64 if v.dtype == torch.float64 else tl.float32, PREC="ieee",
                      CAUSAL=self.spec["causal"], CHUNK=self.config["chunk"],
                      BLOCK_F=pow2(feats), BLOCK_DV=pow2(v.shape[3]), **tensors)
        _launch(self.kernels[name], (batch * heads,), wrap, values, self.config)

    def linear(self, phi_q, phi_k, v, wrap=None):
        """``out (B, H, Nq, Dv)`` of ``_linear`` on φ(q), φ(k) (B, H or Hkv, N, F) and v, not
        differentiable: torch ops and one launch through ``wrap``."""
        phi_q, phi_k, v = (x.contiguous() for x in (phi_q, phi_k, v))
        out = v.new_empty((*phi_q.shape[:3], v.shape[3]))
        self._linear("linear", phi_q, phi_k, v, wrap, OUT=out)
        return out

    def linear_backward(self, phi_q, phi_k, v, out, d_out, den=None, d_den=None, wrap=None):
        """``(dφq (B, H, Nq, F), dφk (B, Hkv, Nk, F), dv (B, Hkv, Nk, Dv))`` in the
        accumulation dtype of ``out = linear(φq, φk, v) = num / den`` (0 where ``den``, the
        ``denominator``, is 0) from ``∂L/∂out`` and, where ``den`` is an output too, ``∂L/∂den``:
        ``∂L/∂num`` (none on rows where ``den`` is 0) and the total ``∂L/∂den`` by torch ops,
        then one launch of ``_linear_bwd`` through ``wrap``."""
        acc = acc_dtype(v.dtype)
        den = self.denominator(phi_q, phi_k) if den is None else den.to(acc)
        empty = den == 0
        safe = torch.where(empty, 1.0, den)
        d_out = d_out.to(acc)
        d_num = torch.where(empty[..., None], 0.0, d_out / safe[..., None])
        through = torch.where(empty, 0.0, (d_out * out.to(acc)).sum(-1) / safe)
        d_den = (0.0 if d_den is None else d_den.to(acc)) - through
        phi_q, phi_k, v = (x.contiguous() for x in (phi_q, phi_k, v))
        heads, kv_heads = phi_q.shape[1], v.shape[1]
        d_pq = torch.empty(phi_q.shape, dtype=acc, device=v.device)
        d_pk = torch.empty((*phi_q.shape[:2], *phi_k.shape[2:]), dtype=acc, device=v.device)
        d_v = torch.empty((*phi_q.shape[:2], *v.shape[2:]), dtype=acc, device=v.device)
        self._linear("linear_bwd", phi_q, phi_k, v, wrap, DNUM=d_num.to(v.dtype).contiguous(),
                     DDEN=d_den.contiguous(), DPQ=d_pq, DPK=d_pk, DV=d_v)
        return d_pq, *(d.unflatten(1, (kv_heads, heads // kv_heads)).sum(2) for d in (d_pk, d_v))

    def denominator(self, phi_q, phi_k):
        """``den_i = Σ_j φq_i·φk_j`` (over ``j <= i`` when causal), ``(B, H, Nq)`` in the
        accumulation dtype: what ``_linear`` divides by."""
        pk = phi_k.to(acc_dtype(phi_q.dtype))
        if self.spec["causal"]:
            rows = torch.arange(phi_q.shape[2], device=pk.device).clamp(max=pk.shape[2] - 1)
            sums = pk.cumsum(2).index_select(2, rows)
        else:
            sums = pk.sum(2, keepdim=True)
        group = phi_q.shape[1] // phi_k.shape[1]
        return (phi_q.to(pk.dtype) * sums.repeat_interleave(group, 1)).sum(-1)

    def linear_attention(self, phi_q, phi_k, v):
        """``out`` of ``linear``, differentiable in φ(q), φ(k), v (by ``_linear_bwd``)."""
        return _Linear.apply(self, phi_q, phi_k, v)

    # the standalone entry point --------------------------------------------------------------
    def attention(self, q, k, v, return_lse: bool, tables, inputs: dict):
        """The module's ``attention`` (see its docstring)."""
        spec = self.spec
        if spec["kind"] == "linear":
            omega = inputs.get("omega")
            out = self.linear_attention(features(spec, q, omega), features(spec, k, omega), v)
            return (out, None) if return_lse else out
        scale = self.scale(q, k, v)
        if spec["kind"] == "nystrom":
            return self.nystrom(q, k, v, scale)[0]
        if spec["projection"]:
            k, v = inputs["E"].to(k.dtype) @ k, inputs["F"].to(v.dtype) @ v
        if tables is None:
            tables = self.dense_tables(q.shape[2], k.shape[2],
                                       PARTIAL if spec["masked"] else FULL, q.device)
        out, lse = self.fused(q, k, v, inputs, tables, scale)
        return (out, lse.to(q.dtype)) if return_lse else out

    def landmarks(self, q, k):
        """Nyström's segment-mean landmarks q̃ (B, H, m, D) and k̃, repeated to the query heads."""
        m, group = self.spec["landmarks"], q.shape[1] // k.shape[1]
        q_land = q.unflatten(2, (m, q.shape[2] // m)).mean(3)
        return q_land, k.unflatten(2, (m, k.shape[2] // m)).mean(3).repeat_interleave(group, 1)

    def nystrom(self, q, k, v, scale: float, wrap=None, grad: bool = True):
        """``(out, middle, inverse, attn_v, lse_v, lse_out)`` of ``out = softmax(s q k̃ᵀ) ·
        inverse · attn_v``, ``inverse = pinv(middle)`` (accumulation dtype), ``middle =
        softmax(s q̃ k̃ᵀ)``, ``attn_v = softmax(s q̃ kᵀ) v``: two dense fused-kernel calls
        (``fused`` where ``grad``, else ``forward`` through ``wrap``) and torch ops."""
        q_land, k_land = self.landmarks(q, k)
        middle = torch.softmax(scale * (q_land @ k_land.transpose(-1, -2)), -1)
        inverse = torch.linalg.pinv(middle.to(acc_dtype(q.dtype)))

        def run(q_, k_, v_):
            dense = self.dense_tables(q_.shape[2], k_.shape[2], FULL, q.device)
            if grad:
                return self.fused(q_, k_, v_, {}, dense, scale)
            return self.forward(q_, k_, v_, {}, dense, scale, wrap=wrap)[:2]

        attn_v, lse_v = run(q_land, k, v)
        out, lse_out = run(q, k_land, inverse.to(q.dtype) @ attn_v)
        return out, middle, inverse, attn_v, lse_v, lse_out


def prepared(q, inputs: dict) -> dict:
    """The inputs a fused kernel reads: floating ones in q's dtype, all contiguous (Linformer's
    E and F are applied before the kernel)."""
    return {n: (x.to(q.dtype) if x.is_floating_point() else x).contiguous()
            for n, x in inputs.items() if n not in ("E", "F")}


def _strides(prefix: str, x, seq: str = "m") -> dict:
    """``{prefix}b, {prefix}h, {prefix}{seq}``: the batch, head and sequence strides of x."""
    return dict(zip((prefix + "b", prefix + "h", prefix + seq), x.stride()[:3], strict=True))


class _Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, program, tables, scale, inputs, names, q, k, v, *floats):
        out, lse, thr = program.forward(q, k, v, inputs, tables, scale)
        ctx.args = (program, tables, scale, inputs, names)
        ctx.save_for_backward(q, k, v, out, lse, thr)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        program, tables, scale, inputs, names = ctx.args
        q, k, v, out, lse, thr = ctx.saved_tensors
        dq, dk, dv, grads = program.backward(q, k, v, inputs, tables, scale, out, lse, thr,
                                             d_out, d_lse)
        return (None,) * 5 + (dq, dk, dv, *(grads[n].to(inputs[n].dtype) for n in names))


class _Linear(torch.autograd.Function):
    """``out = num / den`` of ``_linear`` (0 where ``den`` is 0); gradients by ``_linear_bwd``."""

    @staticmethod
    def forward(ctx, program, phi_q, phi_k, v):
        out = program.linear(phi_q, phi_k, v)
        ctx.program = program
        ctx.save_for_backward(phi_q, phi_k, v, out)
        return out

    @staticmethod
    def backward(ctx, d_out):
        phi_q, phi_k, v, out = ctx.saved_tensors
        d_pq, d_pk, d_v = ctx.program.linear_backward(phi_q, phi_k, v, out, d_out)
        return None, d_pq.to(phi_q.dtype), d_pk.to(phi_k.dtype), d_v.to(v.dtype)


def features(spec: dict, x, omega):
    """The linear-attention feature map φ(x) (torch, differentiable): ``attncc.lowering.
    features.feature_map`` written again in torch alone, for a module that imports no attncc
    (and for ``torch.compile``, which traces torch ops but not the array-API namespace)."""
    if spec["feature_map"] == "elu1":
        return torch.where(x > 0, x + 1.0, torch.exp(x.clamp(max=0.0)))
    if spec["feature_map"] == "relu":
        return x.clamp(min=0.0)
    xs = x * x.shape[-1] ** -0.25
    projected = xs @ omega.to(x.dtype).transpose(0, 1)
    return torch.exp(projected - (xs * xs).sum(-1, keepdim=True) / 2.0) / math.sqrt(
        spec["features"])
