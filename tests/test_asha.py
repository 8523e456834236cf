"""Ray's ASHA as the study runs it (:class:`search.stopping.RecordingASHA`): a trial's last epoch
is never a stop (the rung cut and the reference's sparing: tests/test_schedulers.py); no halving
scheduler stops a trial before the grace period; and the stratified ones judge by the objective's mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from search.schedulers import make_scheduler
from search.spec import load_spec
from search.stopping import RecordingASHA
from tests.test_schedulers import GO, STOP, trial

ROOT = Path(__file__).resolve().parents[1]


def test_recording_asha_never_stops_a_trial_at_its_last_epoch():
    """max_t 4, grace 1, factor 2 puts a rung at epoch 4: b falls below a's cut there, but its
    last epoch is no stop (the trial ends on its own), and nothing is recorded."""
    sched = RecordingASHA(time_attr="epoch", max_t=4, grace_period=1, reduction_factor=2, reference=None)
    sched.set_search_properties("map50", "max")
    a, b = trial("a", lr=0.1), trial("b", lr=0.2)
    for t in (a, b):
        sched.on_trial_add(None, t)
    for epoch in (1, 2, 3):
        assert [
            sched.on_trial_result(None, t, {"epoch": epoch, "map50": v}) for t, v in ((a, 0.9), (b, 0.95))
        ] == [GO, GO]
    assert sched.on_trial_result(None, a, {"epoch": 4, "map50": 0.9}) == GO
    assert sched.on_trial_result(None, b, {"epoch": 4, "map50": 0.5}) == GO and sched.stop_record("b") is None


def test_a_resumed_trials_stop_records_the_cut_of_the_rung_that_judged_it():
    """An audit: a trial resumed from its epoch-1 checkpoint reported epoch 2 (alone in that rung),
    then epoch 3, where Ray judged it at rung 1 (its epoch-1 value was lost with the old scheduler)
    against b's 0.00495 and stopped it; the record said no cut, from rung 2."""
    sched = RecordingASHA(time_attr="epoch", max_t=4, grace_period=1, reduction_factor=2, reference=None)
    sched.set_search_properties("map50", "max")
    a, b = trial("a", lr=0.1), trial("b", lr=0.2)
    for t in (a, b):
        sched.on_trial_add(None, t)
    assert sched.on_trial_result(None, b, {"epoch": 1, "map50": 0.00495}) == GO
    assert sched.on_trial_result(None, a, {"epoch": 2, "map50": 0.01}) == GO  # alone in rung 2
    assert sched.on_trial_result(None, a, {"epoch": 3, "map50": 0.0}) == STOP
    record = sched.stop_record("a")
    assert record["epoch"] == 3 and record["value"] == 0.0 and record["cut"] == 0.00495


@pytest.mark.parametrize(("epochs", "grace", "first"), [(8, 1, 4), (8, 7, 7), (3, 1, 2), (8, 4, 4)])
def test_no_rule_stops_a_trial_before_the_grace_period(epochs, grace, first):
    """The collapse rule acted from half the epochs whatever search.grace_period said (README: the
    earliest epoch at which a trial can be stopped): at grace 7 of 8, a trial stopped at epoch 4."""
    sets = [f"train.epochs={epochs}", f"search.grace_period={grace}"]
    for name in ("stratified", "curve"):
        scheduler = make_scheduler(load_spec(ROOT / "spaces/det.yaml", [*sets, f"search.scheduler={name}"]))
        assert scheduler.collapse_from == first and all(r >= grace for r in scheduler.rungs)


@pytest.mark.parametrize("name", ["auto", "stratified", "curve"])
def test_the_stratified_schedulers_follow_the_objectives_mode(name):
    """The scheduler's mode came from the objective; fixed to "max" a lower-is-better objective
    would stop its best trials at the rungs (every metric today is better higher: the spec refuses
    min, so the loaded spec's objective is edited)."""
    spec = load_spec(ROOT / "spaces/det.yaml", [f"search.scheduler={name}"])
    spec.objective.mode = "min"
    sched = make_scheduler(spec)
    rung, metric = sched.rungs[0], spec.objective.metric
    trials = [trial(f"t{i}", lr=0.001 * (i + 1)) for i in range(4)]
    decisions = [
        sched.on_trial_result(None, t, {"epoch": rung, metric: v})
        for t, v in zip(trials, (0.1, 0.2, 0.9, 0.05), strict=True)
    ]
    assert decisions == [GO, GO, STOP, GO]  # the high one stops, a lower one goes on
    assert sched.stop_record("t2")["value"] == 0.9
