"""Ray Tune trial schedulers that record why they stopped a trial (see :mod:`search.schedulers`
for the table and the rules). Every class here offers ``stop_record(trial_id)``: ``{"epoch",
"value", "cut", "group", "rule"}`` for a trial it stopped, else None. With ``reference`` given, the
first trial added whose parameters are the reference trial's (``reference``: the
projected recipe, enqueued first; its conditional parameters that the trial lacks aside) is never
stopped. Matching by parameters, not by order, keeps
this true after ``resume``, when Ray re-adds the trials to a scheduler restored from the tuner file.
"""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar

import numpy as np
from ray.tune.schedulers import (
    ASHAScheduler,
    FIFOScheduler,
    HyperBandScheduler,
    MedianStoppingRule,
    TrialScheduler,
)
from ray.tune.stopper import Stopper

from search.study import group_of, number
from trainables.optim import DROPS_AHEAD


def _epoch(result: dict[str, Any]) -> int | None:
    e = result.get("epoch")
    return None if isinstance(e, bool) or not isinstance(e, (int, float)) else int(e)


class _Records:
    """The stop records and the reference trial's id, shared by the schedulers below.
    ``stop_rule`` names the rule of a stop this scheduler made without recording it."""

    stop_rule = "scheduler"
    grouped = False  # compares a trial within its structural group (else with all trials)

    def _init_records(self, reference: dict[str, Any] | None) -> None:
        self.reference = dict(reference) if reference else None
        self.reference_id: str | None = None
        self._records: dict[str, dict[str, Any]] = {}

    def _note_added(self, trial: Any) -> None:
        if self.reference and self.reference_id is None:
            config = trial.config or {}
            # a conditional parameter of the recipe is absent where the sampler left its condition
            # false (the recipe's trainable not among the choices, say): match on the others
            given = [k for k in self.reference if k in config]
            if given and all(config[k] == self.reference[k] for k in given):
                self.reference_id = trial.trial_id

    def stop_record(self, trial_id: str) -> dict[str, Any] | None:
        """Why this scheduler stopped the trial (None: it did not)."""
        return self._records.get(trial_id)

    def _record(self, trial: Any, epoch: int, value: float, cut: float | None, rule: str) -> None:
        self._records[trial.trial_id] = {
            "epoch": epoch,
            "value": value,
            "cut": cut,
            "group": group_of(trial.config or {}) if self.grouped else "all trials",
            "rule": rule,
        }


class NoStopping(FIFOScheduler, _Records):
    """Every trial runs every epoch."""

    def __init__(self) -> None:
        super().__init__()
        self._init_records(None)


