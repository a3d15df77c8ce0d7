"""attncc: compile attention variants written as spec files into kernels, tune and cache them.

The public surface is what ``__all__`` lists; everything else is internal::

    spec = attncc.load_spec("examples/sliding_window.yaml")
    kernel = attncc.compile(spec, backend="torch")          # numpy | torch | triton | auto
    out = kernel(q, k, v, **inputs)
    ref = attncc.reference(spec, q, k, v, **inputs)          # float64 NumPy
    maps = attncc.attention_map(spec, q, k, v, heads=[0], rows=range(16), **inputs)
    attncc.tune(spec, backend="torch", batch=1, seq=4096, trials=40)

``tune`` needs the ``tune`` extra (Optuna, SQLAlchemy); it is imported when called.
"""

from attncc.api import attention_map, compile, tune
from attncc.backends.base import Kernel
from attncc.db.key import DatabaseError
from attncc.errors import AttnccError, BackendError, InputError, SpecError
from attncc.reference import reference
from attncc.spec import Spec, load_spec

__all__ = ["AttnccError", "BackendError", "DatabaseError", "InputError", "Kernel", "Spec",
           "SpecError", "attention_map", "compile", "load_spec", "reference", "tune"]
__version__ = "0.1.0"
