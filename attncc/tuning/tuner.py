"""[7] ``search``: the tune behind ``attncc.tune`` (whose docstring is the contract), for one
spec, backend, shape and target.

In order: ``attncc.tune`` checks its arguments and builds the ``Problem`` (the lowered graph,
search space and defaults); ``search`` opens the record database and the study for the record's
key (``study.py``); enqueues the backend's default config and the winners recorded for other
targets or shape buckets (warm start); runs trials (in this process, or ``workers`` processes on
the one study) until the trial or time budget, TPE sampling and, every other trial, a cost model
fitted to the measurements proposing (``model.py``, unless ``guide=False``); re-measures the best
few and keeps the fastest; writes the record, its ``note`` the closing summary. Invalid configs
are pruned unmeasured (``space.py``); a config that raises scores ``inf`` and the tune goes on, as
does one whose output fails ``verify.wrong_output`` (with a warning): no wrong config is stored.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from attncc.backends import registry
from attncc.backends.base import Backend
from attncc.db.key import Key, Record, bucket_of, tuned_versions
from attncc.db.store import Store, study_storage
from attncc.errors import BackendError
from attncc.spec.load import load_spec
from attncc.tuning import study as studies
from attncc.tuning.measure import Timing, time_call
from attncc.tuning.model import MIN_FIT, CostModel
from attncc.tuning.space import decode, encode, fits, signature, suggest, tunables
from attncc.tuning.verify import wrong_output

#: How many of the best configs are re-measured before one is chosen, and how many warm starts.
TOP, WARM = 3, 4


@dataclass(frozen=True)
class Job:
    """Everything a worker process needs to rebuild the problem (plain, picklable values)."""

    spec: dict
    backend: str
    target: dict
    batch: int
    seq_q: int
    seq_k: int
    dtype: str
    storage: str
    study: str
    budget: int
    heartbeat: int
    sampler: str  # workers sample unseeded: seeded alike, they would propose alike
    guide: bool = True
    heads: int | None = None
    deadline: float | None = None  # time.time() at which the tune stops


#: Head size of the timed inputs where the spec fixes none (value_dim the same).
TUNE_HEAD_DIM = 64


class WrongOutputError(BackendError):
    """A config whose output fails the conformance rule against ``attncc.reference``."""


class Problem:
    """One spec, backend, shape, dtype and target: compiles a config, checks it and times it.

    ``timer(kernel, args) -> Timing`` replaces the wall-clock measurement (tests, custom harnesses).
    ``heads`` is the query head count of the timed inputs (default: the spec's, else the test
    inputs' default); ``hints`` are configs to enqueue first (records of other targets).
    """

    def __init__(self, spec, backend: Backend, target, batch: int, seq_q: int, seq_k: int,
                 dtype: str, timer: Callable | None = None, *, heads: int | None = None,
                 hints=()):
        from attncc.passes.pipeline import lower

        self.spec, self.backend, self.target = spec, backend, target
        self.batch, self.seq_q, self.seq_k, self.dtype = batch, seq_q, seq_k, dtype
        self.heads, self.hints, self.checked = heads, list(hints), set()
        self.graph = lower(spec)
        self.graph.graph["sizes"] = {"batch": batch, "seq_q": seq_q, "seq_k": seq_k}
        self.graph.graph["dtype"] = dtype
        support = backend.supports(self.graph, target)
        if not support:
            raise BackendError(f"backend '{backend.name}' cannot run '{spec.name}': "
                               f"{support.reason}")
        self.space = backend.search_space(self.graph, target)
        self.base = backend.default_config(self.graph, target)
        self.valid = self.space.configs()
        if not self.valid:
            raise BackendError(f"backend '{backend.name}' has no valid config for '{spec.name}' "
                               f"at seq_q={seq_q}, seq_k={seq_k} (keep() rejects all of them)")
        self.default = _baseline(self.space, self.base, self.valid)
        self.timer = timer or self._wall_clock
        self._args = None

    @property
    def key(self) -> Key:
        return Key.of(self.spec, bucket_of(self.seq_q, self.seq_k), self.dtype, self.backend,
                      self.target)

    def study_name(self) -> str:
        key = self.key
        where = hashlib.sha256(key.target.encode()).hexdigest()[:10]
        return (f"attncc:{self.spec.name}:{key.spec_hash}:{key.bucket}:{key.dtype}:"
                f"{key.backend}:{where}")

    def args(self):
        """``(q, k, v, inputs)`` drawn once, in the backend's array library and device."""
        if self._args is None:
            from attncc.testing.inputs import random_inputs

            # a model's head size, not the tests' small default; value_dim = head_dim
            self._args = random_inputs(self.spec, self.batch, self.seq_q, self.seq_k,
                                       self.dtype, 0, self.backend.library,
                                       self.target.torch_device, heads=self.heads,
                                       head_dim=TUNE_HEAD_DIM, value_dim=TUNE_HEAD_DIM)
        return self._args

    def run(self, config: dict, repeat: int = 7) -> Timing:
        """Compile ``config`` (over the defaults), check its output the first time (WrongOutputError
        when it fails the rule) and time it; exceptions propagate."""
        config = {**self.base, **config}
        kernel = self.backend.compile(self.graph, config, self.target)
        mine = signature(config)
        if mine not in self.checked:
            problem = wrong_output(kernel, self.spec, self.seq_q, self.seq_k, self.dtype,
                                   self.backend.library, self.target.torch_device, self.heads)
            if problem is not None:
                raise WrongOutputError(problem)
            self.checked.add(mine)
        return self.timer(kernel, self.args(), repeat)

    def _wall_clock(self, kernel, args, repeat: int) -> Timing:
        q, k, v, inputs = args
        return time_call(lambda: kernel(q, k, v, **inputs), repeat=repeat,
                         sync=self.target.sync)

    def objective(self, trial: optuna.Trial) -> float:
        """Optuna objective: median seconds; ``inf`` (with the error kept) for a failing config."""
        config = suggest(trial, self.space, self.base)
        mine = signature(tunables(self.space, config))
        for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if (studies.REPEAT not in other.user_attrs
                    and signature(decode(self.space, other.params)) == mine):
                trial.set_user_attr(studies.REPEAT, other.number)
                return other.value
        try:
            timing = self.run(config)
        except Exception as err:  # any failing config scores inf; the tune goes on
            trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:500])
            if isinstance(err, WrongOutputError):
                trial.set_user_attr("wrong", True)
                warnings.warn(f"attncc tune: config {tunables(self.space, config)} of backend "
                              f"'{self.backend.name}' scored inf: {err}", stacklevel=2)
            return math.inf
        trial.set_user_attr("spread_s", timing.spread_s)
        return timing.median_s


