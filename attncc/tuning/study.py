"""[7] Optuna studies for the tuner: storage, sampler, budget, stale trials, plots.

One study per record key, in Optuna's RDB storage (``attncc.db.study_storage``: a SQLite file
beside the record database, or the same PostgreSQL database), so many processes on many machines
can work on one study. Every trial runs with a heartbeat; opening a study first marks FAILED the
RUNNING trials whose heartbeat stopped more than ``2 * heartbeat`` seconds ago (a worker that was
killed mid-trial), so they are never left running.

The budget counts **measured** trials: COMPLETE (including configs that raised, scored ``inf``) and
FAIL ones. Pruned trials (configs keep() rejected) and repeats of a measured config (answered from
the study without timing, marked ``repeat_of``) do not count.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

try:
    import fcntl
except ImportError:  # not on Windows: SQLite studies there keep Optuna's own storage
    fcntl = None

from attncc.db.key import DatabaseError
from attncc.db.store import connect_args, first_line, masked, resolve
from attncc.errors import InputError

REPEAT = "repeat_of"
SAMPLERS = ("tpe", "gp", "random")
optuna.logging.set_verbosity(optuna.logging.WARNING)


#: Tries to open a SQLite study storage before its error is reported (schema-creation races).
OPEN_ATTEMPTS = 12


@contextmanager
def _experimental():
    """Optuna's ExperimentalWarning silenced (heartbeats, GPSampler, multivariate TPE)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def storage(url: str, heartbeat: int) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at ``url`` (DatabaseError, one line, when it cannot be opened)."""
    url = resolve(url)
    kind = optuna.storages.RDBStorage
    attempts = 1  # a server does not race
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = {"connect_args": {"timeout": 60}}
        attempts = OPEN_ATTEMPTS
        if fcntl is not None:
            kind = functools.partial(SerialStorage, path + ".lock")
    else:
        engine = {"pool_pre_ping": True, "connect_args": connect_args(url)}
    for attempt in range(attempts):
        try:
            with _experimental():
                return kind(url, engine_kwargs=engine, heartbeat_interval=int(heartbeat),
                            grace_period=int(2 * heartbeat))
        except ImportError as err:
            raise DatabaseError(f"study storage {masked(url)} needs a driver: {err} "
                                "(PostgreSQL: pip install 'attncc[postgres]')") from None
        except Exception as err:  # SQLAlchemy, driver and Optuna errors alike
            # processes creating a fresh file's schema at once race ("table ... already
            # exists", "database is locked", both stamping alembic_version): the loser opens it
            # again once the winner is done
            text = str(err).lower()
            race = ("already exists", "locked", "unique constraint failed: alembic_version")
            if attempt + 1 < attempts and any(r in text for r in race):
                time.sleep(0.05 * (attempt + 1))
                continue
            raise DatabaseError(f"cannot open study storage {masked(url)}: "
                                f"{first_line(err)}") from None


class SerialStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage on a SQLite file with every storage call serialised across
    processes (``flock`` on ``lock_path``) and threads (the heartbeat's).

    SQLite has no ``SELECT ... FOR UPDATE``: two workers of one study could both read an
    enqueued trial as WAITING and both run it. Each call holds the lock for one short
    transaction; PostgreSQL needs none of this."""

    def __init__(self, lock_path: str, *args, **kwargs):
        self._lock_path, self._thread_lock, self._depth = lock_path, threading.RLock(), 0
        with self._serial():
            super().__init__(*args, **kwargs)

    @contextmanager
    def _serial(self):
        with self._thread_lock:
            if self._depth == 0:
                self._fd = os.open(self._lock_path, os.O_CREAT | os.O_RDWR, 0o644)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                    os.close(self._fd)


def _serialised(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        with self._serial():
            return method(self, *args, **kwargs)
    return call


for _name, _method in list(vars(optuna.storages.RDBStorage).items()):
    if not _name.startswith("_") and callable(_method):
        setattr(SerialStorage, _name, _serialised(_method))


def sampler(budget: int, seed: int | None = None, kind: str = "tpe") -> optuna.samplers.BaseSampler:
    """TPE (default; multivariate, a few random startup trials scaled to the budget), ``gp``
    (Gaussian process; needs torch and scipy; fewer trials on a small ordinal space), or
    ``random``."""
    startup = max(2, min(10, budget // 3))
    if kind == "gp":
        try:
            import scipy  # noqa: F401 - GPSampler needs it at sampling time
            import torch  # noqa: F401
        except ImportError as err:
            raise InputError(f"sampler 'gp' needs torch and scipy ({err}); use 'tpe'") from None
        with _experimental():
            return optuna.samplers.GPSampler(n_startup_trials=startup, seed=seed)
    if kind == "tpe":
        with _experimental():
            return optuna.samplers.TPESampler(n_startup_trials=startup, multivariate=True,
                                              seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise InputError(f"sampler: expected one of {SAMPLERS}, got {kind!r}")


def open_study(url: str, name: str, *, budget: int, heartbeat: int, seed: int | None = None,
               kind: str = "tpe") -> optuna.Study:
    """Create or load study ``name`` and fail its stale RUNNING trials (see the module doc);
    ``heartbeat``: seconds between trial heartbeats."""
    study = optuna.create_study(study_name=name, storage=storage(url, heartbeat),
                                sampler=sampler(budget, seed, kind), direction="minimize",
                                load_if_exists=True)
    with _experimental():
        optuna.storages.fail_stale_trials(study)
    return study


def measured(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that count towards the budget (see the module docstring)."""
    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)
            and REPEAT not in t.user_attrs]


def finished(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The completed trials with a finite value, fastest first; repeats left out (each has the
    value of the trial it repeats)."""
    return sorted((t for t in trials if t.state == TrialState.COMPLETE and t.value is not None
                   and math.isfinite(t.value) and REPEAT not in t.user_attrs),
                  key=lambda t: t.value)


class Stop:
    """An Optuna callback that stops the study once ``budget`` measured trials exist, or once
    ``time.time()`` passes ``deadline`` (a time budget; None: none) with one measured.

    ``limit`` caps all trials (pruned and repeats included), so a space whose configs keep()
    mostly rejects cannot loop forever.
    """

    def __init__(self, budget: int, limit: int, on_trial=None, deadline: float | None = None):
        self.budget, self.limit, self.on_trial, self.deadline = budget, limit, on_trial, deadline

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trials = study.get_trials(deepcopy=False)
        if self.on_trial is not None:
            self.on_trial(study, trial, trials)
        done = len(measured(trials))
        if (done >= self.budget or len(trials) >= self.limit
                or (done and self.deadline is not None and time.time() >= self.deadline)):
            study.stop()


def plot(study: optuna.Study, folder: str | os.PathLike) -> list[Path]:
    """Write ``optimization_history.png`` and ``param_importances.png``; the paths written.

    Importance needs two or more completed trials with finite values and some parameter that
    varied; without them only the history is written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, draw in (("optimization_history", ovm.plot_optimization_history),
                           ("param_importances", ovm.plot_param_importances)):
            try:
                axes = draw(study)
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue  # too few finished trials for this plot
            path = folder / f"{name}.png"
            axes.figure.tight_layout()
            axes.figure.savefig(path, dpi=110)
            plt.close(axes.figure)
            written.append(path)
    return written
