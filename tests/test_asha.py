"""Ray's ASHA as the study runs it (:class:`search.stopping.RecordingASHA`): a trial's last epoch
is never a stop (the rung cut and the reference's sparing: tests/test_schedulers.py)."""

from __future__ import annotations

from search.stopping import RecordingASHA
from tests.test_schedulers import GO, trial


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
