"""The accuracy rule of DESIGN §8 (FlexAttention style), and ``check_kernel`` that applies it.

A backend's result ``x`` is judged against the float64 reference ``ref64`` relative to what plain
eager code achieves in the same dtype (``eager``: ``attncc.reference.attend`` on the inputs in that
dtype, on the inputs' own library)::

    max|x - ref64|  <=  FACTOR * max|eager - ref64|  +  FLOORS[dtype] * max(1, max|ref64|)

so a kernel may be a few times less exact than the naive computation in its dtype, never more;
the floor (relative to the output's magnitude) covers dtypes where the eager error is ~0.
Infinities the reference has (lse of rows with no kept key) must match exactly. The same rule
applies to the lse and, for kernels with gradients, to the gradients of q, k, v and of every
floating input (against autograd through ``attend`` on float64 torch tensors, for a random
output gradient; the floor of every gradient is relative to the largest reference gradient of the
call).

Two refinements keep the rule fair where its plain form measures the wrong thing:

- **float64 has no separate eager run**: eager float64 *is* the reference, so its measured error
  would be 0 and any reordering of the arithmetic would fail wherever the computation amplifies
  rounding (Nyström's pinv: gradients move by cond(A)²·ε). To first order a computation's
  rounding error is proportional to the unit roundoff, so the float64 eager error is estimated as
  the float32 eager error times ε64/ε32 = 2⁻²⁹. Well-conditioned specs stay at the floor (their
  estimate is ~1e-16 relative); an ill-conditioned one gets the slack its conditioning implies.
- **values past the dtype's range**: IEEE rounding turns anything beyond ``OVERFLOW[dtype]`` into
  ±inf, so where the reference is finite both sides are compared after clamping to that range
  (a result of +inf means "at least the largest value"). An eager run that overflowed (NaN, or
  an inf farther from the reference than the quantity's magnitude) yields no yardstick: its
  error is inf and the bound is the floor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import array_api_compat
import numpy as np

from attncc.lowering.prologue import dtype_name
from attncc.lowering.requests import has_lse
from attncc.plan import host_array
from attncc.reference import attend, reference, spec_kind
from attncc.spec.load import load_spec

#: How many times the eager same-dtype error a backend may reach.
FACTOR = 4.0
#: Floor per dtype (about two units in the last place), multiplied by max(1, max|ref64|).
FLOORS = {"float64": 1e-12, "float32": 2e-6, "float16": 2e-3, "bfloat16": 1.6e-2}
#: Where IEEE round-to-nearest overflows: the largest finite value plus half its ulp.
OVERFLOW = {"float16": (2 - 2.0**-11) * 2.0**15, "bfloat16": (2 - 2.0**-8) * 2.0**127,
            "float32": (2 - 2.0**-24) * 2.0**127, "float64": float(np.finfo(np.float64).max)}
#: float64's eager error is the float32 eager error times this (ε64 / ε32).
FLOAT64_FROM_FLOAT32 = 2.0**-29


@dataclass(frozen=True)
class Check:
    """One compared quantity (``out``, ``lse``, ``grad q``...): its errors and the bound."""

    quantity: str
    error: float
    eager_error: float
    bound: float

    @property
    def ok(self) -> bool:
        return bool(self.error <= self.bound)


@dataclass(frozen=True)
class Report:
    """The result of ``check_kernel``: ``ok`` when every check is within its bound."""

    spec: str
    backend: str
    dtype: str
    sizes: dict
    checks: tuple[Check, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def __str__(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in self.sizes.items())
        lines = [f"{'PASS' if self.ok else 'FAIL'}: backend {self.backend}, spec {self.spec}, "
                 f"{self.dtype}, {dims}",
                 f"  rule: error <= {FACTOR} * eager_error + {FLOORS.get(self.dtype)} * "
                 "max(1, max|ref64|)",
                 f"  {'quantity':<12} {'error':>10} {'eager':>10} {'bound':>10}"]
        for c in self.checks:
            lines.append(f"  {c.quantity:<12} {c.error:10.3e} {c.eager_error:10.3e} "
                         f"{c.bound:10.3e}  {'ok' if c.ok else 'FAIL'}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def max_error(x, ref, dtype: str | None = None) -> float:
    """max|x - ref| in float64; equal infinities count as 0, a NaN or unequal infinity as inf.

    With ``dtype``, where ``ref`` is finite both are first clamped to ±``OVERFLOW[dtype]``: a
    reference past the dtype's range is correctly ±inf there, and an inf stands for "beyond".
    """
    x, ref = _numpy64(x), _numpy64(ref)
    if x.shape != ref.shape:
        raise AssertionError(f"shape {x.shape} does not match the reference's {ref.shape}")
    if x.size == 0:
        return 0.0
    if dtype is not None:
        top = OVERFLOW.get(dtype, np.inf)
        finite = np.isfinite(ref)
        x = np.where(finite & ~np.isnan(x), np.clip(x, -top, top), x)
        ref = np.where(finite, np.clip(ref, -top, top), ref)
    same = (x == ref) | (np.isnan(x) & np.isnan(ref))
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(x - ref))
    diff = np.where(np.isnan(diff), np.inf, diff)
    return float(diff.max())


def overflowed(x, ref, dtype: str, scale: float) -> bool:
    """Whether ``x`` is NaN, or infinite where the reference is finite and farther than ``scale``
    (the quantity's magnitude) from ``dtype``'s overflow threshold: such an inf is an overflow of
    the computation, not the rounding of a value near the top of the dtype's range."""
    x, ref = _numpy64(x), _numpy64(ref)
    top = OVERFLOW.get(dtype, np.inf)
    far = np.isfinite(ref) & (top - np.abs(np.clip(ref, -top, top)) > scale)
    return bool(np.isnan(x).any() or (np.isinf(x) & far).any())


def judge(quantity: str, x, eager, ref, dtype: str, scale: float | None = None, *,
          eager_dtype: str | None = None, eager_factor: float = 1.0) -> Check:
    """Apply the rule to one quantity; the floor is relative to ``scale`` (default: the largest
    finite magnitude of ``ref``, at least 1). ``eager`` was computed in ``eager_dtype`` (default
    ``dtype``) and its error counts ``eager_factor`` times (``FLOAT64_FROM_FLOAT32`` for
    float64)."""
    ref64 = _numpy64(ref)
    if scale is None:
        scale = magnitude(ref64)
    eager_dtype = eager_dtype or dtype
    eager_error = max_error(eager, ref64, eager_dtype)
    if overflowed(eager, ref64, eager_dtype, scale):
        eager_error = np.inf
    # an eager run that overflowed says nothing about the achievable accuracy, and its slack
    # would pass any kernel: the floor alone judges then
    slack = FACTOR * eager_error * eager_factor if np.isfinite(eager_error) else 0.0
    bound = slack + FLOORS.get(dtype, 1e-2) * scale
    return Check(quantity, max_error(x, ref64, dtype), eager_error * eager_factor, bound)


def magnitude(x) -> float:
    """max(1, the largest finite |x|): what a quantity's rounding errors are relative to."""
    x = _numpy64(x)
    finite = x[np.isfinite(x)]
    return max(1.0, float(np.abs(finite).max())) if finite.size else 1.0


def check_kernel(kernel, spec, q, k, v, inputs: dict | None = None, *, grads: bool | None = None,
                 seed: int = 0) -> Report:
    """Compare ``kernel(q, k, v, **inputs)`` with the float64 reference under the rule above.

    ``kernel`` is a Kernel, or any callable with its call signature (a test's stand-in), whose
    ``backend`` and ``backward`` are read where it has them. The lse is checked too where the
    spec has one (softmax and top-k, not Nyström). Gradients are checked when ``grads`` (default:
    the kernel has a ``backward``); that needs torch tensors.
    """
    spec = load_spec(spec)
    inputs = dict(inputs or {})
    dtype = dtype_name(q.dtype)
    lse = has_lse(spec_kind(spec), spec.normalize)
    ref = reference(spec, q, k, v, return_lse=lse, **inputs)
    eager, eager_dtype, factor, note = yardstick(spec, q, k, v, inputs, lse)
    got = kernel(q, k, v, return_lse=lse, **inputs)
    yard = {"eager_dtype": eager_dtype, "eager_factor": factor}
    if lse:
        checks = [judge("out", got[0], eager[0], ref[0], dtype, **yard),
                  judge("lse", got[1], eager[1], ref[1], dtype, **yard)]
    else:
        checks = [judge("out", got, eager, ref, dtype, **yard)]
    if grads is None:
        grads = getattr(kernel, "backward", None) is not None
    if grads:
        checks += gradient_checks(kernel, spec, q, k, v, inputs, dtype, seed)
    sizes = {"batch": q.shape[0], "heads": q.shape[1], "kv_heads": k.shape[1],
             "seq_q": q.shape[2], "seq_k": k.shape[2], "head_dim": q.shape[3],
             "value_dim": v.shape[3]}
    return Report(spec.name, getattr(kernel, "backend", type(kernel).__name__), dtype, sizes,
                  tuple(checks), (note,) if note else ())


def gradient_checks(kernel, spec, q, k, v, inputs: dict, dtype: str, seed: int) -> list[Check]:
    """One Check per differentiable tensor: ``grad q``, ``grad k``, ``grad v``, ``grad <input>``."""
    import torch

    if not isinstance(q, torch.Tensor):
        raise AssertionError(f"gradient checks need torch tensors, got {type(q).__name__}")
    names = ["q", "k", "v", *(n for n in inputs if spec.inputs[n].is_float)]
    given = {"q": q, "k": k, "v": v, **inputs}
    out_shape = (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    gen = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(out_shape, generator=gen, dtype=torch.float64)

    def run(fn, cast):
        leaves = {n: (cast(x).detach().clone().requires_grad_(True) if n in names
                      else x) for n, x in given.items()}
        ins = {n: leaves[n] for n in inputs}
        out = fn(leaves["q"], leaves["k"], leaves["v"], ins)
        out.backward(grad_out.to(device=out.device, dtype=out.dtype))
        return {n: (leaves[n].grad if leaves[n].grad is not None
                    else torch.zeros_like(leaves[n])) for n in names}

    same = lambda x: x  # noqa: E731 - the identity cast
    got = run(lambda q_, k_, v_, ins: kernel(q_, k_, v_, **ins), same)
    ref = run(lambda q_, k_, v_, ins: attend(spec, q_, k_, v_, ins), lambda x: x.double())
    if dtype == "float64":
        eager_dtype, factor = "float32", FLOAT64_FROM_FLOAT32
        eager = run(lambda q_, k_, v_, ins: attend(spec, q_, k_, v_, ins), lambda x: x.float())
    else:
        eager_dtype, factor = dtype, 1.0
        eager = run(lambda q_, k_, v_, ins: eager_attend(spec, q_, k_, v_, ins, False)[0], same)
    # a gradient that is exactly zero (hard attention's dq, dk) is still computed from terms as
    # large as the other gradients, so the floor is relative to the largest of them
    scale = max(magnitude(ref[n]) for n in names)
    return [judge(f"grad {n}", got[n], eager[n], ref[n], dtype, scale, eager_dtype=eager_dtype,
                  eager_factor=factor) for n in names]


def yardstick(spec, q, k, v, inputs: dict, return_lse: bool):
    """The eager run a kernel is measured against: ``(result, its dtype, factor, note)``.

    float64 inputs run eagerly in float32 with factor ``FLOAT64_FROM_FLOAT32`` (see the module
    docstring); other dtypes run in their own dtype (``eager_attend``) with factor 1.
    """
    if dtype_name(q.dtype) == "float64":
        result = attend(spec, *_float32(spec, q, k, v, inputs), return_lse=return_lse)
        return result, "float32", FLOAT64_FROM_FLOAT32, None
    result, note = eager_attend(spec, q, k, v, inputs, return_lse)
    return result, ("float32" if note else dtype_name(q.dtype)), 1.0, note


def eager_attend(spec, q, k, v, inputs: dict, return_lse: bool):
    """``attend`` in the inputs' dtype; where that library cannot run it (pinv in half precision),
    in float32 instead. Returns ``(result, note or None)``."""
    try:
        return attend(spec, q, k, v, inputs, return_lse=return_lse), None
    except (TypeError, RuntimeError, NotImplementedError) as err:
        note = (f"eager {dtype_name(q.dtype)} failed ({type(err).__name__}: {str(err)[:80]}); "
                "eager error measured in float32")
        return attend(spec, *_float32(spec, q, k, v, inputs), return_lse=return_lse), note


def _float32(spec, q, k, v, inputs: dict) -> tuple:
    """``(q, k, v, inputs)`` with every floating array in float32."""
    xp = array_api_compat.array_namespace(q)
    ins = {n: (xp.astype(x, xp.float32) if spec.inputs[n].is_float else x)
           for n, x in inputs.items()}
    return (*(xp.astype(x, xp.float32) for x in (q, k, v)), ins)


def _numpy64(x) -> np.ndarray:
    return np.asarray(host_array(x), dtype=np.float64)