def search(problem: Problem, db, *, trials: int, workers: int, storage: str | None,
           seed: int | None, heartbeat: int, sampler: str, guide: bool, progress: bool,
           plot_dir, budget_s: float | None = None) -> Record:
    """Run the tune ``attncc.tune`` describes (its arguments, checked) on ``problem``; store and
    return the Record (its ``note``: the closing summary)."""
    store = db if isinstance(db, Store) else Store(db)
    url = storage or study_storage(store.url)
    budget = min(trials, len(problem.valid))
    deadline = None if budget_s is None else time.time() + budget_s
    study = studies.open_study(url, problem.study_name(), budget=budget, seed=seed,
                               heartbeat=heartbeat, kind=sampler)
    _warm_start(study, problem, store)
    bar = _Progress(problem.spec.name, budget, deadline) if progress else None
    if workers == 1:
        _optimize(study, problem, budget, bar, guide, deadline)
    else:
        job = Job(problem.spec.source, problem.backend.name, problem.target.to_dict(),
                  problem.batch, problem.seq_q, problem.seq_k, problem.dtype, url,
                  study.study_name, budget, heartbeat, sampler, guide, problem.heads, deadline)
        _spawn(job, workers, study, bar)
    if bar is not None:
        bar.close()
    record, baseline = _choose(study, problem)
    record = store.put(record).with_(note=_summary(study, problem, record, baseline))
    if plot_dir is not None:
        studies.plot(study, plot_dir)
    return record


def work(job: Job) -> None:
    """A worker process: rebuild the problem from ``job`` and run trials until the budget."""
    from attncc.target import Target

    problem = Problem(load_spec(job.spec), registry.get(job.backend),
                      Target.from_dict(job.target), job.batch, job.seq_q, job.seq_k, job.dtype,
                      heads=job.heads)
    study = studies.open_study(job.storage, job.study, budget=job.budget, seed=None,
                               heartbeat=job.heartbeat, kind=job.sampler)
    _optimize(study, problem, job.budget, None, job.guide, job.deadline)


