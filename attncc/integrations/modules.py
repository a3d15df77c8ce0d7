"""``MultiheadAttention``: an ``nn.Module`` owning its projections, running any attncc spec.

Like ``torch.nn.MultiheadAttention`` (``batch_first=True`` layout ``(batch, seq, embed)``) but the
attention is the spec's, computed by the ``attncc::attention`` library op (``ops.py``), so the
module runs under autograd and ``torch.compile(fullgraph=True)``. Grouped-query attention comes
from ``kv_heads``; the spec's learned inputs (ALiBi slopes, bias tables, memory tokens) are owned
as parameters when given at construction.

Bool masks, against SDPA's convention and nn.MultiheadAttention's:

=====================  ====================================  ====================================
argument               attncc (this module)                  torch
=====================  ====================================  ====================================
``attn_mask`` bool     True = the pair takes part (= SDPA)   nn.MultiheadAttention: True = masked
``key_padding_mask``   True = padding, ignored (= nn.MHA)    SDPA has none
spec ``mask``          true = the pair takes part (= SDPA)
=====================  ====================================  ====================================

Both masks are ANDed with the spec's mask. ``key_padding_mask`` ``(batch, seq_k)`` becomes an
O(N) input the block plan classifies per block; ``attn_mask`` ``(seq_q, seq_k)`` or
``(batch, seq_q, seq_k)`` is a dense input (write a pattern in the spec where you can). A query
row whose keys are all removed outputs 0 (SDPA gives NaN there).
"""

from __future__ import annotations

import torch
from torch import nn

from attncc.errors import InputError
from attncc.spec.load import load_spec

from .ops import op
from .torch import and_mask, own_inputs, owned_inputs

__all__ = ["MultiheadAttention"]

_DENSE_SPEC = {"attncc": 1, "name": "dense", "doc": "plain softmax attention over every key"}
_PAD = ("mha_keep", "mha_keep[b, kv_idx]", ["batch", "seq_k"])
_DENSE = ("mha_allowed", "mha_allowed[b, q_idx, kv_idx]", ["batch", "seq_q", "seq_k"])


def _with_masks(spec, extra):
    """The spec with the masks named in ``extra`` ANDed into its mask, as bool inputs."""
    if not extra:
        return spec
    for name, _, _ in extra:
        if name in spec.inputs:
            raise InputError(f"inputs: '{name}' is the module's own input name; rename the "
                             f"spec's input")
    source = and_mask(spec.source, [term for _, term, _ in extra],
                      {name: shape for name, _, shape in extra})
    return load_spec({**source, "name": f"{spec.name}_{'_'.join(n for n, _, _ in extra)}"})


class MultiheadAttention(nn.Module):
    """``forward(query, key=None, value=None, key_padding_mask=None, attn_mask=None, **inputs)
    -> (out (batch, seq_q, embed_dim), None)``.

    ``key``/``value`` default to ``query`` (self-attention); ``kdim``/``vdim`` are their feature
    sizes. ``spec`` defaults to plain softmax attention. The second result is always None:
    attncc kernels never form the attention matrix.
    Keyword tensors at construction become parameters (floating) or buffers; call-time inputs of
    the same name override them.
    """

    def __init__(self, embed_dim: int, num_heads: int, spec=None, *,
                 kv_heads: int | None = None, kdim: int | None = None,
                 vdim: int | None = None, bias: bool = True, backend: str = "torch",
                 config: dict | None = None, device=None, dtype=None, **params):
        super().__init__()
        kv_heads = kv_heads or num_heads
        if embed_dim % num_heads or num_heads % kv_heads:
            raise InputError(f"expected num_heads ({num_heads}) to divide embed_dim "
                             f"({embed_dim}) and kv_heads ({kv_heads}) to divide num_heads")
        self.embed_dim, self.num_heads, self.kv_heads = embed_dim, num_heads, kv_heads
        self.head_dim = embed_dim // num_heads
        self.spec = load_spec(spec if spec is not None else _DENSE_SPEC)
        kw = {"bias": bias, "device": device, "dtype": dtype}
        kv_width = kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, **kw)
        self.k_proj = nn.Linear(kdim or embed_dim, kv_width, **kw)
        self.v_proj = nn.Linear(vdim or embed_dim, kv_width, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, **kw)
        self._owned = own_inputs(self, self.spec, params, device)
        # every mask combination is compiled now, so forward never compiles (no graph break)
        self._ops = {(pad, dense): op(_with_masks(self.spec, [_PAD] * pad + [_DENSE] * dense),
                                      backend=backend, config=config)
                     for pad in (False, True) for dense in (False, True)}

    def forward(self, query, key=None, value=None, key_padding_mask=None, attn_mask=None,
                need_weights: bool = False, **inputs):
        key = query if key is None else key
        value = key if value is None else value
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            raise InputError(f"query/key/value: expected (batch, seq, features), got "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        batch, seq_q, _ = query.shape
        seq_k = key.shape[1]
        q = self.q_proj(query).view(batch, seq_q, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).view(batch, seq_k, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(batch, seq_k, self.kv_heads, self.head_dim).transpose(1, 2)
        extra = {}
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool:
                raise InputError(f"key_padding_mask: expected bool (True = padding), got "
                                 f"{key_padding_mask.dtype}")
            extra["mha_keep"] = ~key_padding_mask
        if attn_mask is not None:
            if attn_mask.dtype != torch.bool:
                raise InputError(f"attn_mask: expected bool (True = takes part, as SDPA), got "
                                 f"{attn_mask.dtype}; write additive biases in the spec")
            extra["mha_allowed"] = attn_mask.expand(batch, seq_q, seq_k).contiguous()
        fn = self._ops[(key_padding_mask is not None, attn_mask is not None)]
        out = fn(q.contiguous(), k.contiguous(), v.contiguous(),
                 **owned_inputs(self, self._owned, {**inputs, **extra}))
        out = out.transpose(1, 2).reshape(batch, seq_q, self.embed_dim)
        return self.out_proj(out), None

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"kv_heads={self.kv_heads}, spec={self.spec.name!r}")
