"""Valid random q, k, v and inputs for any spec, at small sizes, for the spec and reference tests.

``random_case(spec, ...)`` takes the sizes the spec fixes (heads, kv_heads, head_dim, value_dim)
from the spec and the rest from its arguments, then fills every declared or implied input from its
InputSpec: floats standard normal (Linformer's E and F scaled by 1/sqrt(seq_k) so the projection
keeps the scale of k and v), integers sorted along their last axis (1-D tables such as lengths or
prefix lengths lie in [0, min(seq_q, seq_k)], tables over positions such as document ids in
[0, 4)), bool tables true with probability 0.3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import sympy

from attncc.spec import Spec, load_spec
from attncc.spec.symbols import SIZES

_INT_DTYPES = {"int32": np.int32, "int64": np.int64}


@dataclass
class Case:
    """One call's arguments: ``sizes`` (name -> int), float64 NumPy q, k, v, and ``inputs``."""

    sizes: dict[str, int]
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    inputs: dict[str, np.ndarray]


def case_sizes(spec: Spec, *, batch=2, heads=2, kv_heads=None, seq_q=32, seq_k=None,
               head_dim=8, value_dim=None) -> dict[str, int]:
    """The sizes of a call: those the spec fixes win over the arguments."""
    heads = spec.heads or heads
    kv_heads = spec.kv_heads or (spec.heads if spec.heads else (kv_heads or heads))
    head_dim = spec.head_dim or head_dim
    value_dim = spec.value_dim or spec.head_dim or value_dim or head_dim
    return {"batch": batch, "heads": heads, "kv_heads": kv_heads, "seq_q": seq_q,
            "seq_k": seq_q if seq_k is None else seq_k, "head_dim": head_dim,
            "value_dim": value_dim}


def input_shape(decl, sizes: dict[str, int]) -> tuple[int, ...]:
    """The concrete shape of an InputSpec for the given sizes."""
    subs = {SIZES[name]: value for name, value in sizes.items()}
    return tuple(int(sympy.sympify(d).subs(subs)) for d in decl.shape)


def random_input(decl, sizes: dict[str, int], rng: np.random.Generator) -> np.ndarray:
    """A valid random value for one input (see the module docstring for the rules)."""
    shape = input_shape(decl, sizes)
    if decl.dtype == "bool":
        return rng.random(shape) < 0.3
    if decl.dtype in _INT_DTYPES:
        high = min(sizes["seq_q"], sizes["seq_k"]) + 1 if len(shape) == 1 else 4
        values = np.sort(rng.integers(0, high, size=shape), axis=-1)
        return values.astype(_INT_DTYPES[decl.dtype])
    values = rng.standard_normal(shape)
    if decl.name in ("E", "F") and decl.implied:
        values /= math.sqrt(sizes["seq_k"])
    return values


def random_case(spec, *, seed: int = 0, **size_args) -> Case:
    """Random float64 q, k, v and valid inputs for ``spec`` (anything load_spec takes)."""
    spec = load_spec(spec)
    sizes = case_sizes(spec, **size_args)
    rng = np.random.default_rng(seed)
    s = sizes
    q = rng.standard_normal((s["batch"], s["heads"], s["seq_q"], s["head_dim"]))
    k = rng.standard_normal((s["batch"], s["kv_heads"], s["seq_k"], s["head_dim"]))
    v = rng.standard_normal((s["batch"], s["kv_heads"], s["seq_k"], s["value_dim"]))
    inputs = {name: random_input(decl, sizes, rng) for name, decl in spec.inputs.items()}
    return Case(sizes, q, k, v, inputs)
