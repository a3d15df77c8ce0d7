"""Hugging Face transformers: ``attn_implementation="attncc"`` runs a model's attention on attncc.

``register(name="attncc", spec=None)`` registers, under one name, an attention function
(``transformers.AttentionInterface``) and its mask function (``AttentionMaskInterface``); then
``from_config(..., attn_implementation=name)`` or ``model.set_attn_implementation(name)`` works.

The mask function does not build an N×N tensor. It hands the attention function an ``AttnccMask``
that says what the model asked for, and the attention function turns that into a spec:

- causal (``kv_idx <= q_idx + shift``), bidirectional, causal sliding window
  (``q_idx + shift - kv_idx < window``) and bidirectional sliding window
  (``abs(q_idx + shift - kv_idx) <= window``) are recognised from transformers' own mask functions;
  ``shift = q_offset - kv_offset`` is written ``seq_k - seq_q`` (bottom-right, KV-cache decoding)
  when it equals that, so one compiled kernel serves every decoding step;
- padding becomes the input ``hf_keep (batch, seq_k)`` bool: O(N), and the block plan classifies it
  per block from its min/max;
- a mask function it does not recognise (packed sequences, chunked or blockwise overlays,
  custom ``or``/``and`` functions) falls back to a dense input ``hf_allowed (batch, seq_q, seq_k)``
  built by transformers' ``sdpa_mask``: that is the one N² case. A 4-D tensor mask given by the
  caller is used as it is (bool: kept pairs; float: an additive bias, as in eager).

Gemma-2's ``softcap`` kwarg becomes ``score_mod: softcap * tanh(score / softcap)``; ``scaling``
becomes the spec's scale. With a ``spec``, that spec's mask and score_mod replace the model's
pattern; the model still supplies its scaling (unless the spec sets ``scale``) and its padding
(ANDed in as ``hf_keep``). Query rows with no kept key output 0 (eager averages over every key
there); such rows are padding and never reach a real token.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from dataclasses import dataclass

import torch

from attncc.errors import InputError
from attncc.integrations.torch import and_mask
from attncc.spec.load import load_spec

__all__ = ["AttnccMask", "StatsRecorder", "attention_function", "mask_function", "record_stats",
           "register"]

_BUILTIN = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3",
            "flash_attention_4", "paged|eager")


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

    leaves, todo = [], [fn]
    while todo:
        f = todo.pop()
        if getattr(f, "__qualname__", "") == "and_masks.<locals>.and_mask":
            todo.extend(_closure(f, "mask_functions") or ())
        else:
            leaves.append(f)
    causal, causal_window, sym_window = False, None, None
    for f in leaves:
        name = getattr(f, "__qualname__", "")
        if f is mu.causal_mask_function:
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


def mask_function(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                  mask_function=None, attention_mask=None, use_vmap: bool = False,
                  device="cpu", **kwargs) -> AttnccMask:
    """transformers' mask interface for attncc: returns an ``AttnccMask`` (see module docstring)."""
    from transformers import masking_utils as mu

    fn = mask_function if mask_function is not None else mu.causal_mask_function
    shift = int(q_offset) - int(kv_offset)
    pattern = _pattern(fn)
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


def _from_tensor(mask, module, is_causal, sliding_window, query, key):
    """An ``AttnccMask`` (or a float bias) for a mask that did not come from ``mask_function``."""
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


def _pos(shift, seq_q, seq_k) -> str:
    """The key position of query row ``q_idx``: ``seq_k - seq_q`` is written symbolically (one
    kernel for every decoding step)."""
    if shift == seq_k - seq_q and shift:
        return "q_idx + seq_k - seq_q"
    return f"q_idx + {int(shift)}" if shift else "q_idx"


def _variant(spec, causal: bool, window, pos: str, reads: tuple[str, ...], scaling, softcap):
    """The spec source of one call, from its structure only (no tensor, no size): ``reads``
    names the ``hf_`` tensors the call passes (``hf_allowed``, ``hf_keep``, ``hf_bias``)."""
    terms, bools = [], {}
    if spec is None:
        source = {"attncc": 1, "name": "hf_attention", "constants": {}, "inputs": {}}
        if "hf_allowed" in reads:
            terms.append("hf_allowed[b, q_idx, kv_idx]")
            bools["hf_allowed"] = ["batch", "seq_q", "seq_k"]
        else:
            if causal:
                terms.append(f"kv_idx <= {pos}")
            if window is not None:
                source["constants"]["hf_window"] = int(window)
                terms.append(f"{pos} - kv_idx < hf_window" if causal
                             else f"abs({pos} - kv_idx) <= hf_window")
        mods = "score"
        if softcap is not None:
            source["constants"]["hf_softcap"] = float(softcap)
            mods = "hf_softcap * tanh(score / hf_softcap)"
        if "hf_bias" in reads:
            mods = f"{mods} + hf_bias[b, q_idx, kv_idx]"
            source["inputs"]["hf_bias"] = {"shape": ["batch", "seq_q", "seq_k"],
                                           "dtype": "float32"}
        if mods != "score":
            source["score_mod"] = mods
    else:
        source = json.loads(json.dumps(spec.source, default=str))
    if "hf_keep" in reads:
        terms.append("hf_keep[b, kv_idx]")
        bools["hf_keep"] = ["batch", "seq_k"]
    source = and_mask(source, terms, bools)
    if scaling is not None and (spec is None or "scale" not in spec.source):
        source["scale"] = repr(float(scaling))
    return source


