"""Host side of a generated module: launches, plan tables, autograd. Copied verbatim into it.

This file is pasted (after its imports) into every generated kernel module, so that the module
runs with only torch and triton installed. It imports nothing from attncc. Its functions receive
the module's kernels (``kern``: ``fwd``, ``bwd_dq``, ``bwd_dkdv``, ``classify``, ``linear``,
``linear_bwd``) and its ``SPEC`` and ``CONFIG``.
"""

import math

import torch
import triton
import triton.language as tl

_TABLE_CACHE: dict = {}
_TABLE_NAMES = ("fc", "fi", "pc", "pi", "fct", "fit", "pct", "pit")


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(int(n)))


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _acc_torch(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _index_table(selected, padded: bool = False):
    """(counts, index) of the True entries of the last axis, ascending, padded with 0; as wide
    as the longest row, or (``padded``) as the whole axis, so that its shape follows the sizes."""
    counts = selected.sum(-1, dtype=torch.int32)
    if padded:
        width = max(1, selected.shape[-1])
    else:
        width = max(1, int(counts.max()) if counts.numel() else 1)
    n = selected.shape[-1]
    order = torch.arange(n, device=selected.device, dtype=torch.int32)
    keyed = torch.where(selected, order, torch.full_like(order, n))
    index = keyed.sort(-1).values[..., :width]
    if index.shape[-1] < width:
        index = torch.nn.functional.pad(index, (0, width - index.shape[-1]), value=n)
    index = torch.where(index == n, torch.zeros_like(index), index)
    return counts.contiguous(), index.to(torch.int32).contiguous()


def tables_from_states(states, padded: bool = False) -> dict:
    """The eight index tables (FULL/PARTIAL, per query block and transposed) of a states array
    ``(Bp, Hp, nQ, nK)`` of 0 EMPTY, 1 PARTIAL, 2 FULL. ``padded``: index tables as wide as the
    block axis (nK, or nQ for the transposed ones), shapes known without reading the states."""
    result = {}
    for suffix, grid in (("", states), ("t", states.transpose(2, 3))):
        result["fc" + suffix], result["fi" + suffix] = _index_table(grid == 2, padded)
        result["pc" + suffix], result["pi" + suffix] = _index_table(grid == 1, padded)
    return result


def _expr_args(spec, inputs: dict) -> list:
    args = []
    for name in spec["expr_inputs"]:
        x = inputs[name]
        args += [x, *x.stride(), *x.shape]
    return args


def build_tables(kern, spec, config, sizes: dict, inputs: dict, device) -> dict:
    """Plan tables computed on the device by the generated ``_classify`` kernel (cached per
    shape when the mask reads no input)."""
    bm, bn = config["block_m"], config["block_n"]
    key = (sizes["batch"], sizes["heads"], sizes["seq_q"], sizes["seq_k"], bm, bn, str(device))
    if not spec["mask_inputs"] and key in _TABLE_CACHE:
        return _TABLE_CACHE[key]
    n_q, n_k = triton.cdiv(sizes["seq_q"], bm), triton.cdiv(sizes["seq_k"], bn)
    plan_b = sizes["batch"] if spec["plan_b"] else 1
    plan_h = sizes["heads"] if spec["plan_h"] else 1
    states = torch.empty((plan_b, plan_h, n_q, n_k), dtype=torch.int8, device=device)
    kern.classify[(n_q * n_k, plan_b * plan_h)](
        states, *_expr_args(spec, inputs), sizes["batch"], sizes["heads"], sizes["kv_heads"],
        sizes["seq_q"], sizes["seq_k"], sizes["head_dim"], sizes["value_dim"], n_q, n_k, plan_h,
        ACC=tl.float32, BLOCK_M=bm, BLOCK_N=bn)
    tables = tables_from_states(states)
    if not spec["mask_inputs"]:
        if len(_TABLE_CACHE) > 32:
            _TABLE_CACHE.clear()
        _TABLE_CACHE[key] = tables
    return tables


def _table_args(tables: dict, transposed: bool) -> list:
    t = "t" if transposed else ""
    fc, fi, pc, pi = (tables[n + t] for n in ("fc", "fi", "pc", "pi"))
    strides = [s if n > 1 else 0 for s, n in zip(fc.stride(), fc.shape, strict=True)]
    index = [s if n > 1 else 0 for s, n in zip(fi.stride()[:3], fi.shape[:3], strict=True)]
    for a, b in ((fc, pc), (fi, pi)):
        if a.shape[:3] != b.shape[:3]:
            raise ValueError("plan tables: FULL and PARTIAL tables must have matching rows")
    if pi.shape[-1] != fi.shape[-1]:
        width = max(pi.shape[-1], fi.shape[-1])
        fi = torch.nn.functional.pad(fi, (0, width - fi.shape[-1])).contiguous()
        pi = torch.nn.functional.pad(pi, (0, width - pi.shape[-1])).contiguous()
        index = [s if n > 1 else 0 for s, n in zip(fi.stride()[:3], fi.shape[:3], strict=True)]
    return [fc, fi, pc, pi, *strides, *index]


class _Problem:
    """One call's tensors, sizes and launch constants."""

    def __init__(self, kern, spec, config, q, k, v, floats: dict, ints: dict, tables,
                 wrap=None):
        self.kern, self.spec, self.config = kern, spec, config
        self.wrap = wrap if wrap is not None else (lambda kernel: kernel)
        self.q, self.k, self.v = q, k, v
        batch, heads, seq_q, head_dim = q.shape
        self.sizes = {"batch": batch, "heads": heads, "kv_heads": k.shape[1], "seq_q": seq_q,
                      "seq_k": k.shape[2], "head_dim": head_dim, "value_dim": v.shape[3]}
        self.inputs = {**ints, **floats}
        self.floats = floats
        if tables is None:
            tables = build_tables(kern, spec, config, self.sizes, self.inputs, q.device)
        self.tables = {n: tables[n].to(device=q.device, dtype=torch.int32).contiguous()
                       for n in _TABLE_NAMES}
        dummy = q.new_zeros(1)
        self.mk = floats.get("mem_k", dummy)
        self.mv = floats.get("mem_v", dummy)
        self.w = floats.get("w", dummy)
        self.consts = dict(
            ACC=_acc(q.dtype), PREC="ieee", MEM=spec["memory_tokens"], TOPK=spec["topk"] or 1,
            BLOCK_M=config["block_m"], BLOCK_N=config["block_n"], BLOCK_D=_pow2(head_dim),
            BLOCK_DV=_pow2(v.shape[3]), num_warps=config["num_warps"],
            num_stages=config["num_stages"])

    def head(self) -> list:
        q, k, v, mk, mv, w = self.q, self.k, self.v, self.mk, self.mv, self.w
        mk_s = mk.stride()[:2] if mk.dim() == 3 else (0, 0)
        mv_s = mv.stride()[:2] if mv.dim() == 3 else (0, 0)
        return [q, k, v, mk, mv, w, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                *mk_s, *mv_s, w.stride(0) if w.dim() == 2 else 0]

    def tail(self, scale: float) -> list:
        s = self.sizes
        return [*_expr_args(self.spec, self.inputs), scale, s["batch"], s["heads"],
                s["kv_heads"], s["seq_q"], s["seq_k"], s["head_dim"], s["value_dim"]]

    def grid_q(self):
        return (triton.cdiv(self.sizes["seq_q"], self.config["block_m"]),
                self.sizes["batch"] * self.sizes["heads"])

    def grid_k(self):
        return (triton.cdiv(self.sizes["seq_k"], self.config["block_n"]),
                self.sizes["batch"] * self.sizes["kv_heads"])


def _forward_launch(pb, scale: float):
    """(out, lse, thr) of the fused forward kernel: torch ops and one kernel launch only."""
    s = pb.sizes
    acc = _acc_torch(pb.q.dtype)
    out = pb.q.new_empty((s["batch"], s["heads"], s["seq_q"], s["value_dim"]))
    lse = torch.full((s["batch"], s["heads"], s["seq_q"]), -math.inf, dtype=acc,
                     device=pb.q.device)
    thr = torch.zeros_like(lse)  # written for top-k only; defined for every call
    pb.wrap(pb.kern.fwd)[pb.grid_q()](*pb.head(), out, lse, thr, *out.stride()[:3],
                                      *_table_args(pb.tables, False), *pb.tail(scale),
                                      **pb.consts)
    return out, lse, thr


def _backward_launch(pb, scale: float, out, lse, thr, d_out, d_lse):
    """(dq, dk, dv, {floating input: grad in the accumulation dtype}): torch ops and the two
    backward kernel launches only."""
    acc = lse.dtype
    d_out = d_out.contiguous()
    # rowsum(dO ∘ O) (unused under sigmoid): the dq kernel corrects it exactly from the tiles
    # and writes ``delta - d_lse`` back for the dk/dv kernel, which must run after it.
    delta = (d_out.to(acc) * out.to(acc)).sum(-1).contiguous()
    d_lse = torch.zeros_like(delta) if d_lse is None else d_lse.to(acc).contiguous()
    dq, dk, dv = (torch.empty_like(x) for x in (pb.q, pb.k, pb.v))
    zeros = {n: torch.zeros(x.shape, dtype=acc, device=x.device) for n, x in pb.floats.items()}
    dummy = lse.new_zeros(1)
    dmk, dmv, dw = (zeros.get(n, dummy) for n in ("mem_k", "mem_v", "w"))
    tail = pb.tail(scale)
    pb.wrap(pb.kern.bwd_dq)[pb.grid_q()](*pb.head(), d_out, dq, dmk, dmv, dw, lse, delta, d_lse,
                                         thr, *d_out.stride()[:3], *_table_args(pb.tables, False),
                                         *tail, **pb.consts)
    grads = [zeros[n] for n in pb.spec["grad_inputs"]]
    pb.wrap(pb.kern.bwd_dkdv)[pb.grid_k()](*pb.head(), d_out, dk, dv, dw, lse, delta, thr,
                                           *d_out.stride()[:3], *_table_args(pb.tables, True),
                                           *grads, *tail, **pb.consts)
    return dq, dk, dv, zeros


def _split_inputs(q, inputs: dict):
    floats = {n: x.to(q.dtype).contiguous() for n, x in inputs.items()
              if x.is_floating_point() and n not in ("E", "F")}
    ints = {n: x.contiguous() for n, x in inputs.items() if not x.is_floating_point()}
    return floats, ints


def launch_forward(kern, spec, config, q, k, v, inputs: dict, tables: dict, scale: float,
                   wrap=None):
    """(out, lse, thr) of the fused kernel with precomputed ``tables``, not differentiable.

    Made only of torch ops and kernel launches, each through ``wrap`` (``torch.library.
    wrap_triton`` inside a ``triton_op``), so that torch.compile can trace it."""
    q, k, v = (x.contiguous() for x in (q, k, v))
    floats, ints = _split_inputs(q, inputs)
    pb = _Problem(kern, spec, config, q, k, v, floats, ints, tables, wrap)
    return _forward_launch(pb, scale)


def launch_backward(kern, spec, config, q, k, v, inputs: dict, tables: dict, scale: float,
                    out, lse, thr, d_out, d_lse=None, wrap=None):
    """(dq, dk, dv, {floating input name: grad}) of ``launch_forward``'s out (and lse), with
    the same contract: torch ops and wrapped kernel launches only."""
    q, k, v = (x.contiguous() for x in (q, k, v))
    floats, ints = _split_inputs(q, inputs)
    pb = _Problem(kern, spec, config, q, k, v, floats, ints, tables, wrap)
    dq, dk, dv, zeros = _backward_launch(pb, scale, out, lse, thr, d_out, d_lse)
    return dq, dk, dv, {n: g.to(inputs[n].dtype) for n, g in zeros.items()}


class _Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pb, scale, names, q, k, v, *float_inputs):
        out, lse, thr = _forward_launch(pb, scale)
        ctx.pb, ctx.scale, ctx.names = pb, scale, names
        ctx.save_for_backward(out, lse, thr)
        ctx.mark_non_differentiable(thr)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        pb = ctx.pb
        out, lse, thr = ctx.saved_tensors
        dq, dk, dv, zeros = _backward_launch(pb, ctx.scale, out, lse, thr, d_out, d_lse)
        d_inputs = [zeros[n].to(pb.floats[n].dtype) if n in zeros else None for n in ctx.names]
        return (None, None, None, dq, dk, dv, *d_inputs)


