"""Hugging Face transformers: ``attn_implementation="attncc"`` runs a model's attention on attncc.

``register(name="attncc", spec=None)`` registers, under one name, an attention function
(``transformers.AttentionInterface``) and its mask function (``AttentionMaskInterface``); then
``from_config(..., attn_implementation=name)`` or ``model.set_attn_implementation(name)`` works.

The mask function (``attncc.integrations.hf_masks``) does not build an N×N tensor: it hands the
attention function an ``AttnccMask`` (causal, window, shift, padding ``keep``, or a dense
``allowed`` for a pattern it does not recognise), which becomes a spec variant:

- the key position of query row ``q_idx`` is ``q_idx + shift``, written ``q_idx + seq_k - seq_q``
  (bottom-right, KV-cache decoding) when the shift equals that, so one compiled kernel serves
  every decoding step;
- padding becomes the input ``hf_keep (batch, seq_k)`` bool (the block plan classifies it per
  block from its min/max); a dense pattern the input ``hf_allowed (batch, seq_q, seq_k)``; a 4-D
  tensor mask given by the caller is used as it is (bool: kept pairs; float: an additive bias
  ``hf_bias``, as in eager).

Gemma-2's ``softcap`` kwarg becomes ``score_mod: softcap * tanh(score / softcap)``; ``scaling``
becomes the spec's scale. With a ``spec``, that spec's mask and score_mod replace the model's
pattern; the model still supplies its scaling (unless the spec sets ``scale``) and its padding
(ANDed in as ``hf_keep``). Query rows with no kept key output 0 (eager averages over every key
there); such rows are padding and never reach a real token.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

import torch

from attncc.errors import InputError
from attncc.integrations.hf_masks import AttnccMask, from_tensor, mask_function
from attncc.integrations.torch import and_mask
from attncc.spec.load import load_spec

__all__ = ["AttnccMask", "StatsRecorder", "Structure", "attention_function", "mask_function",
           "record_stats", "register"]

_BUILTIN = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3",
            "flash_attention_4", "paged|eager")


def _pos(shift, seq_q, seq_k) -> str:
    """The key position of query row ``q_idx``: ``seq_k - seq_q`` is written symbolically (one
    kernel for every decoding step)."""
    if shift == seq_k - seq_q and shift:
        return "q_idx + seq_k - seq_q"
    return f"q_idx + {int(shift)}" if shift else "q_idx"


class Structure(NamedTuple):
    """What one attention call's spec variant depends on, and nothing else (no tensor, no size):
    the kernel cache key. ``pos`` is ``_pos``'s key position text; ``reads`` the sorted names of
    the ``hf_`` tensors the call passes (``hf_allowed``, ``hf_bias``, ``hf_keep``); ``bias_dtype``
    the dtype name of ``hf_bias`` (else None)."""

    causal: bool
    window: int | None
    pos: str
    reads: tuple[str, ...]
    scaling: float | None
    softcap: float | None
    bias_dtype: str | None


def _variant(spec, s: Structure) -> dict:
    """The spec source of one call's structure ``s``: ``spec``'s (its mask ANDed with the
    padding) or, without one, the model's own pattern."""
    terms, bools = [], {}
    if spec is None:
        source = {"attncc": 1, "name": "hf_attention", "constants": {}, "inputs": {}}
        if "hf_allowed" in s.reads:
            terms.append("hf_allowed[b, q_idx, kv_idx]")
            bools["hf_allowed"] = ["batch", "seq_q", "seq_k"]
        else:
            if s.causal:
                terms.append(f"kv_idx <= {s.pos}")
            if s.window is not None:
                source["constants"]["hf_window"] = int(s.window)
                terms.append(f"{s.pos} - kv_idx < hf_window" if s.causal
                             else f"abs({s.pos} - kv_idx) <= hf_window")
        mods = "score"
        if s.softcap is not None:
            source["constants"]["hf_softcap"] = s.softcap
            mods = "hf_softcap * tanh(score / hf_softcap)"
        if "hf_bias" in s.reads:
            mods = f"{mods} + hf_bias[b, q_idx, kv_idx]"
            source["inputs"]["hf_bias"] = {"shape": ["batch", "seq_q", "seq_k"],
                                           "dtype": s.bias_dtype}
        if mods != "score":
            source["score_mod"] = mods
    else:
        source = json.loads(json.dumps(spec.source, default=str))
    if "hf_keep" in s.reads:
        terms.append("hf_keep[b, kv_idx]")
        bools["hf_keep"] = ["batch", "seq_k"]
    source = and_mask(source, terms, bools)
    if s.scaling is not None and (spec is None or "scale" not in spec.source):
        source["scale"] = repr(s.scaling)
    return source


