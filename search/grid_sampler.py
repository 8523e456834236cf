"""Optuna's grid sampler for a study run by Ray: a module of its own so that the sampler table
(:mod:`search.samplers`) imports no Optuna, and the class pickles (Ray checkpoints the searcher)."""

from __future__ import annotations

import optuna


class GridNoStop(optuna.samplers.GridSampler):
    """GridSampler that never calls ``study.stop()`` (it raises outside ``optimize``); the
    launcher caps the number of trials at the grid size instead."""

    def after_trial(self, study, trial, state, values) -> None:  # noqa: D102
        return None
