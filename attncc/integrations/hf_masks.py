"""transformers' masks as attncc sees them: the mask function and its ``AttnccMask``.

The mask function does not build an N×N tensor. It hands the attention function an ``AttnccMask``
that says what the model asked for:

- causal (``kv_idx <= q_idx + shift``), bidirectional, causal sliding window
  (``q_idx + shift - kv_idx < window``) and bidirectional sliding window
  (``abs(q_idx + shift - kv_idx) <= window``) are recognised from transformers' own mask functions
  (``causal_mask_function``, ``bidirectional_mask_function``, the sliding-window overlays and
  ``and_masks`` of them); ``shift = q_offset - kv_offset``;
- padding becomes ``keep (batch, seq_k)`` bool: O(N);
- a mask function it does not recognise (packed sequences, chunked or blockwise overlays,
  custom ``or``/``and`` functions) falls back to a dense ``allowed (batch, seq_q, seq_k)`` built by
  transformers' ``sdpa_mask``: that is the one N² case.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from attncc.errors import InputError

__all__ = ["AttnccMask", "from_tensor", "mask_function"]


@dataclass(frozen=True)
class AttnccMask:
    """The mask a model asked for, as attncc's mask function hands it to the attention function.

    ``causal``: keys after the query position are dropped. ``window``: with ``causal``, keep
    ``q - kv < window``; without, keep ``|q - kv| <= window``. ``shift``: query row ``i`` sits at
    key position ``i + shift``. ``keep``: ``(batch, seq_k)`` bool padding, or None (no padding).
    ``allowed``: ``(batch, seq_q, seq_k)`` bool, only when the pattern was not recognised (then
    ``causal``/``window``/``keep`` are unused).
    """

    causal: bool
    window: int | None
    shift: int
    keep: torch.Tensor | None = None
    allowed: torch.Tensor | None = None


def _closure(fn, name: str):
    return inspect.getclosurevars(fn).nonlocals.get(name)


def _pattern(fn) -> tuple[bool, int | None] | None:
    """``(causal, window)`` for transformers' own mask functions; None for anything else."""
    from transformers import masking_utils as mu

    todo = [fn]  # and_masks nests: its leaves are read from its closure
    causal, causal_window, sym_window = False, None, None
    while todo:
        f = todo.pop()
        name = getattr(f, "__qualname__", "")
        if name == "and_masks.<locals>.and_mask":
            todo.extend(_closure(f, "mask_functions") or ())
        elif f is mu.causal_mask_function:
            causal = True
        elif f is mu.bidirectional_mask_function:
            continue
        elif name == "sliding_window_overlay.<locals>.inner_mask":
            causal_window = int(_closure(f, "sliding_window"))
        elif name == "sliding_window_bidirectional_overlay.<locals>.inner_mask":
            sym_window = int(_closure(f, "sliding_window"))
        else:
            return None
    if sym_window is not None:
        return None if (causal or causal_window is not None) else (False, sym_window)
    if causal_window is not None and not causal:
        return None
    return causal, causal_window


_constant_pattern = torch.compiler.assume_constant_result(_pattern)


def _compiled_pattern(fn, kwargs):
    """``_pattern`` under torch.compile, where dynamo cannot read a closure: the
    ``assume_constant_result`` copy runs at trace time on the function dynamo rebuilds from its
    closure's constants. Only for transformers' own factory functions (``allow_is_*_skip``: no
    overlay added, so no tensor in a closure) and not for chunked masks (whose closure holds the
    left-padding tensor); anything else takes the dense fallback."""
    if not (kwargs.get("allow_is_causal_skip") or kwargs.get("allow_is_bidirectional_skip")):
        return None
    chunked = getattr(kwargs.get("config"), "attention_chunk_size", None) is not None
    if chunked and "<locals>" in getattr(fn, "__qualname__", ""):
        return None
    return _constant_pattern(fn)


def mask_function(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                  mask_function=None, attention_mask=None, use_vmap: bool = False,
                  device="cpu", **kwargs) -> AttnccMask:
    """transformers' mask interface for attncc: returns an ``AttnccMask`` (see module docstring)."""
    from transformers import masking_utils as mu

    fn = mask_function if mask_function is not None else mu.causal_mask_function
    shift = int(q_offset) - int(kv_offset)
    pattern = _compiled_pattern(fn, kwargs) if torch.compiler.is_compiling() else _pattern(fn)
    if pattern is None:
        dense = mu.sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset,
                             mask_function=fn, attention_mask=attention_mask,
                             allow_is_causal_skip=False, use_vmap=use_vmap, device=device)
        allowed = dense[:, 0].expand(batch_size, q_length, kv_length).contiguous()
        return AttnccMask(causal=False, window=None, shift=shift, allowed=allowed)
    keep = None
    if attention_mask is not None:
        padding = mu.prepare_padding_mask(attention_mask.to(torch.bool), kv_length, kv_offset)
        padding = padding[:, int(kv_offset):int(kv_offset) + kv_length]
        # under torch.compile a data-dependent branch would break the graph: always pass it
        if torch.compiler.is_compiling() or not bool(padding.all()):
            keep = padding.expand(batch_size, kv_length).contiguous()
    return AttnccMask(causal=pattern[0], window=pattern[1], shift=shift, keep=keep)


def from_tensor(mask, module, is_causal, sliding_window, query, key):
    """``(AttnccMask, bias or None)`` for a mask that did not come from ``mask_function``: None
    (the module's ``is_causal``, bottom-right), or a 4-D tensor (bool: kept pairs; float: an
    additive bias ``(batch, seq_q, seq_k)``)."""
    batch, seq_q, seq_k = query.shape[0], query.shape[2], key.shape[2]
    if mask is None:
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
        return AttnccMask(causal=causal, window=sliding_window if causal else None,
                          shift=seq_k - seq_q), None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InputError(f"attention_mask: attncc expected its own mask, None, or a 4-D tensor "
                         f"(batch, 1, seq_q, seq_k), got {got}")
    full = mask[:, 0].expand(batch, seq_q, seq_k).contiguous()
    if full.dtype == torch.bool:
        return AttnccMask(causal=False, window=None, shift=0, allowed=full), None
    return AttnccMask(causal=False, window=None, shift=0), full
