"""Checking a kernel call against its spec: tensor ranks, shapes, dtypes, devices and inputs.

Every backend and the reference call ``bind`` first, so a wrong call gets the same clear message
whichever runs it. Works on any array-API array (NumPy, torch).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import array_api_compat
import sympy

from attncc.errors import InputError
from attncc.spec.schema import Spec
from attncc.spec.symbols import SIZES, TENSORS

_LAYOUT = {name: "(" + ", ".join(map(str, shape)) + ")" for name, shape in TENSORS.items()}
_KINDS = {"float": "real floating", "int": "integral", "bool": "bool"}


@dataclass(frozen=True)
class Bound:
    """A checked call: ``sizes`` maps every size name to its int; ``inputs`` the named tensors;
    ``scale`` the spec's scale at these sizes."""

    sizes: dict[str, int]
    inputs: dict
    scale: float = 1.0

    @property
    def group(self) -> int:
        """Query heads per kv head (kv head of query head h is h // group)."""
        return self.sizes["heads"] // self.sizes["kv_heads"]


#: Checked call signatures (see ``bind``) -> (sizes, scale, names of 0-d inputs).
_CHECKED: dict = {}
_CHECKED_CAP = 512


def bind(spec: Spec, q, k, v, inputs: dict) -> Bound:
    """Check ``q, k, v`` and the keyword ``inputs`` against ``spec``; raise InputError if wrong.

    The message names the argument, what was expected and what was received. Every check reads
    only types, shapes, dtypes and devices, so a call whose signature (those of every tensor,
    and the spec's hash) passed before is bound from a cache (decoding: one check per length).
    """
    try:
        key = (spec.hash, *(_signature(x) for x in (q, k, v)),
               *((n, _signature(x)) for n, x in inputs.items()))
        found = _CHECKED.get(key)
    except (AttributeError, TypeError):  # not arrays, or symbolic shapes: no cache
        return _bind(spec, q, k, v, inputs)
    if found is None:
        bound = _bind(spec, q, k, v, inputs)
        if len(_CHECKED) >= _CHECKED_CAP:
            _CHECKED.clear()
        _CHECKED[key] = (dict(bound.sizes), bound.scale,
                         tuple(n for n, x in inputs.items() if not x.shape))
        return bound
    sizes, scale, scalars = found
    given = {n: x[None] if n in scalars else x for n, x in inputs.items()}
    return Bound(dict(sizes), {n: given[n] for n in spec.inputs}, scale)


def _signature(x) -> tuple:
    """What ``bind`` checks of one tensor (AttributeError for anything without a shape)."""
    return type(x), tuple(x.shape), x.dtype, getattr(x, "device", None)


