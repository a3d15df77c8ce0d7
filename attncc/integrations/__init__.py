"""Plugging attncc kernels into existing code (DESIGN §9).

- ``attncc.integrations.torch``: ``sdpa(spec)``, a function with the keyword interface of
  ``torch.nn.functional.scaled_dot_product_attention`` bound to a spec, and ``AttnccAttention``,
  an ``nn.Module`` wrapper that owns the spec's learned inputs as parameters.

Submodules import their framework lazily; importing this package imports nothing heavy.
"""
