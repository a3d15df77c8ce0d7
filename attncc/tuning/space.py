"""[7] A backend's SearchSpace as Optuna parameters.

Tile sizes are ordered, and TPE learns faster when it knows that 32 lies between 16 and 64, so
each tunable becomes the most ordered parameter its values allow:

- values that are powers of two evenly spaced in log2 (16, 32, 64... or 1, 4, 16, 64): an int
  parameter ``log2_<name>`` over the exponents (with that step);
- other numbers: an int parameter ``<name>_index`` over their sorted positions;
- anything else (booleans, strings): a categorical parameter ``<name>``.

``encode``/``decode`` map configs to trial params and back (warm starts, repeats, the winner).

A config that the backend's ``keep()`` filter rejects is never compiled or timed: ``suggest``
raises ``optuna.TrialPruned``, so the trial is recorded as PRUNED (TPE ranks pruned trials below
every completed one, steering away from the region) and it does not count towards the tune's
budget of measured trials.
"""

from __future__ import annotations

import math
from itertools import pairwise

import optuna

from attncc.backends.base import SearchSpace

#: The user attribute that marks a trial whose config keep() rejected.
INVALID = "invalid"


def _kind(values: tuple) -> tuple[str, object]:
    """('log2', (lo, hi, step)) | ('index', sorted values) | ('categorical', values)."""
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if numeric and len(values) > 1:
        ordered = sorted(values)
        if all(isinstance(v, int) and v > 0 and v & (v - 1) == 0 for v in ordered):
            exps = [int(math.log2(v)) for v in ordered]
            steps = {b - a for a, b in pairwise(exps)}
            if len(steps) == 1:
                return "log2", (exps[0], exps[-1], steps.pop())
        return "index", tuple(ordered)
    return "categorical", tuple(values)


def _params(space: SearchSpace):
    """``(tunable, kind, info, trial parameter name)`` per tunable of ``space`` (``_kind``)."""
    for name, values in space.params.items():
        kind, info = _kind(values)
        yield name, kind, info, {"log2": f"log2_{name}", "index": f"{name}_index"}.get(kind, name)


def _value(kind: str, info, param):
    """The config value that trial parameter ``param`` of ``_kind`` ``(kind, info)`` stands for."""
    if kind == "log2":
        return 2 ** int(param)
    return info[int(param)] if kind == "index" else param


def suggest(trial: optuna.Trial, space: SearchSpace, base: dict) -> dict:
    """The config of ``trial``: ``base`` (the backend's defaults) updated with the suggestions.

    Raises ``optuna.TrialPruned`` when ``space.keep`` rejects it (see the module docstring).
    """
    config = dict(base)
    for name, kind, info, key in _params(space):
        if kind == "log2":
            param = trial.suggest_int(key, info[0], info[1], step=info[2])
        elif kind == "index":
            param = trial.suggest_int(key, 0, len(info) - 1)
        else:
            param = trial.suggest_categorical(key, list(info))
        config[name] = _value(kind, info, param)
    if not space.keep(config):
        trial.set_user_attr(INVALID, True)
        raise optuna.TrialPruned(f"config {config} rejected by the backend's keep() filter")
    return config


def encode(space: SearchSpace, config: dict) -> dict:
    """Trial params for the tunables in ``config`` (values must be listed in the space)."""
    params = {}
    for name, kind, info, key in _params(space):
        if name in config:
            value = config[name]
            params[key] = (int(math.log2(value)) if kind == "log2" else
                           info.index(value) if kind == "index" else value)
    return params


def decode(space: SearchSpace, params: dict) -> dict:
    """The tunable values that trial ``params`` stand for (inverse of ``encode``)."""
    return {name: _value(kind, info, params[key]) for name, kind, info, key in _params(space)
            if key in params}


def signature(config: dict) -> tuple:
    """A hashable identity of a config, for spotting repeats."""
    return tuple(sorted((name, repr(value)) for name, value in config.items()))


def tunables(space: SearchSpace, config: dict) -> dict:
    """Only the tunable entries of ``config``."""
    return {name: config[name] for name in space.params if name in config}


def fits(space: SearchSpace, base: dict, config: dict) -> bool:
    """Whether ``config`` sets every tunable to a listed value and passes ``keep``."""
    return (set(config) == set(space.params)
            and all(config[name] in space.params[name] for name in config)
            and bool(space.keep({**base, **config})))