def _fused(kern, spec, config, q, k, v, inputs: dict, tables, scale: float):
    """Out and lse of the fused kernel, differentiable in q, k, v and the floating inputs."""
    q, k, v = (x.contiguous() for x in (q, k, v))
    floats, ints = _split_inputs(q, inputs)
    pb = _Problem(kern, spec, config, q, k, v, floats, ints, tables)
    names = tuple(floats)
    return _Fused.apply(pb, scale, names, q, k, v, *(floats[n] for n in names))


def _scale(spec, q, k, v) -> float:
    return float(spec["scale"](batch=q.shape[0], heads=q.shape[1], kv_heads=k.shape[1],
                               seq_q=q.shape[2], seq_k=k.shape[2], head_dim=q.shape[3],
                               value_dim=v.shape[3]))


def run(kern, spec, config, q, k, v, return_lse: bool, tables, inputs: dict):
    """The module's ``attention``: one of the three lowerings, by ``spec["kind"]``."""
    if spec["kind"] == "linear":
        out = run_linear(kern, spec, config, q, k, v, inputs)
        return (out, None) if return_lse else out
    if spec["kind"] == "nystrom":
        return run_nystrom(kern, spec, config, q, k, v)
    if spec["lowrank"] == "linformer":
        k = inputs["E"].to(k.dtype) @ k
        v = inputs["F"].to(v.dtype) @ v
    out, lse = _fused(kern, spec, config, q, k, v, inputs, tables, _scale(spec, q, k, v))
    if return_lse:
        return out, lse.to(q.dtype)
    return out


