"""[7] The autotuner: Optuna over a backend's search space, winners kept in the tuning database.

``tune`` searches and records (tuner.py); ``lookup`` finds the record a compile should use, with no
benchmarking; ``measurements`` counts timings run in this process (measure.py).

This package is callable: ``attncc.tune(spec, ...)`` is ``tune(spec, ...)`` (DESIGN §7), and
stays so however the package is imported, since Python binds ``attncc.tune`` to the package itself
whenever a submodule is imported.
"""

import sys
import types

from attncc.tune.measure import Timing, measurements, time_call
from attncc.tune.tuner import lookup, tune

__all__ = ["Timing", "lookup", "measurements", "time_call", "tune"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return tune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