def attention_function(spec=None, *, backend: str = "torch", config: dict | None = None,
                       inputs: dict | None = None):
    """transformers' attention interface for attncc, computing ``spec`` or the model's pattern.

    ``inputs`` are the spec's runtime tensors (moved to the query's device on each call). The
    function returns ``(attn_output (batch, seq_q, heads, value_dim), weights)``: weights None,
    or with ``output_attentions`` the exact maps ``(batch, heads, seq_q, seq_k)`` of the spec
    that runs (``Kernel.attention_map``, in the query's dtype; eager only), at no cost otherwise.

    Eager calls run the compiled kernel directly. Under ``torch.compile`` the kernel is built by
    ``_op`` (``torch.compiler.assume_constant_result``: dynamo calls it at trace time and keeps
    only its key, never tracing attncc's Python) and the call is the ``attncc::attention``
    library op of ``attncc.integrations.ops``, so the model compiles with ``fullgraph=True``.
    """
    from attncc.api import compile as compile_spec
    from attncc.integrations.ops import op

    spec = load_spec(spec) if spec is not None else None
    fixed = dict(inputs or {})
    clash = sorted(n for n in fixed if n.startswith("hf_"))
    if clash:
        raise InputError(f"inputs: names starting with 'hf_' are attncc's own; got '{clash[0]}'")
    sources: dict = {}  # key (the source as JSON) -> source; then its kernel, its op
    kernels: dict = {}
    ops: dict = {}

    def source_key(*structure) -> str:
        source = _variant(spec, *structure)
        key = json.dumps(source, sort_keys=True, default=str)
        sources.setdefault(key, source)
        return key

    @torch.compiler.assume_constant_result
    def _op(*structure) -> str:
        key = source_key(*structure)
        if key not in ops:
            ops[key] = op(load_spec(sources[key]), backend=backend, config=config)
        return key

    def attncc_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                         scaling=None, sliding_window=None, softcap=None, is_causal=None,
                         **kwargs):
        if dropout:
            raise InputError(f"dropout: attncc kernels have no attention dropout; expected 0.0, "
                             f"got {dropout} (set the config's attention dropout to 0)")
        if kwargs.get("s_aux") is not None:
            raise InputError("s_aux: attention sinks are not supported by the transformers "
                             "integration; write them in a spec")
        bias = None
        if isinstance(attention_mask, AttnccMask):
            mask = attention_mask
        else:
            mask, bias = _from_tensor(attention_mask, module, is_causal, sliding_window, query,
                                      key)
        hf = {"hf_allowed": mask.allowed,
              "hf_keep": mask.keep if mask.allowed is None else None, "hf_bias": bias}
        hf = {n: t for n, t in hf.items() if t is not None}
        structure = (mask.causal, mask.window, _pos(mask.shift, query.shape[2], key.shape[2]),
                     tuple(sorted(hf)), None if scaling is None else float(scaling),
                     None if softcap is None else float(softcap))
        call = {**{n: t.to(query.device) for n, t in fixed.items()}, **hf}
        weights = None
        if torch.compiler.is_compiling():
            out = ops[_op(*structure)](query, key, value, **call)
        else:
            cache_key = source_key(*structure)
            if cache_key not in kernels:
                kernels[cache_key] = compile_spec(load_spec(sources[cache_key]),
                                                  backend=backend, config=config)
            kernel, recorder = kernels[cache_key], attncc_attention.recorder
            if recorder is not None:  # record_stats: per-row statistics, no map
                out, found = kernel(query, key, value, stats=recorder.names, **call)
                recorder.layers.append((getattr(module, "layer_idx", None), found))
            else:
                out = kernel(query, key, value, **call)
            if kwargs.get("output_attentions"):  # the exact maps of the spec that runs
                weights = kernel.attention_map(query, key, value, **call).to(query.dtype)
        return out.transpose(1, 2).contiguous(), weights

    attncc_attention.spec, attncc_attention.recorder = spec, None
    return attncc_attention


@dataclass
class StatsRecorder:
    """What ``record_stats`` collects: ``layers`` lists ``(layer_idx, {name: (batch, heads,
    seq_q)})`` per attention call, in call order (every layer of every generate() step)."""

    names: tuple
    layers: list


@contextlib.contextmanager
def record_stats(stats=("entropy", "mean_distance"), name: str = "attncc"):
    """``with record_stats(("entropy",)) as rec: model.generate(...)``: every eager call of the
    attention registered as ``name`` also returns the per-row statistics ``stats``
    (``attncc.lowering.requests``), appended to ``rec.layers``; no attention map is built."""
    from transformers import AttentionInterface

    try:
        function = AttentionInterface()[name]
    except KeyError:
        function = None
    if not hasattr(function, "recorder"):
        raise InputError(f"record_stats: '{name}' is not an attncc attention; call "
                         f"attncc.integrations.transformers.register({name!r}) first")
    recorder = StatsRecorder(tuple(stats), [])
    function.recorder = recorder
    try:
        yield recorder
    finally:
        function.recorder = None


def register(name: str = "attncc", spec=None, *, backend: str = "torch",
             config: dict | None = None, inputs: dict | None = None) -> str:
    """Register attncc's attention and mask functions under ``name``; returns ``name``.

    ``spec`` (anything ``load_spec`` takes) fixes the variant; None runs whatever the model asks
    for. Registering the same name again replaces the previous registration.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if not isinstance(name, str) or not name or name in _BUILTIN:
        raise InputError(f"name: expected a new implementation name (not one of transformers' "
                         f"own: {', '.join(_BUILTIN)}), got {name!r}")
    AttentionInterface.register(name, attention_function(spec, backend=backend, config=config,
                                                         inputs=inputs))
    AttentionMaskInterface.register(name, mask_function)
    return name
