"""[7] A cost model fitted to the measured trials, proposing configs to TPE.

TPE needs many trials before its density model beats chance, and a tune's budget is often a
handful (30% of a 25-config grid is 7). But attncc knows the block plan of every config
symbolically, so it can say how much work each config does before timing it. ``CostModel`` fits

    seconds ≈ c · features(config),   c ≥ 0   (non-negative least squares)

on the configs measured so far, where the features of a config are:

- from the block plan at its ``block_m``/``block_n`` (when it has them): 1, query-block rows,
  visited (non-EMPTY) blocks, visited area and PARTIAL area (mask work), counted over batch and
  heads, each scaled to at most 1 over the space;
- one indicator per value of every other tunable (``use_sdpa``, ``kv_chunk``...): a non-negative
  cost for choosing that value.

``propose`` returns the unmeasured valid config with the lowest predicted time. The tuner enqueues
it into the TPE study every other measured trial once three are measured (``tuner._Guide``), so
TPE still samples the rest and learns from the model's picks.
"""

from __future__ import annotations

import numpy as np

from attncc.tuning.space import signature, tunables

#: Measured configs needed before the model's first proposal.
MIN_FIT = 3


def nnls(a: np.ndarray, b: np.ndarray, iterations: int = 200) -> np.ndarray:
    """x ≥ 0 minimising ‖a·x − b‖₂ (Lawson–Hanson active set; ``a`` is small and dense)."""
    n = a.shape[1]
    x, passive = np.zeros(n), np.zeros(n, dtype=bool)
    for _ in range(iterations):
        gradient = a.T @ (b - a @ x)
        free = ~passive & (gradient > 1e-12)
        if not free.any():
            break
        passive[np.argmax(np.where(free, gradient, -np.inf))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            shrinking = passive & (z <= 0)
            alpha = np.min(x[shrinking] / np.maximum(x[shrinking] - z[shrinking], 1e-300))
            x = x + alpha * (z - x)
            passive &= x > 1e-12
    return x


class CostModel:
    """Features of every valid config of ``problem`` (a ``tuner.Problem``) and a fit over them.

    ``propose(measured)`` with ``measured`` a dict signature -> seconds (finite) of the configs
    timed so far: the config (tunables only) predicted fastest among those not yet measured, or
    None when fewer than ``MIN_FIT`` are measured or every valid config is.
    """

    def __init__(self, problem):
        self.space = problem.space
        configs = [tunables(problem.space, c) for c in problem.valid]
        plans = self._plan_features(problem, configs)
        knobs = [name for name in problem.space.params
                 if name not in ("block_m", "block_n") and len(problem.space.params[name]) > 1]
        rows = []
        for config, plan in zip(configs, plans, strict=True):
            onehot = [float(config.get(name) == value)
                      for name in knobs for value in problem.space.params[name]]
            rows.append(plan + onehot)
        features = np.asarray(rows, dtype=float).reshape(len(configs), -1)
        scale = np.abs(features).max(axis=0)
        self.features = features / np.where(scale > 0, scale, 1.0)
        self.configs = configs
        self.index = {signature(c): i for i, c in enumerate(configs)}

    @staticmethod
    def _plan_features(problem, configs) -> list[list[float]]:
        if not all("block_m" in c and "block_n" in c for c in configs):
            return [[1.0] for _ in configs]
        from attncc.plan import EMPTY, PARTIAL, build_plan

        q, _, _, inputs = problem.args()
        batch, heads = int(q.shape[0]), int(q.shape[1])
        sizes = {"batch": batch, "heads": heads, "seq_q": problem.seq_q,
                 "seq_k": problem.seq_k}
        cache = {}
        out = []
        for config in configs:
            blocks = (int(config["block_m"]), int(config["block_n"]))
            if blocks not in cache:
                try:
                    plan = build_plan(problem.spec, sizes, *blocks, inputs)
                except Exception:  # a plan the backend builds differently: no plan features
                    cache[blocks] = [1.0, 0.0, 0.0, 0.0, 0.0]
                else:
                    states = plan.states
                    repeat = (batch // states.shape[0]) * (heads // states.shape[1])
                    area = blocks[0] * blocks[1] * repeat
                    cache[blocks] = [1.0, float(states.shape[0] * states.shape[1]
                                                * states.shape[2] * repeat),
                                     float((states != EMPTY).sum() * repeat),
                                     float((states != EMPTY).sum() * area),
                                     float((states == PARTIAL).sum() * area)]
            out.append(cache[blocks])
        return out

    def propose(self, measured: dict) -> dict | None:
        seen = [(self.index[s], t) for s, t in measured.items()
                if s in self.index and np.isfinite(t)]
        if len(seen) < MIN_FIT or len(measured) >= len(self.configs):
            return None
        rows, times = zip(*seen, strict=True)
        coef = nnls(self.features[list(rows)], np.asarray(times))
        predicted = self.features @ coef
        predicted[[self.index[s] for s in measured if s in self.index]] = np.inf
        best = int(np.argmin(predicted))
        return None if not np.isfinite(predicted[best]) else dict(self.configs[best])
