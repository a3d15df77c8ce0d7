"""[5] The backend plugin interface (base) and entry-point discovery (registry)."""

from attncc.backends.base import SUPPORTED, Backend, Kernel, SearchSpace, Support

__all__ = ["SUPPORTED", "Backend", "Kernel", "SearchSpace", "Support"]