class StratifiedHalving(FIFOScheduler, _Records):
    """Successive halving within structural groups, plus a collapse rule.

    At each rung epoch a trial's value joins its group's record for that rung; once the group has
    ``min_group`` values there (this one included), a trial below the group's
    ``1 - 1/reduction_factor`` percentile stops (ASHA's cut, inside the group). From
    ``collapse_from`` (default: half the epochs) on, at every epoch before the last, a trial that
    is worse than its own epoch-0 value, or worse than ``collapse_ratio`` times the reference
    trial's value at the same epoch, stops whatever its group: it has collapsed.

    With ``extrapolate``, from ``collapse_from`` on a trial also stops when it cannot catch up:
    its best gain per epoch of the last two epochs, continued to the last epoch, leaves it worse
    than the best value any other trial has reported (an optimistic linear extrapolation of its
    learning curve). Only curves that have already improved on their first value by ``rise`` times
    that best value are judged, so a trial that has not started learning yet (a flat start that
    may still take off) is left to the other rules, and never one on a ``step`` schedule (its drop
    is still ahead), nor one whose best trained epoch is already at least as good as that
    best value (the study's leader has nobody to catch up with).
    """

    grouped = True

    def __init__(
        self,
        metric: str,
        mode: str,
        epochs: int,
        rungs: tuple[int, ...],
        reduction_factor: float = 2.0,
        min_group: int | None = None,
        collapse_ratio: float = 0.5,
        collapse_from: int | None = None,
        reference: dict[str, Any] | None = None,
        extrapolate: bool = False,
        rise: float = 0.25,
    ):
        super().__init__()
        self._init_records(reference)
        self._metric, self._mode = metric, mode
        self.epochs, self.rungs = int(epochs), tuple(sorted(rungs))
        self.rf = float(reduction_factor)
        self.min_group = int(min_group or max(3, math.ceil(self.rf) + 1))
        self.collapse_ratio = float(collapse_ratio)
        self.collapse_from = int(collapse_from or max(1, math.ceil(self.epochs / 2)))
        self._rung_values: dict[int, dict[str, dict[str, float]]] = {}  # rung -> group -> trial -> value
        self._curves: dict[str, dict[int, float]] = {}  # trial -> epoch -> value
        self._tops: dict[str, float] = {}  # trial -> the best value of its curve
        self.extrapolate, self.rise = bool(extrapolate), float(rise)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling (``resume``): a scheduler saved before ``extrapolate`` existed keeps working."""
        state.setdefault("extrapolate", False)
        state.setdefault("rise", 0.25)
        self.__dict__.update(state)
        if "_tops" not in state:  # saved before the per-trial bests were kept
            self._tops = {t: self._best(c.values()) for t, c in self._curves.items() if c}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # set in the constructor from the spec's objective

    def restore_history(self, trials: Any) -> None:
        """``resume``: Ray saves no scheduler state (the one it restores is as the launch made it),
        so the curves, rung values and the reference trial come back from study.json's trial
        records (``id``, ``params``, ``history``, ``reference``), and so do the records of the stops
        it made (``stopped``); no decision is taken again."""
        for t in trials:
            tid = t.get("id")
            if t.get("reference") and self.reference_id is None:
                self.reference_id = tid
            if t.get("stopped_by") == "scheduler" and isinstance(t.get("stopped"), dict):
                self._records.setdefault(tid, dict(t["stopped"]))
            curve = self._curves.setdefault(tid, {})
            for row in t.get("history") or []:
                epoch, value = _epoch(row), number(row.get(self._metric))
                if epoch is None or value is None or row.get("diverged"):
                    continue
                curve[epoch] = value
                if epoch in self.rungs and 1 <= epoch < self.epochs:
                    group = group_of(t.get("params") or {})
                    self._rung_values.setdefault(epoch, {}).setdefault(group, {})[tid] = value
            if curve:
                self._tops[tid] = self._best(curve.values())

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._note_added(trial)

    def _worse(self, a: float, b: float) -> bool:
        return a < b if self._mode == "max" else a > b

    def _best(self, values: Any) -> float | None:
        """The best of ``values`` in the study's mode (None when there are none)."""
        values = list(values)
        if not values:
            return None
        return max(values) if self._mode == "max" else min(values)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        epoch, value = _epoch(result), number(result.get(self._metric))
        if epoch is None or value is None or result.get("diverged"):
            return TrialScheduler.CONTINUE
        curve = self._curves.setdefault(trial.trial_id, {})
        curve[epoch] = value
        self._tops[trial.trial_id] = self._best(curve.values())  # the curve may be rewritten (resume)
        if epoch < 1 or epoch >= self.epochs:
            return TrialScheduler.CONTINUE
        group = group_of(trial.config or {})
        peers = None
        if epoch in self.rungs:
            peers = self._rung_values.setdefault(epoch, {}).setdefault(group, {})
            peers[trial.trial_id] = value
        if trial.trial_id == self.reference_id:
            return TrialScheduler.CONTINUE
        cut = self._collapse_cut(curve, epoch)
        if cut is not None and self._worse(value, cut):
            self._record(trial, epoch, value, cut, "collapse")
            return TrialScheduler.STOP
        best = self._out_of_reach(trial, curve, epoch)
        if best is not None:
            self._record(trial, epoch, value, best, "extrapolation")
            return TrialScheduler.STOP
        if peers is not None and len(peers) >= self.min_group:
            scores = [v if self._mode == "max" else -v for v in peers.values()]
            cut = float(np.percentile(scores, (1 - 1 / self.rf) * 100))
            cut = cut if self._mode == "max" else -cut
            if self._worse(value, cut):
                self._record(trial, epoch, value, cut, "halving")
                return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def _collapse_cut(self, curve: dict[int, float], epoch: int) -> float | None:
        """The value a trial must not be worse than at ``epoch`` (None: no collapse rule yet)."""
        if epoch < self.collapse_from:
            return None
        lines = []
        if curve.get(0) is not None:
            lines.append(curve[0])
        ref = self._curves.get(self.reference_id or "", {}).get(epoch)
        if ref is not None:
            lines.append(ref * self.collapse_ratio if self._mode == "max" else ref / self.collapse_ratio)
        return self._best(lines)

    def _out_of_reach(self, trial: Any, curve: dict[int, float], epoch: int) -> float | None:
        """The extrapolation rule (see the class): the best value another trial has reported when
        the trial's optimistic final value is worse than it, else None."""
        if not self.extrapolate or epoch < self.collapse_from:
            return None
        if (trial.config or {}).get("schedule") in DROPS_AHEAD:
            return None
        best = self._best(v for t, v in self._tops.items() if t != trial.trial_id)
        own = self._best(v for e, v in curve.items() if e >= 1)
        if best is None or not self._worse(own, best):
            return None  # nobody to catch up with: it leads (or shares the lead)
        sign = 1.0 if self._mode == "max" else -1.0
        score = {e: sign * v for e, v in curve.items()}
        if max(score.values()) - score[min(score)] < self.rise * abs(best):
            return None  # not started learning yet: a flat start may still take off
        return best if self._bound(score, epoch) < sign * best else None

    def _bound(self, score: dict[int, float], epoch: int) -> float:
        """The optimistic final score of a curve (``score``: epoch -> value, larger is better): its
        best gain per epoch of the last two epochs, continued to the last epoch."""
        gains = [score[e] - score[e - 1] for e in (epoch - 1, epoch) if e in score and e - 1 in score]
        return score[epoch] + (self.epochs - epoch) * max([0.0, *gains])

    def debug_string(self) -> str:
        return f"StratifiedHalving: rungs {self.rungs}, {len(self._records)} stopped"


