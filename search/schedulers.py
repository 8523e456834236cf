"""Trial schedulers (early stopping): one name -> factory table, :data:`SCHEDULERS`.

The spec's ``search.scheduler`` accepts exactly the names of this table (:data:`SCHEDULER_NAMES`).
This module imports no Ray (spec validation reads it); the factories import
:mod:`search.stopping`, where the Ray scheduler classes live. Every scheduler built here counts
training epochs (``time_attr="epoch"``: the epoch-0 base evaluation never stops a trial) and keeps a
record of why it stopped each trial (``stop_record(trial_id)``: epoch, value, cut, group, rule).

- ``auto`` (default): the scheduler that measured best for fine-tuning (BENCHMARKS.md §3); now
  ``curve``.
- ``stratified``: successive halving within groups of trials that share their structural choices
  (:data:`STRUCTURAL`: which weights train, norms, activations, losses, optimizer), rungs placed
  after warm-up at ``epochs / rf`` and ``epochs / rf**2``, plus a collapse rule from half the
  epochs on (worse than the trial's own start, or than half the reference trial at that epoch).
  The reference trial is never stopped.
- ``curve``: ``stratified``, plus learning-curve extrapolation from half the epochs on: a trial
  whose best gain per epoch of its last two epochs, continued to the last epoch, leaves it below
  the best value another trial has reported cannot win and stops. Only curves that have started
  learning are judged (risen by a quarter of that best value), never a ``step`` schedule.
- ``asha``, ``hyperband``, ``median``: Ray Tune's schedulers (asynchronous successive halving
  from ``grace_period`` with ``reduction_factor``; HyperBand brackets; the median stopping rule),
  comparing every trial with every other. Ray's HyperBand is synchronous: it halves a bracket only
  once all the bracket's trials exist, so the spec demands ``max_concurrent >= num_trials`` for it
  (with fewer it stops nothing).
- ``none``: every trial runs every epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from search.study import STRUCTURAL, group_of  # noqa: F401 - part of this module's interface


def rungs_for(epochs: int, grace_period: int, reduction_factor: float, warmup: float) -> tuple[int, ...]:
    """Rung epochs of the stratified scheduler: ``epochs / rf`` and ``epochs / rf**2`` (rounded),
    none before ``grace_period``, none inside the warm-up, none at the last epoch."""
    first = max(int(grace_period), int(math.floor(warmup)) + 1)
    cands = {int(round(epochs / reduction_factor**k)) for k in (1, 2)}
    return tuple(sorted(r for r in cands if first <= r < epochs))


def _warmup(spec: Any) -> float:
    dim = spec.search_space.by_name.get("warmup_epochs")
    if dim is None:
        return 0.0
    if dim.kind == "categorical":  # the longest warm-up any trial may have
        return max(float(c) for c in dim.choices)
    return float(dim.value if dim.kind == "fixed" else dim.high)


def _stratified(spec: Any, extrapolate: bool = False) -> Any:
    from search.stopping import StratifiedHalving

    s, epochs = spec.search, spec.train.epochs
    return StratifiedHalving(
        metric=spec.objective.metric,
        mode=spec.objective.mode,
        epochs=epochs,
        rungs=rungs_for(epochs, s.grace_period, s.reduction_factor, _warmup(spec)),
        reduction_factor=s.reduction_factor,
        collapse_from=max(int(s.grace_period), math.ceil(epochs / 2), 1),  # no stop before the grace
        reference=spec.reference_params(),
        extrapolate=extrapolate,
    )


def _curve(spec: Any) -> Any:
    return _stratified(spec, extrapolate=True)


def _asha(spec: Any) -> Any:
    from search.stopping import RecordingASHA

    s = spec.search
    return RecordingASHA(
        time_attr="epoch",
        max_t=spec.train.epochs,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
        reference=spec.reference_params(),
    )


def _hyperband(spec: Any) -> Any:
    from search.stopping import RecordingHyperBand

    return RecordingHyperBand(
        time_attr="epoch",
        max_t=spec.train.epochs,
        reduction_factor=spec.search.reduction_factor,
        reference=spec.reference_params(),
    )


def _median(spec: Any) -> Any:
    from search.stopping import RecordingMedian

    s = spec.search
    return RecordingMedian(
        time_attr="epoch",
        grace_period=float(s.grace_period),
        min_samples_required=min(3, max(1, s.num_trials - 1)),
        reference=spec.reference_params(),
    )


def _none(spec: Any) -> Any:
    from search.stopping import NoStopping

    return NoStopping()


@dataclass(frozen=True)
class SchedulerEntry:
    doc: str
    factory: Callable[[Any], Any]  # spec -> Ray scheduler
    uses: tuple[str, ...] = ("grace_period", "reduction_factor")  # the search.* settings it reads


AUTO = "curve"  # what ``auto`` means now: the scheduler measured best for fine-tuning

SCHEDULERS: dict[str, SchedulerEntry] = {
    "auto": SchedulerEntry(
        f"the default: the scheduler measured best for fine-tuning ({AUTO})",
        lambda spec: SCHEDULERS[AUTO].factory(spec),
    ),
    "stratified": SchedulerEntry("successive halving within structural groups + collapse rule", _stratified),
    "curve": SchedulerEntry(
        "stratified + stop a trial whose optimistic learning-curve extrapolation stays below the best",
        _curve,
    ),
    "asha": SchedulerEntry("Ray's asynchronous successive halving over all trials", _asha),
    "hyperband": SchedulerEntry("Ray's HyperBand brackets", _hyperband, uses=("reduction_factor",)),
    "median": SchedulerEntry("Ray's median stopping rule", _median, uses=("grace_period",)),
    "none": SchedulerEntry("no early stopping: every trial runs every epoch", _none, uses=()),
}
SCHEDULER_NAMES = tuple(SCHEDULERS)


def resolved(name: str) -> str:
    """The scheduler a name runs: ``auto`` is :data:`AUTO`; every other name is itself."""
    return AUTO if name == "auto" else name


def scheduler_label(name: str) -> str:
    """``name`` as the launch header shows it: ``auto`` says what it stands for."""
    return f"{name} ({AUTO})" if name == "auto" else name


def make_scheduler(spec: Any) -> Any:
    """The Ray trial scheduler for ``spec.search.scheduler``."""
    return SCHEDULERS[spec.search.scheduler].factory(spec)
