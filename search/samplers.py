"""Samplers: ``search.algorithm`` is one name of :data:`SAMPLERS` (name → factory of a seeded
Optuna sampler). Importing this module imports no Optuna: the spec reads the names from here.

To add a sampler: one factory and one row below.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple


class SamplerArgs(NamedTuple):
    seed: int
    startup: int  # random start-up trials (TPE, CMA-ES, GP)
    grid: dict[str, list[Any]]  # grid search only: parameter -> values
    joint: dict[str, Any]  # QMC only: the unconditional parameters' Optuna distributions


def _tpe(a: SamplerArgs) -> Any:
    import optuna

    return optuna.samplers.TPESampler(
        multivariate=True, group=True, constant_liar=True, seed=a.seed, n_startup_trials=a.startup
    )


def _random(a: SamplerArgs) -> Any:
    import optuna

    return optuna.samplers.RandomSampler(seed=a.seed)


def _independent(a: SamplerArgs) -> dict[str, Any]:
    """What CMA-ES and GP do with parameters outside their joint space (those that exist only
    beside another's value, e.g. ``momentum`` only with SGD): TPE samples them, without a warning
    per parameter and trial in the log."""
    import optuna

    fallback = optuna.samplers.TPESampler(seed=a.seed, n_startup_trials=a.startup, constant_liar=True)
    return {"independent_sampler": fallback, "warn_independent_sampling": False}


def _cmaes(a: SamplerArgs) -> Any:
    import optuna

    return optuna.samplers.CmaEsSampler(seed=a.seed, n_startup_trials=a.startup, **_independent(a))


def _gp(a: SamplerArgs) -> Any:
    import optuna

    return optuna.samplers.GPSampler(seed=a.seed, n_startup_trials=a.startup, **_independent(a))


def _qmc(a: SamplerArgs) -> Any:
    from search.qmc_sampler import FixedSpaceQMC

    return FixedSpaceQMC(a.joint, seed=a.seed, scramble=True)


def _grid(a: SamplerArgs) -> Any:
    from search.grid_sampler import GridNoStop

    return GridNoStop(a.grid, seed=a.seed)


# name -> factory. TPE (the default) is multivariate with grouped conditional parameters and a
# constant liar for running trials.
SAMPLERS: dict[str, Callable[[SamplerArgs], Any]] = {
    "tpe": _tpe,
    "random": _random,
    "cmaes": _cmaes,
    "gp": _gp,
    "qmc": _qmc,
    "grid": _grid,
}
MODEL_BASED = ("tpe", "cmaes", "gp")  # the samplers that start with random trials (n_startup_trials)


def make_sampler(
    algorithm: str,
    seed: int,
    num_trials: int,
    n_startup: int | None,
    grid: dict[str, list[Any]] | None = None,
    recipe_trials: int = 0,
    joint: dict[str, Any] | None = None,
) -> Any:
    """The seeded Optuna sampler of ``search.algorithm``; start-up trials sized to the budget
    (a third of the trials, 2 to 10) unless ``n_startup`` is given. Optuna counts enqueued trials
    as start-up: the reference trial is one of them, the ``recipe_trials`` after it (the recipe
    at other lr scalings, which differ from it in the lr only) are added, so that TPE's first
    model still sees as many random, varied trials. ``joint``: QMC's space (the unconditional
    parameters' distributions, :meth:`search.space.SearchSpace.joint`)."""
    if algorithm not in SAMPLERS:
        raise ValueError(f"search.algorithm must be one of {', '.join(SAMPLERS)}, but got {algorithm!r}")
    startup = startup_size(num_trials, recipe_trials) if n_startup is None else n_startup
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return SAMPLERS[algorithm](SamplerArgs(seed, startup, grid or {}, joint or {}))


def startup_size(num_trials: int, recipe_trials: int = 0) -> int:
    """The default random start-up of :func:`make_sampler`: a third of the trials (2 to 10), plus
    the recipe trials after the reference."""
    return max(2, min(10, num_trials // 3)) + max(0, recipe_trials - 1)


def num_samples(spec: Any) -> int:
    """num_trials, capped at the grid size for grid search."""
    if spec.search.algorithm == "grid":
        return min(spec.search.num_trials, grid_size(spec.search_space.grid()))
    return spec.search.num_trials


def grid_size(grid: dict[str, list[Any]]) -> int:
    n = 1
    for values in grid.values():
        n *= max(1, len(values))
    return n
