"""What the tuner stores is right and its budget is one people can plan with: a config whose
output is wrong scores inf and is reported; --budget / --effort; the closing summary line."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from attncc.api import tune
from attncc.backends import registry
from attncc.backends.base import Backend
from attncc.cli.tune import tune as tune_cli
from attncc.tuning.measure import Timing

SPEC = "examples/sliding_window.yaml"


class Wrong(Backend):
    """The numpy backend, except that block_m=32 scales the output: a wrong config."""

    name, version, library = "wrong", "1", "numpy"

    def __init__(self):
        self.inner = registry.get("numpy")

    def supports(self, graph, target):
        return self.inner.supports(graph, target)

    def search_space(self, graph, target):
        return self.inner.search_space(graph, target)

    def default_config(self, graph, target):
        return self.inner.default_config(graph, target)

    def compile(self, graph, config, target):
        kernel = self.inner.compile(graph, config, target)
        if config["block_m"] != 32:
            return kernel
        real = kernel.__call__

        class Scaled(type(kernel)):
            def __call__(self, *args, **kw):
                out = real(*args, **kw)
                return (out[0] * 1.5, out[1]) if isinstance(out, tuple) else out * 1.5

        kernel.__class__ = Scaled
        return kernel


def fast_timer(kernel, args, repeat):
    """block_m=32 would win by far if it were not wrong."""
    cost = 1e-4 if kernel.config["block_m"] == 32 else 1e-3 * kernel.config["block_n"] / 16
    return Timing(cost, 0.0, (cost,))


def test_a_wrong_config_scores_inf_is_reported_and_never_stored(tmp_path):
    with pytest.warns(UserWarning, match="scored inf: wrong output: out error"):
        record = tune(SPEC, Wrong(), seq=64, trials=40, db=tmp_path / "t.db", progress=False,
                      timer=fast_timer, seed=0)
    assert record.config["block_m"] != 32
    assert "gave wrong output and scored inf" in record.note


def test_a_time_budget_stops_the_tune_and_the_summary_says_how_much_was_measured(tmp_path):
    def slow_timer(kernel, args, repeat):  # every "measurement" eats the whole budget
        import time

        time.sleep(0.2)
        return fast_timer(kernel, args, repeat)

    record = tune(SPEC, "numpy", seq=64, trials=40, budget_s=0.1, db=tmp_path / "t.db",
                  progress=False, timer=slow_timer, seed=0)
    assert record.trials == 1  # the default config, then the deadline
    assert "1.00x the default config's speed" in record.note
    assert "measured 1 of" in record.note and "% of the space" in record.note


def test_cli_budget_effort_and_closing_line(tmp_path):
    args = [SPEC, "--backend", "numpy", "--seq", "40", "--db", str(tmp_path / "t.db"),
            "--quiet", "--seed", "0", "--effort", "quick", "--trials", "2", "--budget", "5m"]
    out = CliRunner().invoke(tune_cli, args)
    assert out.exit_code == 0, out.output + repr(out.exception)
    assert "q64-k64" in out.output  # tuned at the bucket's upper bound
    assert "x the default config's speed" in out.output and "of the space)" in out.output
    bad = CliRunner().invoke(tune_cli, [*args[:-1], "soon"])
    assert bad.exit_code == 2 and "expected a positive time like 60s" in bad.output