def _bind(spec: Spec, q, k, v, inputs: dict) -> Bound:
    """``bind`` without the cache."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not array_api_compat.is_array_api_obj(x):
            raise InputError(f"{name}: expected an array or tensor {_LAYOUT[name]}, got "
                             f"{type(x).__name__}")
        if len(x.shape) != 4:
            raise InputError(f"{name}: expected 4 dimensions {_LAYOUT[name]}, got shape "
                             f"{tuple(x.shape)}")
        if not _has_kind(x, "float"):
            raise InputError(f"{name}: expected a floating dtype, got {x.dtype}")
    batch, heads, seq_q, head_dim = q.shape
    kv_batch, kv_heads, seq_k, value_dim = v.shape
    kv_batch = 1 if kv_batch == 1 and k.shape[0] == 1 else batch  # a KV cache shared by batch
    expected = {"k": (kv_batch, kv_heads, seq_k, head_dim),
                "v": (kv_batch, kv_heads, seq_k, value_dim)}
    if tuple(k.shape) != expected["k"] or tuple(v.shape) != expected["v"]:
        raise InputError(f"k: expected shape {expected['k']} {_LAYOUT['k']} to match q "
                         f"{tuple(q.shape)} and v {tuple(v.shape)}, got {tuple(k.shape)}")
    if 0 in (batch, heads, seq_q, seq_k, head_dim, value_dim):
        raise InputError(f"q, k, v: every size must be at least 1, got q {tuple(q.shape)}, "
                         f"v {tuple(v.shape)}")
    devices = [getattr(x, "device", None) for x in (q, k, v)]
    if devices[1] != devices[0] or devices[2] != devices[0]:
        raise InputError(f"q, k, v: expected one device, got {devices[0]}, {devices[1]}, "
                         f"{devices[2]}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise InputError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if heads % kv_heads:
        raise InputError(f"k: kv_heads ({kv_heads}) must divide the query heads ({heads})")
    sizes = {"batch": batch, "heads": heads, "kv_heads": kv_heads, "seq_q": seq_q,
             "seq_k": seq_k, "head_dim": head_dim, "value_dim": value_dim}
    for name, fixed in fixed_sizes(spec).items():
        if fixed is not None and fixed != sizes[name]:
            raise InputError(f"the spec '{spec.name}' fixes {name} = {fixed}; the tensors have "
                             f"{sizes[name]} (q {tuple(q.shape)}, v {tuple(v.shape)})")
    if spec.lowrank is not None and spec.lowrank.method == "nystrom":
        m = spec.lowrank.size
        if seq_q % m or seq_k % m:
            raise InputError(f"nystrom with {m} landmarks needs seq_q and seq_k divisible by "
                             f"{m}; got seq_q {seq_q}, seq_k {seq_k}")
    return Bound(sizes, _check_inputs(spec, inputs, sizes, q),
                 _scale(spec.scale, tuple(sizes.items())))


def fixed_sizes(spec: Spec) -> dict:
    """The sizes the spec fixes: name -> int, or None where the call decides."""
    return {"heads": spec.heads, "kv_heads": spec.kv_heads or spec.heads,
            "head_dim": spec.head_dim, "value_dim": spec.value_dim or spec.head_dim}


def shared_kv(q, k, v):
    """``(k, v)`` broadcast to q's batch where they have batch 1 (a KV cache shared by every
    batch entry, as bind allows): views with batch stride 0, never copies."""
    if k.shape[0] == q.shape[0]:
        return k, v
    xp = namespace(q)
    return tuple(xp.broadcast_to(x, (q.shape[0], *x.shape[1:])) for x in (k, v))


def _at(expr, sizes: tuple):
    """``expr`` (a sympy expression of the sizes) at ``sizes`` (name, value) pairs.

    Cached on the sizes the expression reads, so a decoding step (seq_k one longer each call)
    finds ``1/sqrt(head_dim)`` cached, and a lone size symbol or a number is read directly."""
    if isinstance(expr, sympy.Symbol):
        value = dict(sizes).get(expr.name)
        if value is not None:
            return sympy.Integer(value)
    if isinstance(expr, sympy.Number):
        return expr
    return _subs(expr, tuple(item for item in sizes if SIZES[item[0]] in _free(expr)))


def _scale(expr, sizes: tuple) -> float:
    """The spec's scale at ``sizes`` as a float (cached like ``_at``); InputError where it is
    not a finite real number."""
    return _float(expr, tuple(item for item in sizes if SIZES[item[0]] in _free(expr)))


@functools.lru_cache(maxsize=1024)
def _float(expr, sizes: tuple) -> float:
    scale = _subs(expr, sizes)
    if not (scale.is_real and scale.is_finite):
        raise InputError(f"scale {expr} is {scale} at these sizes ({dict(sizes)}); expected a "
                         "finite real number")
    return float(scale)


@functools.lru_cache(maxsize=1024)
def _free(expr) -> frozenset:
    return frozenset(sympy.sympify(expr).free_symbols)


@functools.lru_cache(maxsize=1024)
def _subs(expr, sizes: tuple):
    return sympy.sympify(expr).subs({SIZES[name]: value for name, value in sizes})


def _check_inputs(spec: Spec, given: dict, sizes: dict, q) -> dict:
    extra = sorted(set(given) - set(spec.inputs))
    if extra:
        known = ", ".join(sorted(spec.inputs)) or "none"
        raise InputError(f"unexpected input '{extra[0]}'; the spec '{spec.name}' takes: {known}")
    at = tuple(sizes.items())
    device = getattr(q, "device", None)
    result = {}
    for name, decl in spec.inputs.items():
        if name not in given or given[name] is None:
            raise InputError(f"missing input '{name}': expected shape "
                             f"{[str(d) for d in decl.shape]}, dtype {decl.dtype}")
        x = given[name]
        if not array_api_compat.is_array_api_obj(x):
            raise InputError(f"{name}: expected an array or tensor, got {type(x).__name__}")
        if array_api_compat.is_torch_array(q) != array_api_compat.is_torch_array(x):
            raise InputError(f"{name}: expected the same kind of array as q "
                             f"({type(q).__name__}), got {type(x).__name__}")
        shape = tuple(int(_at(d, at)) for d in decl.shape)
        if tuple(x.shape) != shape:
            raise InputError(f"{name}: expected shape {shape} "
                             f"({', '.join(str(d) for d in decl.shape)}), got {tuple(x.shape)}")
        kind = "float" if decl.is_float else ("bool" if decl.dtype == "bool" else "int")
        if not _has_kind(x, kind):
            raise InputError(f"{name}: expected a {kind} dtype ({decl.dtype}), got {x.dtype}")
        if device is not None and getattr(x, "device", device) != device:
            raise InputError(f"{name}: expected device {device} like q, got {x.device}")
        # a 0-d input is read as name[0]: a one-element view (no copy)
        result[name] = x[None] if not shape else x
    return result


def _has_kind(x, kind: str) -> bool:
    return namespace(x).isdtype(x.dtype, _KINDS[kind])


_NAMESPACES: dict = {}


def namespace(x):
    """``array_api_compat.array_namespace(x)``, looked up once per array type."""
    xp = _NAMESPACES.get(type(x))
    if xp is None:
        xp = _NAMESPACES[type(x)] = array_api_compat.array_namespace(x)
    return xp
