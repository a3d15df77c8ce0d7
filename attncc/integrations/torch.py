"""attncc as a drop-in for ``torch.nn.functional.scaled_dot_product_attention``, and an nn.Module.

``sdpa(spec)`` returns ``fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
scale=None, enable_gqa=False, **inputs)`` with SDPA's layout ``(B, H, N, D)`` and keywords:

- ``scale=`` replaces the spec's scale (a kernel is compiled per distinct scale and cached);
- ``is_causal=True`` adds ``kv_idx <= q_idx`` to the spec's mask (top-left aligned, as SDPA);
- ``enable_gqa=False`` with fewer key/value heads than query heads is an error, as in SDPA;
- ``attn_mask`` and ``dropout_p > 0`` are refused with an InputError: write the mask in the spec.

Extra keyword arguments are the spec's runtime inputs (``slope=...``). Gradients flow through the
compiled kernel's autograd. Under ``torch.compile`` the call is the kernel's ``torch.library`` op
(``attncc.integrations.ops``), its key found at trace time by an
``assume_constant_result`` function, so a model compiles with ``fullgraph=True``.
"""

from __future__ import annotations

import torch
from torch import nn

from attncc.errors import InputError
from attncc.spec.load import load_spec

__all__ = ["AttnccAttention", "sdpa"]

_CAUSAL = "kv_idx <= q_idx"


def and_mask(source: dict, terms: list[str], bools: dict | None = None) -> dict:
    """A copy of the spec ``source`` whose mask is its own ANDed with ``terms``, declaring
    ``bools`` (input name -> shape) as bool inputs. The integrations' spec variants use it."""
    source = dict(source)
    if bools:
        source["inputs"] = {**(source.get("inputs") or {}),
                            **{name: {"shape": shape, "dtype": "bool"}
                               for name, shape in bools.items()}}
    terms = ([f"({source['mask']})"] if source.get("mask") else []) + list(terms)
    if terms:
        source["mask"] = " and ".join(terms)
    return source


def _variant(spec, is_causal: bool, scale: float | None):
    """The spec with ``is_causal`` / ``scale`` folded in (itself when they change nothing)."""
    source = dict(spec.source)
    if is_causal and not spec.is_causal:
        source = {**and_mask(source, [_CAUSAL]), "name": f"{spec.name}_causal"}
    if scale is not None:
        source["scale"] = repr(float(scale))
    return spec if source == spec.source else load_spec(source)


def sdpa(spec, *, backend: str = "torch", config: dict | None = None):
    """A function with SDPA's keyword interface computing ``spec`` (see the module docstring)."""
    from attncc.api import compile as compile_spec
    from attncc.integrations.ops import OpTable, op

    spec = load_spec(spec)
    kernels: dict = {}
    ops = OpTable()

    @torch.compiler.assume_constant_result
    def _op(is_causal: bool, scale) -> str:
        key = f"causal_{is_causal}_scale_{scale!r}".replace(".", "_").replace("-", "m")
        if not hasattr(ops, key):
            setattr(ops, key, op(_variant(spec, is_causal, scale), backend=backend,
                                 config=config))
        return key

    def attention(query, key, value, attn_mask=None, dropout_p: float = 0.0,
                  is_causal: bool = False, scale: float | None = None,
                  enable_gqa: bool = False, **inputs):
        if attn_mask is not None:
            raise InputError(f"attn_mask: attncc takes its mask from the spec '{spec.name}' "
                             f"(mask: {spec.source.get('mask', 'none')}); expected None, got "
                             f"{type(attn_mask).__name__}")
        if dropout_p:
            raise InputError(f"dropout_p: attncc kernels have no dropout; expected 0.0, got "
                             f"{dropout_p}")
        for name, x in (("query", query), ("key", key), ("value", value)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise InputError(f"{name}: expected a 4-D tensor (B, H, N, D), got {got}")
        if not enable_gqa and key.shape[1] != query.shape[1]:
            raise InputError(f"key: {key.shape[1]} heads for {query.shape[1]} query heads needs "
                             "enable_gqa=True")
        variant_key = (bool(is_causal), None if scale is None else float(scale))
        if torch.compiler.is_compiling():
            return getattr(ops, _op(*variant_key))(query, key, value, **inputs)
        if variant_key not in kernels:
            kernels[variant_key] = compile_spec(_variant(spec, *variant_key), backend=backend,
                                                config=config)
        return kernels[variant_key](query, key, value, **inputs)

    attention.__name__ = f"attncc_sdpa_{spec.name}"
    attention.__doc__ = f"SDPA-compatible attention computing the attncc spec '{spec.name}'."
    attention.spec = spec
    return attention


def own_inputs(module: nn.Module, spec, params: dict, device=None) -> tuple[str, ...]:
    """Register the spec inputs in ``params`` on ``module``: floating tensors as parameters,
    integer/bool ones as buffers. Returns their names; InputError for a name the spec lacks."""
    unknown = sorted(set(params) - set(spec.inputs))
    if unknown:
        raise InputError(f"unexpected input '{unknown[0]}'; the spec '{spec.name}' takes: "
                         f"{', '.join(sorted(spec.inputs)) or 'none'}")
    for name, value in params.items():
        value = torch.as_tensor(value, device=device)
        if value.is_floating_point():
            module.register_parameter(name, nn.Parameter(value))
        else:
            module.register_buffer(name, value)
    return tuple(params)


def owned_inputs(module: nn.Module, names: tuple[str, ...], inputs: dict) -> dict:
    """The call's spec inputs: the tensors ``module`` owns (``own_inputs``) overridden by the
    call-time ``inputs`` of the same name."""
    return {**{name: getattr(module, name) for name in names}, **inputs}


class AttnccAttention(nn.Module):
    """``forward(query, key, value, **inputs)`` computing ``spec`` with its learned inputs owned.

    Keyword tensors given at construction become ``nn.Parameter`` (floating: ALiBi slopes, bias
    tables, memory tokens, additive weights) or buffers (integer/bool); call-time inputs of the
    same name override them. ``is_causal`` and ``scale`` are as in ``sdpa``.
    """

    def __init__(self, spec, *, backend: str = "torch", config: dict | None = None,
                 is_causal: bool = False, scale: float | None = None, **params):
        super().__init__()
        self.fn = sdpa(spec, backend=backend, config=config)
        self.spec = self.fn.spec
        self.is_causal, self.scale = is_causal, scale
        self._owned = own_inputs(self, self.spec, params)

    def forward(self, query, key, value, **inputs):
        return self.fn(query, key, value, is_causal=self.is_causal, scale=self.scale,
                       enable_gqa=key.shape[1] != query.shape[1],
                       **owned_inputs(self, self._owned, inputs))

    def extra_repr(self) -> str:
        return f"spec={self.spec.name!r}, owned={list(self._owned)}"
