"""The tuner: invalid configs pruned unmeasured, failures score inf, warm start, re-measure,
DB hits cost no benchmark, a real numpy kernel tuned end to end through the CLI."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import optuna
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState

from attncc.api import tune
from attncc.backends.base import SUPPORTED, Backend, Kernel, SearchSpace
from attncc.cli.tune import tune as tune_cli
from attncc.db.lookup import lookup
from attncc.db.store import Store
from attncc.errors import BackendError, InputError
from attncc.reference import reference
from attncc.spec.load import load_spec
from attncc.target import default_target
from attncc.tuning.measure import Timing, measurements
from attncc.tuning.space import decode
from attncc.tuning.study import REPEAT

DENSE = {"attncc": 1, "name": "dense"}


class FakeKernel(Kernel):
    """Right answers (the reference's), so that the tuner's correctness check passes; the fake
    timer never calls it."""

    backend = "fake"

    def __init__(self, config):
        self.config, self.source, self.spec = config, "", None

    def __call__(self, q, k, v, *, return_lse=False, **inputs):
        return reference(DENSE, q, k, v, return_lse=return_lse, **inputs)


class FakeBackend(Backend):
    """block_m x block_n over {16..128} x {16..64}; 128x64 is invalid; 16x16 raises."""

    name, version = "fake", "3"

    def supports(self, graph, target):
        return SUPPORTED

    def search_space(self, graph, target):
        return SearchSpace({"block_m": (16, 32, 64, 128), "block_n": (16, 32, 64)},
                           lambda c: c["block_m"] * c["block_n"] <= 4096)

    def default_config(self, graph, target):
        return {"block_m": 64, "block_n": 64, "fixed": "kept"}

    def compile(self, graph, config, target):
        if config["block_m"] == config["block_n"] == 16:
            raise RuntimeError("16x16 is broken")
        return FakeKernel(config)


class FakeTimer:
    """Deterministic cost, minimal at 32x32; remembers every config it timed."""

    def __init__(self):
        self.timed = []

    def __call__(self, kernel, args, repeat):
        config = kernel.config
        self.timed.append(dict(config))
        cost = 1 + abs(math.log2(config["block_m"]) - 5) + abs(math.log2(config["block_n"]) - 5)
        return Timing(cost * 1e-3, 1e-5, (cost * 1e-3,))


def run(tmp_path, trials, timer=None, **kw):
    timer = timer or FakeTimer()
    record = tune(DENSE, FakeBackend(), seq=64, trials=trials, db=tmp_path / "t.db",
                  progress=False, timer=timer, seed=0, **kw)
    storage = f"sqlite:///{tmp_path / 't.optuna.db'}"
    return record, timer, optuna.load_study(study_name=record.study, storage=storage)


def test_tune_bookkeeping_prunes_invalid_scores_failures_inf_and_remeasures(tmp_path):
    record, timer, study = run(tmp_path, trials=11)  # every valid config: 12 - 1 invalid
    trials = study.get_trials()
    assert all(c["block_m"] * c["block_n"] <= 4096 for c in timer.timed)  # never timed invalid
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert all(t.user_attrs.get("invalid") for t in pruned)
    failed = [t for t in trials if t.state == TrialState.COMPLETE and math.isinf(t.value)]
    assert len(failed) == 1 and "16x16 is broken" in failed[0].user_attrs["error"]
    measured = [t for t in trials if t.state == TrialState.COMPLETE and REPEAT not in t.user_attrs]
    assert len(measured) == record.trials == 11
    space = FakeBackend().search_space(None, None)
    assert trials[0].params == {"log2_block_m": 6, "log2_block_n": 6}  # tile sizes are ordinal
    assert decode(space, trials[0].params) == {"block_m": 64, "block_n": 64}  # default first
    assert record.config == {"block_m": 32, "block_n": 32, "fixed": "kept"}
    assert record.median_s == pytest.approx(1e-3)
    # 10 configs timed (16x16 failed to compile), then the default and the best three others
    # re-measured, best first.
    assert len(timer.timed) == 14
    assert (timer.timed[-3]["block_m"], timer.timed[-3]["block_n"]) == (32, 32)
    assert Store(tmp_path / "t.db").get(record.key) == record


def phase_timer(study_ms: dict, remeasured_ms: dict):
    """Milliseconds by (block_m, block_n) in the study (repeat 7) and when re-measured (11);
    1 ms for any config not listed."""
    def timer(kernel, args, repeat):
        table = study_ms if repeat != 11 else remeasured_ms
        ms = table.get((kernel.config["block_m"], kernel.config["block_n"]), 1.0)
        return Timing(ms * 1e-3, 0.0, (ms * 1e-3,))

    return timer


@pytest.mark.parametrize(("study_ms", "remeasured_ms"), [
    ({(32, 32): 1.0}, {(32, 32): 0.5}),  # the study saw nothing faster than the default
    ({(32, 32): 0.5}, {(32, 32): 2.0}),  # faster in the study, slower when re-measured
])
def test_a_record_is_never_slower_than_the_default(tmp_path, study_ms, remeasured_ms):
    record, _, _ = run(tmp_path, trials=11, timer=phase_timer(study_ms, remeasured_ms))
    assert record.config == {"block_m": 64, "block_n": 64, "fixed": "kept"}  # the default
    assert record.note.startswith("1.00x the default config's speed (1 ms vs 1 ms)")


def test_the_default_is_clamped_to_a_shape_that_rejects_it(tmp_path):
    class Decoding(FakeBackend):  # as a decoding bucket: no query block above 16
        def search_space(self, graph, target):
            return SearchSpace({"block_m": (16, 32, 64, 128), "block_n": (16, 32, 64)},
                               lambda c: c["block_m"] <= 16 and c["block_n"] != 16)

    timer = phase_timer({(16, 64): 2.0}, {(16, 64): 2.0})  # the clamped default: 2 ms
    record = tune(DENSE, Decoding(), seq=64, trials=2, db=tmp_path / "t.db", progress=False,
                  timer=timer, seed=0)
    clamped = "the default config (clamped to this shape: block_m=16)"
    assert record.note.startswith(f"2.00x {clamped}'s speed (1 ms vs 2 ms)"), record.note
    assert record.config == {"block_m": 16, "block_n": 32, "fixed": "kept"}


def test_db_hit_runs_no_measurement_and_retune_warm_starts(tmp_path):
    record, _, _ = run(tmp_path, trials=3)
    before = measurements()
    hit = lookup(DENSE, FakeBackend(), 60, db=tmp_path / "t.db")
    assert hit == record and "exact match" in hit.note
    assert lookup(DENSE, FakeBackend(), 60, dtype="float16", db=tmp_path / "t.db") is None
    assert measurements() == before
    # Another bucket of the same spec starts from the winner recorded for the first bucket.
    again = tune(DENSE, FakeBackend(), seq=200, trials=2, db=tmp_path / "t.db", progress=False,
                 timer=FakeTimer(), seed=0)
    study = optuna.load_study(study_name=again.study,
                              storage=f"sqlite:///{tmp_path / 't.optuna.db'}")
    space = FakeBackend().search_space(None, None)
    warm = [decode(space, t.params) for t in study.get_trials() if t.user_attrs.get("warm_start")]
    assert warm[0] == {"block_m": 64, "block_n": 64}
    assert {k: record.config[k] for k in ("block_m", "block_n")} in warm


def test_every_config_failing_is_one_clear_error(tmp_path):
    class Broken(FakeBackend):
        def compile(self, graph, config, target):
            raise RuntimeError("no compiler here")

    with pytest.raises(BackendError, match="no config ran; first error: RuntimeError: no "):
        tune(DENSE, Broken(), seq=64, trials=2, db=tmp_path / "t.db", progress=False, seed=0)


def test_real_numpy_kernel_tuned_through_the_cli_with_plots(tmp_path):
    spec = load_spec("examples/sliding_window.yaml")
    plots = tmp_path / "plots"
    out = CliRunner().invoke(tune_cli, ["examples/sliding_window.yaml", "--backend", "numpy",
                                        "--seq", "64", "--trials", "3", "--db",
                                        str(tmp_path / "t.db"), "--plot", str(plots), "--quiet",
                                        "--seed", "1"])
    assert out.exit_code == 0, out.output + repr(out.exception)
    assert "3 configs measured" in out.output
    assert (plots / "optimization_history.png").stat().st_size > 1000
    hit = lookup(spec, "numpy", 64, db=tmp_path / "t.db", target=default_target())
    assert hit is not None and hit.trials == 3 and hit.median_s > 0
    assert set(hit.config) >= {"block_m", "block_n"}


@pytest.mark.parametrize("flag,guided", [("--guide", True), ("--no-guide", False)])
def test_cli_guide_flag_turns_the_cost_model_on_and_off(tmp_path, flag, guided):
    out = CliRunner().invoke(tune_cli, ["examples/sliding_window.yaml", "--backend", "numpy",
                                        "--seq", "64", "--trials", "6", "--db",
                                        str(tmp_path / "t.db"), "--quiet", "--seed", "2", flag])
    assert out.exit_code == 0, out.output + repr(out.exception)
    record = lookup(load_spec("examples/sliding_window.yaml"), "numpy", 64,
                    db=tmp_path / "t.db", target=default_target())
    study = optuna.load_study(study_name=record.study,
                              storage=f"sqlite:///{tmp_path / 't.optuna.db'}")
    trials = study.get_trials()
    assert any(t.user_attrs.get("guide") == "cost_model" for t in trials) is guided
    assert not [t for t in trials if t.state == TrialState.WAITING]


def test_unknown_sampler_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match=r"sampler: expected one of \('tpe', 'gp', 'random'\)"):
        tune(DENSE, FakeBackend(), seq=64, trials=2, db=tmp_path / "t.db", progress=False,
             timer=FakeTimer(), sampler="annealing")



_FAULTS = """
import resource, sys
from attncc.backends import registry
from attncc.spec.load import load_spec
from attncc.target import default_target
from attncc.tuning.measure import steady_allocator
from attncc.tuning.tuner import Problem
steady = steady_allocator() if sys.argv[1] == "steady" else False
problem = Problem(load_spec({"attncc": 1, "name": "dense"}), registry.get("numpy"),
                  default_target(), 1, 512, 512, "float32")
q, k, v, inputs = problem.args()
kernel = problem.backend.compile(problem.graph, {**problem.base, "block_m": 256,
                                                 "block_n": 256}, problem.target)
for _ in range(3):
    kernel(q, k, v, **inputs)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    kernel(q, k, v, **inputs)
print(steady, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_steady_allocator_stops_page_faults_of_large_tile_temporaries():
    """The NumPy kernel at 256x256 tiles (seq 512) under glibc's default malloc took 688-1376
    page faults per call, the count depending on allocation history (its temporaries were
    mmap'd afresh each call); after steady_allocator() they are reused from the heap."""
    def faults(mode: str, **env) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True,
                             text=True, check=True, env={**os.environ, **env}).stdout.split()
        return out[0], int(out[1])

    steady, per_call = faults("steady")
    if steady != "True":
        pytest.skip("not glibc: mallopt unavailable")
    assert per_call < 50, f"expected almost no page faults per call, got {per_call}"
    assert faults("steady", ATTNCC_STEADY_MALLOC="0")[0] == "False"


def test_the_timed_inputs_have_a_models_head_size_unless_the_spec_fixes_one():
    from attncc.backends import registry
    from attncc.spec.load import load_spec
    from attncc.target import default_target
    from attncc.tuning.tuner import TUNE_HEAD_DIM, Problem

    for source, want in (({"attncc": 1, "name": "open"}, (TUNE_HEAD_DIM, TUNE_HEAD_DIM)),
                         ({"attncc": 1, "name": "fixed", "head_dim": 32}, (32, 32))):
        problem = Problem(load_spec(source), registry.get("numpy"), default_target(), 1, 16, 16,
                          "float32")
        q, _, v, _ = problem.args()
        assert (q.shape[-1], v.shape[-1]) == want
