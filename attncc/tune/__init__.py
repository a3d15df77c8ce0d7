"""[7] The autotuner: Optuna over a backend's search space, winners kept in the tuning database.

``tune`` searches and records (tuner.py); ``lookup`` finds the record a compile should use, with no
benchmarking; ``measurements`` counts timings run in this process (measure.py).

Note: ``attncc.tune`` at the package top level is the ``tune`` function; import ``lookup`` from
``attncc.tune.tuner`` where the package name could be shadowed.
"""

from attncc.tune.measure import Timing, measurements, time_call
from attncc.tune.tuner import lookup, tune

__all__ = ["Timing", "lookup", "measurements", "time_call", "tune"]
