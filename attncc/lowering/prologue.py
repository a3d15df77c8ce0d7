"""The call prologue every backend runs before its lowering: one function, one set of messages.

``prologue(spec, q, k, v, inputs, ...)``:

1. array kind: every tensor must be of the backend's ``library`` (``numpy`` arrays or ``torch``
   tensors), with a message naming the argument, what was received and how to convert it;
2. ``attncc.bind.bind``: ranks, shapes, dtypes, devices and the spec's declared inputs;
3. the compute dtype (``COMPUTE``): float16, bfloat16 and float32 compute in float32, float64 in
   float64; a backend lists the input dtypes it computes (``dtypes``);
4. the lse rule: ``return_lse`` only where the lowering has a log-sum-exp
   (``attncc.lowering.requests.has_lse``: softmax and top-k; not sigmoid, linear or Nyström);
5. casts: q, k, v and the floating inputs to the compute dtype (no copy when already there).

It returns a frozen ``Call``. The Triton generator uses ``COMPUTE`` for its accumulator type.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import array_api_compat

from attncc.bind import Bound, bind, namespace, shared_kv
from attncc.errors import InputError
from attncc.ir.graph import Nystrom
from attncc.lowering.requests import has_lse, node_kind

__all__ = ["COMPUTE", "Call", "dtype_name", "prologue"]

#: Input dtype name -> compute (accumulation) dtype name.
COMPUTE = {"float16": "float32", "bfloat16": "float32", "float32": "float32",
           "float64": "float64"}

_LIBRARIES = {
    "numpy": (array_api_compat.is_numpy_array, "NumPy arrays",
              "convert it (e.g. x.numpy()) or compile with backend='torch'"),
    "torch": (array_api_compat.is_torch_array, "torch tensors",
              "convert it (e.g. torch.from_numpy(x)) or compile with backend='numpy'"),
}


@dataclass(frozen=True, kw_only=True)
class Call(Bound):
    """A checked call: its ``Bound`` sizes and scale; ``q, k, v`` and ``inputs`` (floating ones)
    in the compute dtype (unless cast=False); ``raw_inputs`` the inputs as given (the plan reads
    them); ``dtype`` the caller's dtype (outputs go back to it)."""

    q: object
    k: object
    v: object
    raw_inputs: dict
    dtype: object


@functools.lru_cache(maxsize=64)
def dtype_name(dtype) -> str:
    """``float32`` for ``numpy.float32`` and ``torch.float32`` alike."""
    return str(dtype).removeprefix("torch.")


def prologue(spec, node, q, k, v, inputs: dict, *, backend: str, library: str,
             dtypes=tuple(COMPUTE), return_lse: bool = False, cast: bool = True) -> Call:
    """Check and cast one call; raise InputError with the argument's name if anything is wrong.

    ``spec`` gives the declared inputs, ``node`` is the graph's attention node (the lse rule
    reads it); ``library``: numpy | torch, the array kind the ``backend`` takes; ``dtypes``: the
    input dtype names it computes; ``cast=False`` leaves q, k, v and the inputs as given (a
    backend whose kernels take the input dtype and accumulate in its ``COMPUTE`` dtype).
    """
    is_kind, kind, hint = _LIBRARIES[library]
    for name, x in (("q", q), ("k", k), ("v", v), *inputs.items()):
        if x is not None and not is_kind(x):
            raise InputError(f"{name}: the {backend} backend takes {kind}, got "
                             f"{type(x).__module__}.{type(x).__name__}; {hint}")
    bound = bind(spec, q, k, v, inputs)
    k, v = shared_kv(q, k, v)
    name = dtype_name(q.dtype)
    if name not in dtypes:
        listed = ", ".join(dtypes[:-1]) + f" and {dtypes[-1]}"
        raise InputError(f"q: the {backend} backend computes {listed}, got {q.dtype}")
    normalize = getattr(node, "normalize", "linear")  # LinearAttention and Nystrom have none
    if return_lse and not has_lse(node_kind(node), normalize):
        has = "low-rank nystrom" if isinstance(node, Nystrom) else f"normalize {normalize}"
        raise InputError(f"return_lse: the log-sum-exp exists for normalize softmax and topk "
                         f"(not low-rank nystrom); this spec has {has}")
    if not cast:
        return Call(bound.sizes, bound.inputs, bound.scale, q=q, k=k, v=v,
                    raw_inputs=bound.inputs, dtype=q.dtype)
    xp = namespace(q)
    ct = getattr(xp, COMPUTE[name])

    def cast(x):  # no call at all where the dtype is right (the common case, per call)
        return x if x.dtype == ct else xp.astype(x, ct, copy=False)

    floats = {n: (cast(x) if spec.inputs[n].is_float else x) for n, x in bound.inputs.items()}
    return Call(bound.sizes, floats, bound.scale, q=cast(q), k=cast(k), v=cast(v),
                raw_inputs=bound.inputs, dtype=q.dtype)