def _optimize(study: optuna.Study, problem: Problem, budget: int, bar, guide: bool,
              deadline: float | None) -> None:
    done = len(studies.measured(study.get_trials(deepcopy=False)))
    if done >= budget or (done and deadline is not None and time.time() >= deadline):
        return  # a time budget stops a tune only once one config is measured
    limit = len(study.get_trials(deepcopy=False)) + 20 * budget + 50
    stop = studies.Stop(budget, limit, bar.update if bar is not None else None, deadline)
    callbacks = [_Guide(problem, budget), stop] if guide else [stop]
    study.optimize(problem.objective, callbacks=callbacks, gc_after_trial=False)


class _Guide:
    """An Optuna callback: after every other measured trial (from the third on), enqueue the
    config the cost model predicts fastest among those not measured yet (``model.py``).

    It enqueues only while the measured trials plus those running in any worker stay below the
    budget: then this worker's own stop check still finds budget left and its next trial takes
    the enqueued config, so no WAITING trial outlives the tune.
    """

    def __init__(self, problem: Problem, budget: int):
        self.problem, self.budget, self.model = problem, budget, None

    def __call__(self, study: optuna.Study, trial) -> None:
        trials = study.get_trials(deepcopy=False)
        done = studies.measured(trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        if (len(done) < MIN_FIT or len(done) % 2 == 0 or len(done) + running >= self.budget
                or any(t.state == TrialState.WAITING for t in trials)):
            return
        if self.model is None:
            self.model = CostModel(self.problem)
        space = self.problem.space
        times = {signature(decode(space, t.params)): t.value for t in done
                 if t.state == TrialState.COMPLETE and t.value is not None}
        config = self.model.propose(times)
        if config is not None:
            study.enqueue_trial(encode(space, config), user_attrs={"guide": "cost_model"},
                                skip_if_exists=True)


def _spawn(job: Job, workers: int, study: optuna.Study, bar) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=work, args=(job,), daemon=True) for _ in range(workers)]
    for proc in procs:
        proc.start()
    while any(proc.is_alive() for proc in procs):
        if bar is not None:
            trials = study.get_trials(deepcopy=False)
            if trials:
                bar.update(study, trials[-1], trials)
        time.sleep(0.5)
    codes = [proc.exitcode for proc in procs]
    if all(code != 0 for code in codes):
        raise BackendError(f"tune: every worker process failed (exit codes {codes}); run with "
                           "workers=1 to see the error")


def _warm_start(study: optuna.Study, problem: Problem, store: Store) -> None:
    """Enqueue the default config, then winners of other targets and buckets (see module doc)."""
    key = problem.key
    others = [r for r in store.records(spec_hash=key.spec_hash, dtype=key.dtype,
                                       backend=key.backend_name) if r.key != key]
    others.sort(key=lambda r: (r.key.bucket != key.bucket, r.median_s))
    seen = set()
    hints = [problem.default, *problem.hints]
    for config in hints + [r.config for r in others]:
        config = tunables(problem.space, config)
        if len(seen) > WARM or signature(config) in seen:
            continue
        if fits(problem.space, problem.base, config):
            seen.add(signature(config))
            study.enqueue_trial(encode(problem.space, config), user_attrs={"warm_start": True},
                                skip_if_exists=True)


def _baseline(space, base: dict, valid: list[dict]) -> dict:
    """The tunables of the default config as this shape admits them: the default itself where
    ``keep()`` takes it, else the valid config nearest to it (numbers compared in log2, so a
    decoding bucket's ``block_m`` 64 is clamped to the largest the bucket admits; other values
    kept where a valid config keeps them)."""
    default = tunables(space, base)
    if fits(space, base, default):
        return default

    def distance(config: dict) -> float:
        def one(a, b):
            if all(isinstance(x, int | float) and not isinstance(x, bool) and x > 0
                   for x in (a, b)):
                return abs(math.log2(a) - math.log2(b))
            return 0.0 if a == b else 1e3

        return sum(one(value, default.get(name)) for name, value in config.items())

    return min(valid, key=distance)


