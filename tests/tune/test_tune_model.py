"""The tuner's cost model: NNLS is exact, the model ranks configs by the plan's work, and a tune
guided by it finds the best config of a landscape the plan explains within a small budget."""

from __future__ import annotations

import itertools
import math

import numpy as np
import optuna
import pytest

from attncc.api import tune
from attncc.backends import registry
from attncc.plan import EMPTY, PARTIAL, build_plan
from attncc.spec.load import load_spec
from attncc.target import default_target
from attncc.tuning.measure import Timing
from attncc.tuning.model import CostModel, nnls
from attncc.tuning.space import signature, tunables
from attncc.tuning.tuner import Problem

SPEC = load_spec("examples/sliding_window.yaml")
SEQ = 256


def brute_nnls(a, b):
    """Least squares over every support set, keeping the best non-negative solution."""
    best, best_res = np.zeros(a.shape[1]), np.linalg.norm(b)
    for size in range(1, a.shape[1] + 1):
        for cols in itertools.combinations(range(a.shape[1]), size):
            z = np.linalg.lstsq(a[:, cols], b, rcond=None)[0]
            if (z >= 0).all():
                x = np.zeros(a.shape[1])
                x[list(cols)] = z
                res = np.linalg.norm(a @ x - b)
                if res < best_res - 1e-12:
                    best, best_res = x, res
    return best, best_res


@pytest.mark.parametrize("seed", range(12))
def test_nnls_finds_the_best_non_negative_fit(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(9, 4))
    b = rng.normal(size=9)
    x = nnls(a, b)
    _, res = brute_nnls(a, b)
    assert (x >= 0).all()
    assert np.linalg.norm(a @ x - b) == pytest.approx(res, rel=1e-9, abs=1e-12)


def plan_seconds(config) -> float:
    """A landscape the block plan explains: per visited block, per visited and partial element."""
    plan = build_plan(SPEC, {"batch": 1, "heads": 1, "seq_q": SEQ, "seq_k": SEQ},
                      config["block_m"], config["block_n"])
    area = config["block_m"] * config["block_n"]
    visited = int((plan.states != EMPTY).sum())
    partial = int((plan.states == PARTIAL).sum())
    return 2e-5 + 3e-6 * visited + 1e-9 * visited * area + 4e-9 * partial * area


def test_model_fitted_on_three_configs_proposes_the_true_best():
    problem = Problem(SPEC, registry.get("numpy"), default_target(), 1, SEQ, SEQ, "float32")
    model = CostModel(problem)
    configs = [tunables(problem.space, c) for c in problem.valid]
    truth = {signature(c): plan_seconds(c) for c in configs}
    measured = {signature(c): truth[signature(c)] for c in configs[:3]}
    assert model.propose(dict(list(measured.items())[:2])) is None  # too few to fit
    proposal = model.propose(measured)
    unmeasured = {s: t for s, t in truth.items() if s not in measured}
    assert signature(proposal) == min(unmeasured, key=unmeasured.get)
    assert model.propose(truth) is None  # nothing left to propose


def _timer(kernel, args, repeat):
    seconds = plan_seconds(kernel.config)
    return Timing(seconds, 0.0, (seconds,))


@pytest.mark.parametrize("guide", [True, False])
def test_guided_tune_reaches_the_best_config(tmp_path, guide):
    best = min(plan_seconds(c) for c in Problem(SPEC, registry.get("numpy"), default_target(),
                                                 1, SEQ, SEQ, "float32").valid)
    found, proposals = [], 0
    for seed in range(4):
        db = tmp_path / f"{seed}.db"
        record = tune(SPEC, "numpy", seq=SEQ, trials=6, db=db, progress=False, seed=seed,
                      timer=_timer, guide=guide)
        study = optuna.load_study(study_name=record.study,
                                  storage=f"sqlite:///{tmp_path / f'{seed}.optuna.db'}")
        proposals += sum(t.user_attrs.get("guide") == "cost_model" for t in study.get_trials())
        found.append(math.isclose(record.median_s, best))
    if guide:
        assert proposals >= 4 and all(found)
    else:
        assert proposals == 0
