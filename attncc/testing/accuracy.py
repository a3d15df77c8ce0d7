"""The accuracy rule of DESIGN §8 (FlexAttention style), and ``check_kernel`` that applies it.

A backend's result ``x`` is judged against the float64 reference ``ref64`` relative to what plain
eager code achieves in the same dtype (``eager``: ``attncc.reference.attend`` on the inputs in that
dtype, on the inputs' own library)::

    max|x - ref64|  <=  FACTOR * max|eager - ref64|  +  FLOORS[dtype] * max(1, max|ref64|)

so a kernel may be a few times less exact than the naive computation in its dtype, never more;
the floor (relative to the output's magnitude) covers dtypes where the eager error is ~0 (float64,
whose eager run *is* the reference). Infinities (lse of rows with no kept key) must match exactly.
The same rule applies to the lse and, for kernels with gradients, to the gradients of q, k, v and
of every floating input (against autograd through ``attend`` on float64 torch tensors).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import array_api_compat
import numpy as np

from attncc.reference import attend, reference
from attncc.spec.load import load_spec

#: How many times the eager same-dtype error a backend may reach.
FACTOR = 4.0
#: Floor per dtype (about two units in the last place), multiplied by max(1, max|ref64|).
FLOORS = {"float64": 1e-12, "float32": 2e-6, "float16": 2e-3, "bfloat16": 1.6e-2}


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


def max_error(x, ref) -> float:
    """max|x - ref| in float64; equal infinities count as 0, a NaN or unequal infinity as inf."""
    x, ref = _numpy64(x), _numpy64(ref)
    if x.shape != ref.shape:
        raise AssertionError(f"shape {x.shape} does not match the reference's {ref.shape}")
    if x.size == 0:
        return 0.0
    same = (x == ref) | (np.isnan(x) & np.isnan(ref))
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(x - ref))
    diff = np.where(np.isnan(diff), np.inf, diff)
    return float(diff.max())


def judge(quantity: str, x, eager, ref, dtype: str, scale: float | None = None) -> Check:
    """Apply the rule to one quantity; the floor is relative to ``scale`` (default: the largest
    finite magnitude of ``ref``, at least 1)."""
    ref64 = _numpy64(ref)
    if scale is None:
        scale = magnitude(ref64)
    eager_error = max_error(eager, ref64)
    # a non-finite eager error would make any kernel pass: judge against the floor alone then
    slack = FACTOR * eager_error if np.isfinite(eager_error) else 0.0
    bound = slack + FLOORS.get(dtype, 1e-2) * scale
    return Check(quantity, max_error(x, ref64), eager_error, bound)


def magnitude(x) -> float:
    """max(1, the largest finite |x|): what a quantity's rounding errors are relative to."""
    x = _numpy64(x)
    finite = x[np.isfinite(x)]
    return max(1.0, float(np.abs(finite).max())) if finite.size else 1.0


def check_kernel(kernel, spec, q, k, v, inputs: dict | None = None, *, grads: bool | None = None,
                 seed: int = 0) -> Report:
    """Compare ``kernel(q, k, v, **inputs)`` with the float64 reference under the rule above.

    The lse is checked too where the spec has one (softmax and top-k, not Nyström). Gradients are
    checked when ``grads`` (default: the kernel has a ``backward``); that needs torch tensors.
    """
    spec = load_spec(spec)
    inputs = dict(inputs or {})
    dtype = _dtype_name(q)
    has_lse = spec.normalize in ("softmax", "topk") and not (
        spec.lowrank is not None and spec.lowrank.method == "nystrom")
    notes = []
    ref = reference(spec, q, k, v, return_lse=has_lse, **inputs)
    eager, note = eager_attend(spec, q, k, v, inputs, has_lse)
    notes += [note] if note else []
    got = kernel(q, k, v, return_lse=has_lse, **inputs)
    if has_lse:
        checks = [judge("out", got[0], eager[0], ref[0], dtype),
                  judge("lse", got[1], eager[1], ref[1], dtype)]
    else:
        checks = [judge("out", got, eager, ref, dtype)]
    if grads is None:
        grads = getattr(kernel, "backward", None) is not None
    if grads:
        from attncc.testing.gradients import gradient_checks

        checks += gradient_checks(kernel, spec, q, k, v, inputs, dtype, seed)
    sizes = {"batch": q.shape[0], "heads": q.shape[1], "kv_heads": k.shape[1],
             "seq_q": q.shape[2], "seq_k": k.shape[2], "head_dim": q.shape[3],
             "value_dim": v.shape[3]}
    return Report(spec.name, getattr(kernel, "backend", type(kernel).__name__), dtype, sizes,
                  tuple(checks), tuple(notes))


def eager_attend(spec, q, k, v, inputs: dict, return_lse: bool):
    """``attend`` in the inputs' dtype; where that library cannot run it (pinv in half precision),
    in float32 instead. Returns ``(result, note or None)``."""
    try:
        return attend(spec, q, k, v, inputs, return_lse=return_lse), None
    except (TypeError, RuntimeError, NotImplementedError) as err:
        xp = array_api_compat.array_namespace(q)
        wide = [xp.astype(x, xp.float32) for x in (q, k, v)]
        ins = {n: (xp.astype(x, xp.float32) if spec.inputs[n].is_float else x)
               for n, x in inputs.items()}
        note = (f"eager {_dtype_name(q)} failed ({type(err).__name__}: {str(err)[:80]}); "
                "eager error measured in float32")
        return attend(spec, *wide, ins, return_lse=return_lse), note


def _dtype_name(x) -> str:
    return str(x.dtype).removeprefix("torch.")


def _numpy64(x) -> np.ndarray:
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)
