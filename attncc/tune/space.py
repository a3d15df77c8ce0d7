"""[7] A backend's SearchSpace as Optuna parameters.

Every tunable becomes one categorical parameter over its listed values, so TPE models each tile
size separately (multivariate TPE models them jointly). A config that the backend's ``keep()``
filter rejects is never compiled or timed: ``suggest`` raises ``optuna.TrialPruned``, so the trial
is recorded as PRUNED (TPE ranks pruned trials below every completed one, steering away from the
region) and it does not count towards the tune's budget of measured trials.
"""

from __future__ import annotations

import optuna

from attncc.backends.base import SearchSpace

#: The user attribute that marks a trial whose config keep() rejected.
INVALID = "invalid"


def suggest(trial: optuna.Trial, space: SearchSpace, base: dict) -> dict:
    """The config of ``trial``: ``base`` (the backend's defaults) updated with the suggestions.

    Raises ``optuna.TrialPruned`` when ``space.keep`` rejects it (see the module docstring).
    """
    config = dict(base)
    for name, values in space.params.items():
        config[name] = trial.suggest_categorical(name, list(values))
    if not space.keep(config):
        trial.set_user_attr(INVALID, True)
        raise optuna.TrialPruned(f"config {config} rejected by the backend's keep() filter")
    return config


def signature(config: dict) -> tuple:
    """A hashable identity of a config, for spotting repeats."""
    return tuple(sorted((name, repr(value)) for name, value in config.items()))


def tunables(space: SearchSpace, config: dict) -> dict:
    """Only the tunable entries of ``config`` (what a study's trial params hold)."""
    return {name: config[name] for name in space.params if name in config}


def fits(space: SearchSpace, base: dict, config: dict) -> bool:
    """Whether ``config`` names only tunables, uses listed values, and passes ``keep``."""
    if set(config) - set(space.params):
        return False
    if any(config[name] not in space.params[name] for name in config):
        return False
    return bool(space.keep({**base, **config}))
