"""[1] The spec language: a validated model (schema), the safe expression parser, and loading."""

from attncc.spec.load import load_spec
from attncc.spec.schema import InputSpec, LowRank, Spec

__all__ = ["InputSpec", "LowRank", "Spec", "load_spec"]
