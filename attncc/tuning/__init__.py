"""[7] The autotuner behind ``attncc.tune``: Optuna over a backend's search space.

``tuner.py``: the search (``Problem``: one spec, backend, shape and target; ``search``);
``space.py``: a SearchSpace as Optuna parameters; ``study.py``: studies, samplers, budget;
``model.py``: the plan-based cost model that proposes trials; ``measure.py``: timing
(``measurements()`` counts the timings run in this process). Record lookup, which needs no
Optuna, is ``attncc.db.lookup``. This package re-exports nothing: import from the module.
"""