_EAGER_ONLY: set = set()  # the eager-only requests already warned about under torch.compile


def _warn_eager_only(requests: tuple[str, ...]) -> None:
    for name in requests:
        if name not in _EAGER_ONLY:
            _EAGER_ONLY.add(name)
            warnings.warn(f"attncc: {name} needs eager mode; under torch.compile the attention "
                          "is the attncc::attention library op, which returns the output only "
                          "(no maps, no stats are recorded)", stacklevel=3)


def attention_function(spec=None, *, backend: str = "torch", config: dict | None = None,
                       inputs: dict | None = None):
    """transformers' attention interface for attncc, computing ``spec`` or the model's pattern.

    ``inputs`` are the spec's runtime tensors (moved to the query's device on each call). The
    function returns ``(attn_output (batch, seq_q, heads, value_dim), weights)``: weights None,
    or with ``output_attentions`` the exact maps ``(batch, heads, seq_q, seq_k)`` of the spec
    that runs (``Kernel.attention_map``, in the query's dtype; eager only), at no cost otherwise.

    Kernels are cached by the call's ``Structure`` (a tuple; a hit costs no spec work). Eager
    calls run the compiled kernel directly and count it in ``fn.served`` (a ``Counter`` of
    ``Structure``: which variants served how many calls). Under ``torch.compile`` the kernel is
    built by ``_op`` (``torch.compiler.assume_constant_result``: dynamo calls it at trace time
    and keeps only its key, never tracing attncc's Python) and the call is the function of
    ``attncc.integrations.ops.op`` (the ``attncc::attention`` library op, or where the torch
    backend's sdpa path serves the call, its plain torch ops), so the model compiles with
    ``fullgraph=True``; ``output_attentions`` and ``record_stats`` then warn once (eager only).
    """
    from attncc.api import compile as compile_spec
    from attncc.integrations.ops import OpTable, op

    spec = load_spec(spec) if spec is not None else None
    fixed = dict(inputs or {})
    clash = sorted(n for n in fixed if n.startswith("hf_"))
    if clash:
        raise InputError(f"inputs: names starting with 'hf_' are attncc's own; got '{clash[0]}'")
    kernels: dict = {}  # Structure -> compiled kernel (eager calls)
    ops, op_names = OpTable(), {}  # compiled calls: Structure -> "v<n>" -> op function

    @torch.compiler.assume_constant_result
    def _op(eager_only: tuple, *structure) -> str:
        _warn_eager_only(eager_only)
        if structure not in op_names:
            source = _variant(spec, Structure(*structure))
            op_names[structure] = name = f"v{len(op_names)}"
            setattr(ops, name, op(load_spec(source), backend=backend, config=config))
        return op_names[structure]

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
            mask, bias = from_tensor(attention_mask, module, is_causal, sliding_window, query,
                                     key)
        hf = {"hf_allowed": mask.allowed,
              "hf_keep": mask.keep if mask.allowed is None else None, "hf_bias": bias}
        hf = {n: t for n, t in hf.items() if t is not None}
        structure = (mask.causal, mask.window, _pos(mask.shift, query.shape[2], key.shape[2]),
                     tuple(sorted(hf)), None if scaling is None else float(scaling),
                     None if softcap is None else float(softcap),
                     None if bias is None else str(bias.dtype).removeprefix("torch."))
        call = {**{n: t.to(query.device) for n, t in fixed.items()}, **hf}
        if torch.compiler.is_compiling():
            eager_only = tuple(n for n, on in (
                ("output_attentions", bool(kwargs.get("output_attentions"))),
                ("record_stats", attncc_attention.recorder is not None)) if on)
            out = getattr(ops, _op(eager_only, *structure))(query, key, value, **call)
            return out.transpose(1, 2).contiguous(), None
        kernel = kernels.get(structure)
        if kernel is None:
            source = _variant(spec, Structure(*structure))
            kernel = kernels[structure] = compile_spec(load_spec(source), backend=backend,
                                                       config=config)
        attncc_attention.served[structure] += 1
        recorder, weights = attncc_attention.recorder, None
        if recorder is not None:  # record_stats: per-row statistics, no map
            out, found = kernel(query, key, value, stats=recorder.names, **call)
            recorder.layers.append((getattr(module, "layer_idx", None), found))
        else:
            out = kernel(query, key, value, **call)
        if kwargs.get("output_attentions"):  # the exact maps of the spec that runs
            weights = kernel.attention_map(query, key, value, **call).to(query.dtype)
        return out.transpose(1, 2).contiguous(), weights

    attncc_attention.spec, attncc_attention.recorder = spec, None
    attncc_attention.served = Counter()
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

    function = AttentionInterface().get(name)
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
