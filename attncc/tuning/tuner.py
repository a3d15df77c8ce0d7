"""[7] ``search``: the tune behind ``attncc.tune``, for one spec, backend, shape and target.

In order: ``attncc.tune`` checks its arguments and builds the ``Problem`` (the lowered graph,
search space and defaults); ``search`` opens the record database and the study for the record's
key (``study.py``); enqueues the backend's default config and the winners recorded for other
targets or shape buckets (warm start); runs trials (in this process, or ``workers`` processes on
the one study) until ``trials`` configs have been measured, TPE sampling and, every other trial, a
cost model fitted to the measurements proposing (``model.py``, unless ``guide=False``);
re-measures the best few and keeps the fastest; writes the record. Invalid configs are pruned
unmeasured (``space.py``); a config that raises scores ``inf`` and the tune goes on.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from attncc.backends import registry
from attncc.backends.base import Backend
from attncc.db.key import Key, Record, bucket_of
from attncc.db.store import Store, study_storage
from attncc.errors import BackendError
from attncc.spec.load import load_spec
from attncc.tuning import study as studies
from attncc.tuning.measure import Timing, time_call
from attncc.tuning.model import MIN_FIT, CostModel
from attncc.tuning.space import decode, encode, fits, signature, suggest, tunables

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
    seed: int | None
    sampler: str
    guide: bool = True


class Problem:
    """One spec, backend, shape, dtype and target: compiles a config and times it.

    ``timer(kernel, args) -> Timing`` replaces the wall-clock measurement (tests, custom harnesses).
    """

    def __init__(self, spec, backend: Backend, target, batch: int, seq_q: int, seq_k: int,
                 dtype: str, timer: Callable | None = None):
        from attncc.passes.pipeline import lower

        self.spec, self.backend, self.target = spec, backend, target
        self.batch, self.seq_q, self.seq_k, self.dtype = batch, seq_q, seq_k, dtype
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
        self.timer = timer or self._wall_clock
        self._args = None

    @property
    def key(self) -> Key:
        return Key(self.spec.hash, bucket_of(self.seq_q, self.seq_k), self.dtype,
                   f"{self.backend.name}@{self.backend.version}", self.target.key(3))

    def study_name(self) -> str:
        key = self.key
        where = hashlib.sha256(key.target.encode()).hexdigest()[:10]
        return (f"attncc:{self.spec.name}:{key.spec_hash}:{key.bucket}:{key.dtype}:"
                f"{key.backend}:{where}")

    def args(self):
        """``(q, k, v, inputs)`` drawn once, in the backend's array library and device."""
        if self._args is None:
            from attncc.testing.inputs import random_inputs

            self._args = random_inputs(self.spec, self.batch, self.seq_q, self.seq_k,
                                       self.dtype, 0, self.backend.library,
                                       self.target.torch_device)
        return self._args

    def run(self, config: dict, repeat: int = 7) -> Timing:
        """Compile ``config`` (over the defaults) and time it; exceptions propagate."""
        kernel = self.backend.compile(self.graph, {**self.base, **config}, self.target)
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
            return math.inf
        trial.set_user_attr("spread_s", timing.spread_s)
        return timing.median_s


def search(problem: Problem, db, *, trials: int, workers: int, storage: str | None,
           seed: int | None, heartbeat: int, sampler: str, guide: bool, progress: bool,
           plot_dir) -> Record:
    """Run the tune ``attncc.tune`` describes (its arguments, checked) on ``problem``; store and
    return the Record."""
    store = db if isinstance(db, Store) else Store(db)
    url = storage or study_storage(store.url)
    budget = min(trials, len(problem.valid))
    study = studies.open_study(url, problem.study_name(), budget=budget, seed=seed,
                               heartbeat=heartbeat, kind=sampler)
    _warm_start(study, problem, store)
    bar = _Progress(problem.spec.name, budget) if progress else None
    if workers == 1:
        _optimize(study, problem, budget, bar, guide)
    else:
        job = Job(problem.spec.source, problem.backend.name, problem.target.to_dict(),
                  problem.batch, problem.seq_q, problem.seq_k, problem.dtype, url,
                  study.study_name, budget, heartbeat, seed, sampler, guide)
        _spawn(job, workers, study, bar)
    if bar is not None:
        bar.close()
    record = _choose(study, problem)
    store.put(record)
    if plot_dir is not None:
        studies.plot(study, plot_dir)
    return record


def work(job: Job) -> None:
    """A worker process: rebuild the problem from ``job`` and run trials until the budget."""
    from attncc.target import Target

    problem = Problem(load_spec(job.spec), registry.get(job.backend),
                      Target.from_dict(job.target), job.batch, job.seq_q, job.seq_k, job.dtype)
    study = studies.open_study(job.storage, job.study, budget=job.budget, seed=None,
                               heartbeat=job.heartbeat, kind=job.sampler)
    _optimize(study, problem, job.budget, None, job.guide)


def _optimize(study: optuna.Study, problem: Problem, budget: int, bar, guide: bool) -> None:
    if len(studies.measured(study.get_trials(deepcopy=False))) >= budget:
        return
    limit = len(study.get_trials(deepcopy=False)) + 20 * budget + 50
    stop = studies.Stop(budget, limit, bar.update if bar is not None else None)
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
    for config in [tunables(problem.space, problem.base)] + [r.config for r in others]:
        config = tunables(problem.space, config)
        if len(seen) > WARM or signature(config) in seen:
            continue
        if fits(problem.space, problem.base, config):
            seen.add(signature(config))
            study.enqueue_trial(encode(problem.space, config), user_attrs={"warm_start": True},
                                skip_if_exists=True)


def _choose(study: optuna.Study, problem: Problem) -> Record:
    """Re-measure the best few distinct configs; the Record of the fastest."""
    trials = study.get_trials(deepcopy=False)
    done = studies.finished(trials)
    if not done:
        errors = [t.user_attrs["error"] for t in trials if "error" in t.user_attrs]
        raise BackendError(f"tune '{problem.spec.name}' on '{problem.backend.name}': no config "
                           f"ran; first error: {errors[0] if errors else 'none measured'}")
    best = None
    for trial in done[:TOP]:
        config = {**problem.base, **decode(problem.space, trial.params)}
        try:
            timing = problem.run(config, repeat=11)
        except Exception:  # noqa: S112 - it ran once; a flaky config just loses
            continue
        if best is None or timing.median_s < best[1].median_s:
            best = (config, timing)
    if best is None:
        raise BackendError(f"tune '{problem.spec.name}': every top config failed when "
                           "re-measured")
    config, timing = best
    versions = dict(problem.target.versions)
    versions[f"backend:{problem.backend.name}"] = problem.backend.version
    return Record(problem.key, problem.spec.name, config, timing.median_s, timing.spread_s,
                  len(studies.measured(trials)), problem.target.to_dict(), versions,
                  study=study.study_name)


class _Progress:
    """A tqdm bar over measured trials, showing the trial number, its time and the best."""

    def __init__(self, name: str, budget: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=budget, desc=f"tune {name}", unit="trial", leave=False)

    def update(self, study, trial, trials) -> None:
        done = len(studies.measured(trials))
        self.bar.n = min(done, self.bar.total)
        best = studies.finished(trials)[:1]
        self.bar.set_postfix(trial=trial.number, current=_ms(trial.value),
                             best=_ms(best[0].value if best else None), refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _ms(value) -> str:
    return "-" if value is None else ("inf" if not math.isfinite(value) else f"{value*1e3:.3g}ms")
