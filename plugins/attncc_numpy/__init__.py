"""Tiled NumPy backend (CPU): flash-style online softmax over the block plan.

Registered under the entry-point group ``attncc.backends`` as ``numpy``, exactly as an outside
plugin would be. ``backend.NumpyBackend`` holds the contract, ``kernel.NumpyKernel`` a call.
"""

from attncc_numpy.backend import NumpyBackend
from attncc_numpy.kernel import NumpyKernel

__all__ = ["NumpyBackend", "NumpyKernel"]
