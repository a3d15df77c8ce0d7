"""Plugging attncc kernels into existing code (DESIGN §9).

- ``attncc.integrations.torch``: ``sdpa(spec)``, a function with the keyword interface of
  ``torch.nn.functional.scaled_dot_product_attention`` bound to a spec, and ``AttnccAttention``,
  an ``nn.Module`` wrapper that owns the spec's learned inputs as parameters;
- ``attncc.integrations.modules``: ``MultiheadAttention``, an ``nn.MultiheadAttention``-like
  module owning its projections;
- ``attncc.integrations.ops``: kernels as ``torch.library`` operators (autograd,
  ``torch.compile(fullgraph=True)``);
- ``attncc.integrations.transformers`` (with ``hf_masks``): ``attn_implementation="attncc"``
  for Hugging Face models.

Submodules import their framework lazily; importing this package imports nothing heavy.
"""