def _choose(study: optuna.Study, problem: Problem) -> tuple[Record, Timing | None]:
    """The Record of the fastest config, and the default's re-measured timing (None where it
    failed).

    A tuning record must never make a kernel slower than the default (``problem.default``):
    where the study measured the default at least as fast as every other config, the default is
    stored; else the best few distinct configs and the default are re-measured and the fastest
    is stored, so the default is the record or slower than it, never faster.
    """
    trials = study.get_trials(deepcopy=False)
    done = studies.finished(trials)
    if not done:
        errors = [t.user_attrs["error"] for t in trials if "error" in t.user_attrs]
        raise BackendError(f"tune '{problem.spec.name}' on '{problem.backend.name}': no config "
                           f"ran; first error: {errors[0] if errors else 'none measured'}")
    default = signature(problem.default)
    configs = [decode(problem.space, t.params) for t in done]
    studied = [t.value for t, c in zip(done, configs, strict=True) if signature(c) == default]
    seen, others = {default}, []  # two workers may have timed one config: distinct ones
    for config in configs:
        if signature(config) not in seen and len(others) < TOP:
            seen.add(signature(config))
            others.append(config)
    if studied and studied[0] <= done[0].value:
        others = []  # the study saw no config faster than the default: it is the record
    timed, baseline = [], None
    for tunable in [problem.default, *others]:
        config = {**problem.base, **tunable}
        try:
            timed.append((config, problem.run(config, repeat=11)))
        except Exception:  # noqa: S112 - it ran once; a flaky config just loses
            continue
        baseline = timed[0][1] if tunable is problem.default else baseline
    if not timed:
        raise BackendError(f"tune '{problem.spec.name}': every top config failed when "
                           "re-measured")
    config, timing = min(timed, key=lambda found: found[1].median_s)  # the default on a tie
    record = Record(problem.key, problem.spec.name, config, timing.median_s, timing.spread_s,
                    len(studies.measured(trials)), problem.target.to_dict(),
                    tuned_versions(problem.target, problem.backend), study=study.study_name)
    return record, baseline


def _summary(study: optuna.Study, problem: Problem, record: Record,
             baseline: Timing | None) -> str:
    """The closing line: the winner against the default config (both re-measured; the default
    clamped to the shape where ``keep()`` rejects it as is), how much of the space was
    measured, and the configs whose output was wrong."""
    trials = study.get_trials(deepcopy=False)
    clamped = ", ".join(f"{n}={v}" for n, v in problem.default.items()
                        if problem.base.get(n) != v)
    name = "the default config" + (f" (clamped to this shape: {clamped})" if clamped else "")
    speed = (f"{baseline.median_s / record.median_s:.2f}x {name}'s speed "
             f"({record.median_s * 1e3:.4g} ms vs {baseline.median_s * 1e3:.4g} ms)"
             if baseline is not None and record.median_s > 0 else f"{name} did not run")
    measured = len(studies.measured(trials))
    share = f"measured {measured} of {len(problem.valid)} configs " \
            f"({100 * measured / len(problem.valid):.0f}% of the space)"
    wrong = sum(bool(t.user_attrs.get("wrong")) for t in trials)
    return f"{speed}; {share}" + (f"; {wrong} config(s) gave wrong output and scored inf"
                                  if wrong else "")


class _Progress:
    """A tqdm bar over measured trials, showing the trial number, its time, the best, and the
    time left: the rate so far times the trials left, or the time budget left if sooner."""

    def __init__(self, name: str, budget: int, deadline: float | None):
        from tqdm.auto import tqdm

        self.start, self.deadline = time.time(), deadline
        self.bar = tqdm(total=budget, desc=f"tune {name}", unit="trial", leave=False,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def update(self, study, trial, trials) -> None:
        done = len(studies.measured(trials))
        self.bar.n = min(done, self.bar.total)
        best = studies.finished(trials)[:1]
        now = time.time()
        left = (now - self.start) / done * (self.bar.total - self.bar.n) if done else math.inf
        if self.deadline is not None:
            left = min(left, max(0.0, self.deadline - now))
        self.bar.set_postfix(trial=trial.number, current=_ms(trial.value),
                             best=_ms(best[0].value if best else None),
                             left="?" if math.isinf(left) else f"~{left:.0f}s", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _ms(value) -> str:
    return "-" if value is None else ("inf" if not math.isfinite(value) else f"{value*1e3:.3g}ms")
