"""Random, valid inputs for any spec: q, k, v and every declared or implied input.

Values are drawn in float64 by NumPy from ``seed`` and then converted, so NumPy and torch get the
same numbers. Floats are ~N(0, 1) except linformer's E and F (scaled by 1/sqrt(seq_k)); integer
inputs whose last axis is a sequence are ids sorted along it in a small range (document ids), other
integer inputs are in [0, seq_k] (lengths, prefixes); boolean inputs are random with p = 0.3.
"""

from __future__ import annotations

import math

import numpy as np
import sympy

from attncc.spec.load import load_spec
from attncc.spec.numeric import evaluate
from attncc.spec.symbols import SIZES, free_names

#: Free sizes used when the spec does not fix them.
DEFAULT_HEADS = 4
DEFAULT_HEAD_DIM = 16
#: Integer ids along a sequence axis are drawn from range(ID_RANGE).
ID_RANGE = 4


def sizes_for(spec, batch: int, seq_q: int, seq_k: int, *, heads: int | None = None,
              head_dim: int | None = None, value_dim: int | None = None) -> dict[str, int]:
    """Every size of a call: fixed ones from the spec, free ones from the arguments or defaults.

    Nyström needs both sequences divisible by its landmarks: they are rounded up to a multiple.
    Without a fixed kv_heads, half the heads (GQA) when heads is even, so the suite covers groups;
    without a fixed value_dim (or head_dim), value_dim = head_dim + 8.
    """
    spec = load_spec(spec)
    heads = spec.heads or heads or DEFAULT_HEADS
    kv_heads = spec.kv_heads or (heads // 2 if not spec.heads and heads % 2 == 0 else heads)
    head_dim = spec.head_dim or head_dim or DEFAULT_HEAD_DIM
    # an open value_dim differs from head_dim, so kernels that mix the two up fail
    value_dim = spec.value_dim or spec.head_dim or value_dim or head_dim + 8
    if spec.lowrank is not None and spec.lowrank.method == "nystrom":
        m = spec.lowrank.size
        seq_q, seq_k = (-(-n // m) * m for n in (seq_q, seq_k))
    return {"batch": batch, "heads": heads, "kv_heads": kv_heads, "seq_q": seq_q,
            "seq_k": seq_k, "head_dim": head_dim, "value_dim": value_dim}


def unfit_reason(spec, sizes: dict[str, int]) -> str | None:
    """Why ``spec`` cannot take a call of ``sizes`` (from ``sizes_for``), or None if it can.

    Derived from the spec alone: every index its mask and score_mod compute into an input, over
    every ``(b, h, q_idx, kv_idx)`` of the call, must lie inside that axis of the input's declared
    shape. ``doc[b, kv_idx]`` with ``doc`` shaped ``[batch, seq_q]`` thus requires
    ``seq_k <= seq_q``, and with ``doc[b, q_idx]`` as well, ``seq_q == seq_k``. (An index that
    itself reads an input depends on values, not sizes, and is not judged here.)
    """
    spec = load_spec(spec)
    subs = {SIZES[name]: value for name, value in sizes.items()}
    grid = {"b": np.arange(sizes["batch"]).reshape(-1, 1, 1, 1),
            "h": np.arange(sizes["heads"]).reshape(1, -1, 1, 1),
            "q_idx": np.arange(sizes["seq_q"]).reshape(1, 1, -1, 1),
            "kv_idx": np.arange(sizes["seq_k"]).reshape(1, 1, 1, -1), **sizes}
    for expr in (spec.mask, spec.score_mod):
        if expr is None:
            continue
        for access in sorted(expr.atoms(sympy.Indexed), key=str):
            decl = spec.inputs[str(access.base.label)]
            for axis, index in enumerate(access.indices):
                if free_names(index) & set(spec.inputs):
                    continue
                size = int(sympy.sympify(decl.shape[axis]).subs(subs))
                values = np.asarray(evaluate(index, grid, np))
                if values.size and (values.min() < 0 or values.max() >= size):
                    return (f"input '{decl.name}' is indexed by {index} from {values.min()} to "
                            f"{values.max()}, outside its axis {axis} of size {size}")
    return None


def random_inputs(spec, batch: int, seq_q: int, seq_k: int, dtype: str = "float32",
                  seed: int = 0, library: str = "numpy", device=None, *,
                  heads: int | None = None, head_dim: int | None = None,
                  value_dim: int | None = None, score_std: float | None = None):
    """``(q, k, v, inputs)`` for ``spec`` as NumPy arrays or torch tensors of ``dtype``.

    Floating inputs get ``dtype`` too; integer and boolean ones keep their declared dtype.
    ``device`` applies to torch. Sizes follow ``sizes_for``. ``score_std`` draws extreme scores:
    q and k (dot) or w (additive) are scaled so that the raw scores have about that standard
    deviation (1e3 puts them far past where a naive ``exp`` overflows, even in float64).
    """
    spec = load_spec(spec)
    s = sizes_for(spec, batch, seq_q, seq_k, heads=heads, head_dim=head_dim, value_dim=value_dim)
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((s["batch"], s["heads"], s["seq_q"], s["head_dim"]))
    k = rng.standard_normal((s["batch"], s["kv_heads"], s["seq_k"], s["head_dim"]))
    v = rng.standard_normal((s["batch"], s["kv_heads"], s["seq_k"], s["value_dim"]))
    subs = {SIZES[name]: value for name, value in s.items()}
    inputs = {name: _draw(decl, subs, s, rng) for name, decl in spec.inputs.items()}
    if score_std is not None:
        if spec.score == "additive":  # Σ_d w_d·tanh(.) has std ~ |w|·sqrt(head_dim)
            inputs["w"] = inputs["w"] * (score_std / math.sqrt(s["head_dim"]))
        else:  # scale·q·k has std scale·sqrt(head_dim)·c² for q, k ~ c·N(0, 1)
            scale = abs(float(sympy.sympify(spec.scale).subs(subs)))
            c = math.sqrt(score_std / (scale * math.sqrt(s["head_dim"]))) if scale else 1.0
            q, k = q * c, k * c
    convert = converter(library, str(dtype), device)
    return (convert(q), convert(k), convert(v),
            {name: convert(x) for name, x in inputs.items()})


def _draw(decl, subs: dict, sizes: dict, rng):
    shape = tuple(int(sympy.sympify(d).subs(subs)) for d in decl.shape)
    if decl.is_float:
        x = rng.standard_normal(shape)
        return x / math.sqrt(sizes["seq_k"]) if decl.name in ("E", "F") else x
    if decl.dtype == "bool":
        return rng.random(shape) < 0.3
    last = decl.shape[-1]
    if last.free_symbols & {SIZES["seq_q"], SIZES["seq_k"]}:
        ids = np.sort(rng.integers(0, ID_RANGE, shape), axis=-1)
    else:
        ids = rng.integers(0, sizes["seq_k"] + 1, shape)
    return ids.astype(decl.dtype)


def converter(library: str, dtype: str | None, device):
    """NumPy array -> array of ``library`` (``numpy`` or ``torch``, on ``device``), floating ones
    cast to ``dtype`` (None: kept). Torch gets native byte order and contiguous memory."""
    dtype = dtype and dtype.removeprefix("torch.")
    if library == "numpy":
        def to_numpy(x):
            return x.astype(dtype) if dtype and x.dtype.kind == "f" else x
        return to_numpy
    if library != "torch":
        raise ValueError(f"library: expected 'numpy' or 'torch', got {library!r}")
    import torch

    def to_torch(x):
        native = x.astype(x.dtype.newbyteorder("="), copy=False)  # torch takes native order only
        t = torch.from_numpy(np.ascontiguousarray(native))
        if dtype and t.is_floating_point():
            t = t.to(getattr(torch, dtype))
        return t.to(device) if device is not None else t
    return to_torch
