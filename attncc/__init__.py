"""attncc: compile attention variants written as spec files into kernels, tune and cache them.

The public surface is what ``__all__`` lists; everything else is internal.
"""

from attncc.errors import AttnccError, BackendError, InputError, SpecError
from attncc.reference import reference
from attncc.spec import Spec, load_spec

__all__ = ["AttnccError", "BackendError", "InputError", "Spec", "SpecError", "load_spec",
           "reference"]
__version__ = "0.1.0"
