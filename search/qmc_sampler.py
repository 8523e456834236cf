"""Optuna's QMC sampler over one fixed search space: a module of its own so that the sampler table
(:mod:`search.samplers`) imports no Optuna, and the class pickles (Ray checkpoints the searcher)."""

from __future__ import annotations

from typing import Any

import optuna


class FixedSpaceQMC(optuna.samplers.QMCSampler):
    """QMCSampler whose joint space is the spec's unconditional parameters, from the first trial on.

    Optuna's QMCSampler takes its space from the first finished trial (the running trials' union
    before that), and numbers its points per space: in a space with conditional parameters
    (``momentum`` only with SGD) the space changed when the first trial finished, the sequence
    started again from its first point, and a trial repeated an earlier one's values. Here the
    space never changes; conditional parameters are drawn by the independent (random) sampler,
    without a warning per parameter and trial."""

    def __init__(self, space: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(warn_independent_sampling=False, **kwargs)
        self._fixed_space = dict(space)

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:  # noqa: D102
        return dict(self._fixed_space)
