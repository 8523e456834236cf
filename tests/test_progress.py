"""The progress printout while a study runs: the table after a trial ends, but not one per trial
for a study of many short trials (an audit: 36 trials of 2 s each printed 37 full tables of up to 36
rows, the last one right above the summary's own table)."""

from __future__ import annotations

import io

from search import study as S
from search.progress import Progress, StudyState


class Ended:
    """What the progress callbacks read of a Ray trial."""

    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id


def _trial(i: int) -> dict:
    return {"id": f"t{i}", "index": i, "state": S.RUNNING, "epochs": 1, "history": [], "params": {"lr": 0.01}}


def test_a_table_after_a_trial_ends_at_most_every_quarter_period_and_not_before_the_summary(tmp_path):
    study = StudyState(tmp_path, "p", "map50", "max", epochs=1)
    study.state["trials"] = {f"t{i}": _trial(i) for i in range(3)}
    out = io.StringIO()
    progress = Progress(study, num_trials=3, key_params=["lr"], table_every=60.0, stream=out)
    progress._last_table -= 60  # the last table a minute ago

    def end(i: int) -> int:
        study.state["trials"][f"t{i}"]["state"] = S.COMPLETE
        before = out.getvalue().count("\nt0 ")
        progress.on_trial_complete(0, [], Ended(f"t{i}"))
        return out.getvalue().count("\nt0 ") - before  # the tables printed (each has a row t0)

    assert end(0) == 1  # the first end: its table
    assert end(1) == 0  # the next within 15 s: none
    progress._last_table -= 60
    assert end(2) == 0  # the last trial: the summary's table follows
    assert out.getvalue().count("trial 3/3 t2 complete") == 1  # its line is still said


def test_the_progress_lines_show_the_learning_rate_and_the_structural_choices_first(tmp_path):
    """They showed the first 6 names of the space: in a long one, ``trainable`` (a structural
    choice, the group a trial is judged in) never appeared."""
    study = StudyState(tmp_path, "p", "map50", "max", epochs=1)
    names = "optimizer momentum weight_decay warmup_epochs beta1 lr grad_clip trainable".split()
    progress = Progress(study, num_trials=3, key_params=names, stream=io.StringIO())
    assert progress.key_params == "lr optimizer trainable momentum weight_decay warmup_epochs".split()