class _Spared(_Records):
    """Mixin (before a Ray scheduler in the bases): records stops, never stops the reference."""

    def __init__(self, *args: Any, reference: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._init_records(reference)

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        self._note_added(trial)

    def _spare(self, trial: Any, decision: str) -> str:
        """The decision, with the reference trial's STOP turned into CONTINUE."""
        if decision == TrialScheduler.STOP and trial.trial_id == self.reference_id:
            return TrialScheduler.CONTINUE
        return decision


class RecordingASHA(_Spared, ASHAScheduler):
    """Ray's ASHA (one bracket), recording the rung cut of each stop. A trial's last epoch
    (``max_t``) is never a stop: the trial ends on its own. Ray STOPs it there (always by default,
    else when a rung sits at ``max_t``: epochs 8, grace 1, factor 2), which recorded a halving of
    a finished trial and could end its process before it wrote ``trial.json`` and checked the base
    weights (Ray's cleanup does not wait for the trial's thread)."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        value, epoch = number(result.get(self._metric)), _epoch(result)
        if epoch is not None and epoch >= self._max_t:
            return TrialScheduler.CONTINUE
        bracket = self._trial_info.get(trial.trial_id)
        rung = self._deciding_rung(bracket, trial.trial_id, epoch)  # before Ray records the value
        decision = self._spare(trial, super().on_trial_result(tune_controller, trial, result))
        if decision != TrialScheduler.STOP or value is None or epoch is None:
            return decision
        c = bracket.cutoff(rung) if rung else None
        self._record(trial, epoch, value, None if c is None else float(c) * self._metric_op, "halving")
        return decision

    def _deciding_rung(self, bracket: Any, trial_id: str, epoch: float | None) -> dict[str, float] | None:
        """A copy of the values of the rung Ray's bracket judges this result against, as Ray finds
        it: the highest rung at or below the epoch that does not hold the trial yet (after a resume
        from an earlier checkpoint, a lower rung than one it is in); None when none is judged."""
        if epoch is None:
            return None
        for milestone, recorded in getattr(bracket, "_rungs", []):  # highest first
            if epoch >= milestone and trial_id in recorded and not self._stop_last_trials:
                return None
            if epoch >= milestone and trial_id not in recorded:
                return dict(recorded)
        return None


class RecordingHyperBand(_Spared, HyperBandScheduler):
    """Ray's HyperBand, recording the epoch and value of each stop (the bracket cut is internal).
    Ray also stops a bracket's *paused* trials while handling another trial's result; those stops
    have no record here, and the study records them from the trial's history under ``stop_rule``.
    The reference trial is never among a halving's losers (it goes on with the winners)."""

    stop_rule = "hyperband"

    def _process_bracket(self, tune_controller: Any, bracket: Any) -> str:
        halving = bracket.successive_halving  # Ray's halving, which also stops the paused losers

        def sparing(metric: str, metric_op: float) -> tuple[list, list]:
            good, bad = spare_reference(*halving(metric, metric_op), self.reference_id)
            bracket._n = len(good)  # else Ray's filled() never holds again: later trials join it, unhalved
            return good, bad

        bracket.successive_halving = sparing
        try:
            return super()._process_bracket(tune_controller, bracket)
        finally:
            del bracket.successive_halving

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = self._spare(trial, super().on_trial_result(tune_controller, trial, result))
        value, epoch = number(result.get(self._metric)), _epoch(result)
        if decision == TrialScheduler.STOP and value is not None and epoch is not None:
            self._record(trial, epoch, value, None, self.stop_rule)
        return decision


def spare_reference(good: list, bad: list, reference_id: str | None) -> tuple[list, list]:
    """A halving's ``(good, bad)`` trials with the reference trial moved to the good ones."""
    spared = [t for t in bad if t.trial_id == reference_id]
    return good + spared, [t for t in bad if t.trial_id != reference_id]


class RecordingMedian(_Spared, MedianStoppingRule):
    """Ray's median stopping rule, recording each stop (the median is internal)."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = self._spare(trial, super().on_trial_result(tune_controller, trial, result))
        if trial.trial_id == self.reference_id:
            # Ray noted it as stopped before _spare: its next result asserted a soft stop, and its
            # later values were left out of the other trials' medians
            self._stopped_trials.discard(trial)
        value, epoch = number(result.get(self._metric)), _epoch(result)
        if decision == TrialScheduler.STOP and value is not None and epoch is not None:
            self._record(trial, epoch, value, None, "median")
        return decision


class BudgetStopper(Stopper):
    """Ray stopper for the time budget: after ``deadline`` each running trial stops at its next
    report (right after its epoch checkpoint); the searcher starts no new trial.

    Ray saves its stopper with the experiment's state and, on ``resume``, restores it over the one
    the resume passes: a restored stopper takes the deadline of this process's run (the last one
    made here), not the launch's, which passed while the study was down and stopped every trial
    at its first report."""

    _run: ClassVar[dict[str, float | None]] = {}  # "deadline": this process's run's

    def __init__(self, deadline: float | None):
        self.deadline = deadline
        BudgetStopper._run["deadline"] = deadline

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "deadline" in self._run:
            self.deadline = self._run["deadline"]

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return self.deadline is not None and time.time() >= self.deadline

    def stop_all(self) -> bool:
        return False