def run_nystrom(kern, spec, config, q, k, v):
    """Nyström: segment-mean landmarks, two dense fused-kernel calls and a pinv (torch)."""
    m = spec["landmarks"]
    _, heads, seq_q, _ = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    scale = _scale(spec, q, k, v)
    q_land = q.unflatten(2, (m, seq_q // m)).mean(3)
    k_land = k.unflatten(2, (m, seq_k // m)).mean(3)
    k_land = k_land.repeat_interleave(heads // kv_heads, dim=1)
    middle = torch.softmax(scale * (q_land @ k_land.transpose(-1, -2)), -1)
    attn_3v, _ = _fused(kern, spec, config, q_land, k, v, {}, None, scale)
    z = torch.linalg.pinv(middle.to(_acc_torch(q.dtype))).to(q.dtype) @ attn_3v
    out, _ = _fused(kern, spec, config, q, k_land, z, {}, None, scale)
    return out


def _features(spec, x, omega):
    """The linear-attention feature map (torch, differentiable)."""
    if spec["feature_map"] == "elu1":
        return torch.nn.functional.elu(x) + 1.0
    if spec["feature_map"] == "relu":
        return torch.relu(x)
    xs = x * x.shape[-1] ** -0.25
    projected = xs @ omega.to(x.dtype).transpose(0, 1)
    return torch.exp(projected - (xs * xs).sum(-1, keepdim=True) / 2.0) / math.sqrt(
        spec["features"])


def _linear_consts(spec, config, dtype, feats: int, value_dim: int) -> dict:
    return dict(ACC=_acc(dtype), PREC="ieee", CAUSAL=spec["causal"], CHUNK=config["chunk"],
                BLOCK_F=_pow2(feats), BLOCK_DV=_pow2(value_dim), num_warps=config["num_warps"],
                num_stages=config["num_stages"])


def linear_launch(kern, spec, config, phi_q, phi_k, v, wrap=None):
    """``out (B, H, Nq, Dv)`` of ``_linear`` on φ(q), φ(k) (B, H or Hkv, N, F) and v, not
    differentiable: torch ops and one launch through ``wrap`` (``torch.library.wrap_triton``)."""
    wrap = wrap if wrap is not None else (lambda kernel: kernel)
    phi_q, phi_k, v = (x.contiguous() for x in (phi_q, phi_k, v))
    batch, heads, n_q, feats = phi_q.shape
    kv_heads, n_k, value_dim = v.shape[1], v.shape[2], v.shape[3]
    out = v.new_empty((batch, heads, n_q, value_dim))
    wrap(kern.linear)[(batch * heads,)](
        phi_q, phi_k, v, out, *phi_q.stride()[:3], *phi_k.stride()[:3], *v.stride()[:3],
        *out.stride()[:3], heads, kv_heads, n_q, n_k, feats, value_dim,
        **_linear_consts(spec, config, v.dtype, feats, value_dim))
    return out


def linear_backward_launch(kern, spec, config, phi_q, phi_k, v, d_num, d_den, wrap=None):
    """``(dφq (B, H, Nq, F), dφk (B, Hkv, Nk, F), dv (B, Hkv, Nk, Dv))`` in the accumulation
    dtype from ``d_num = ∂L/∂num (B, H, Nq, Dv)`` (rounded to v's dtype for the kernel's dots)
    and ``d_den = ∂L/∂den (B, H, Nq)``: torch ops and one launch of ``_linear_bwd``."""
    wrap = wrap if wrap is not None else (lambda kernel: kernel)
    acc = _acc_torch(v.dtype)
    phi_q, phi_k, v = (x.contiguous() for x in (phi_q, phi_k, v))
    d_num, d_den = d_num.to(v.dtype).contiguous(), d_den.to(acc).contiguous()
    batch, heads, n_q, feats = phi_q.shape
    kv_heads, n_k, value_dim = v.shape[1], v.shape[2], v.shape[3]
    d_pq = torch.empty(phi_q.shape, dtype=acc, device=v.device)
    d_pk = torch.empty((batch, heads, n_k, feats), dtype=acc, device=v.device)
    d_v = torch.empty((batch, heads, n_k, value_dim), dtype=acc, device=v.device)
    wrap(kern.linear_bwd)[(batch * heads,)](
        phi_q, phi_k, v, d_num, d_den, d_pq, d_pk, d_v, heads, kv_heads, n_q, n_k, feats,
        value_dim, **_linear_consts(spec, config, v.dtype, feats, value_dim))
    group = heads // kv_heads
    d_pk = d_pk.unflatten(1, (kv_heads, group)).sum(2)
    d_v = d_v.unflatten(1, (kv_heads, group)).sum(2)
    return d_pq, d_pk, d_v


def linear_denominator(phi_q, phi_k, causal: bool):
    """``den_i = Σ_j φq_i·φk_j`` (over ``j <= i`` when ``causal``), ``(B, H, Nq)`` in the
    accumulation dtype: what ``_linear`` divides by."""
    acc = _acc_torch(phi_q.dtype)
    group = phi_q.shape[1] // phi_k.shape[1]
    pk = phi_k.to(acc)
    if causal:
        rows = torch.arange(phi_q.shape[2], device=pk.device).clamp(max=pk.shape[2] - 1)
        sums = pk.cumsum(2).index_select(2, rows)
    else:
        sums = pk.sum(2, keepdim=True)
    return (phi_q.to(acc) * sums.repeat_interleave(group, 1)).sum(-1)


class _Linear(torch.autograd.Function):
    """``out = num / den`` of ``_linear`` (0 where ``den`` is 0); gradients by ``_linear_bwd``."""

    @staticmethod
    def forward(ctx, kern, spec, config, phi_q, phi_k, v):
        phi_q, phi_k, v = (x.contiguous() for x in (phi_q, phi_k, v))
        out = linear_launch(kern, spec, config, phi_q, phi_k, v)
        ctx.save_for_backward(phi_q, phi_k, v, out)
        ctx.kern, ctx.spec, ctx.config = kern, spec, config
        return out

    @staticmethod
    def backward(ctx, d_out):
        phi_q, phi_k, v, out = ctx.saved_tensors
        den = linear_denominator(phi_q, phi_k, ctx.spec["causal"])
        empty = den == 0
        safe = torch.where(empty, torch.ones_like(den), den)
        d_out = d_out.to(den.dtype)
        d_num = torch.where(empty[..., None], torch.zeros_like(d_out), d_out / safe[..., None])
        d_den = -torch.where(empty, torch.zeros_like(den),
                             (d_out * out.to(den.dtype)).sum(-1) / safe)
        d_pq, d_pk, d_v = linear_backward_launch(ctx.kern, ctx.spec, ctx.config, phi_q, phi_k,
                                                 v, d_num, d_den)
        return (None, None, None, d_pq.to(phi_q.dtype), d_pk.to(phi_k.dtype), d_v.to(v.dtype))


def run_linear(kern, spec, config, q, k, v, inputs: dict):
    """Linear attention: the feature map in torch, the chunked scan in the Triton kernel."""
    omega = inputs.get("omega")
    phi_q, phi_k = _features(spec, q, omega), _features(spec, k, omega)
    return _Linear.apply(kern, spec, config, phi_q, phi_k, v)
