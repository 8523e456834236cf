"""A trial lost in a SIGKILL (started, its MLflow run opened, never in Ray's saved state) and
re-run by ``resume``: the re-run takes the lost trial's run over (real SQLite MLflow store, the real
searcher; the tracker driven without Ray, as the launcher's callbacks would)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mlflow.entities import ViewType

from search import mlflow_store, run_map, tracking, write_queue
from search.progress import StudyState
from search.searcher import load_study
from search.spec import load_spec
from tests.test_searcher import study_search
from tests.test_tracking import EPOCHS, write_spec


def _killed_after_a_trial_started(tmp_path, named: bool = True):
    """A study whose driver was SIGKILLed after the tracker opened trial "lost"'s run and before Ray
    saved that trial (the searcher's checkpoint predates it); returns what resume starts from.
    ``named=False``: the kill came before the run map named that run (only its run key tag does)."""
    spec = load_spec(write_spec(tmp_path, name="lost"))
    exp_dir = Path(spec.output_dir) / spec.name
    exp_dir.mkdir(parents=True)
    journal, ckpt = exp_dir / "optuna.journal", tmp_path / "searcher.pkl"
    searcher = study_search(journal, "lost", EPOCHS)
    kept = SimpleNamespace(trial_id="kept", config=searcher.suggest("kept"), path="", status="RUNNING")
    searcher.save(str(ckpt))  # Ray's last save before the kill
    lost = SimpleNamespace(trial_id="lost", config=searcher.suggest("lost"), path="", status="RUNNING")
    cb = tracking.make_callback(spec, exp_dir, resume=False)
    cb.setup()
    for trial in (kept, lost):
        cb.on_trial_start(0, [kept], trial)
    cb.on_trial_result(0, [kept], lost, {"epoch": 0, "map": 0.05})
    assert cb.queue.close(30) == []  # then the kill: nothing ended
    restored = study_search(journal, "lost", EPOCHS)
    restored.restore(str(ckpt))
    runs_file = exp_dir / run_map.RUNS_FILE
    data = json.loads(runs_file.read_text())
    lost_run = data["runs"]["lost"] if named else data["runs"].pop("lost")
    runs_file.write_text(json.dumps(data))
    return SimpleNamespace(
        spec=spec,
        exp_dir=exp_dir,
        runs_file=runs_file,
        searcher=restored,
        kept=kept,
        lost=lost,
        lost_run=lost_run,
    )


def _resume(w, trials: list, run: bool = True) -> tuple[dict, Any]:
    """The resumed run's tracker over ``trials`` (each reports every epoch and finishes, unless not
    ``run``: the study ends before they restart); returns every run of the study's experiment by
    trial id (the parent under "parent"), and the client."""
    cb = tracking.make_callback(w.spec, w.exp_dir, resume=True)
    cb.study_state = SimpleNamespace(searcher=w.searcher, state={"trials": {}}, deadline=w.searcher.deadline)
    cb.setup()
    for trial in trials if run else []:
        for epoch in range(EPOCHS + 1):
            cb.on_trial_result(0, trials, trial, {"epoch": epoch, "map": 0.1 * epoch})
        cb.on_trial_complete(0, trials, trial)
    cb.on_experiment_end(trials)
    mlc = mlflow_store.client(mlflow_store.tracking_uri(w.spec))
    exp_id = mlc.get_experiment_by_name("lost").experiment_id
    every = mlc.search_runs([exp_id], "", run_view_type=ViewType.ALL, max_results=100)
    return {r.data.tags.get("search.trial_id", "parent"): r for r in every}, mlc


@pytest.mark.parametrize("named", [True, False], ids=["in-the-run-map", "by-its-run-key-only"])
def test_a_trial_lost_in_a_kill_is_rerun_in_the_run_it_had(tmp_path, named):
    """SIGKILLed after the tracker opened a new trial's run (named in the run map, or only by its
    ``search.run_key`` tag when the kill came before the map was saved) and before Ray saved that
    trial: resume re-runs its Optuna trial as a new Ray trial, which takes the run over (renamed,
    re-tagged, closed) instead of leaving it RUNNING for ever beside a second run."""
    w = _killed_after_a_trial_started(tmp_path, named)
    again = SimpleNamespace(trial_id="again", config=w.searcher.suggest("again"), path="", status="RUNNING")
    assert again.config == w.lost.config and w.searcher.replaces("again") == "lost"
    study = StudyState(w.exp_dir, "lost", "map", "max", epochs=EPOCHS)
    study.searcher = w.searcher
    assert study.entry(again)["rerun_of"] == "lost" and "rerun_of" not in study.entry(w.kept)  # status --json
    runs, mlc = _resume(w, [w.kept, again])
    assert sorted(runs) == ["again", "kept", "parent"]  # one run per trial, the lost one's reused
    assert [r.info.status for r in runs.values()] == ["FINISHED"] * 3
    rerun = runs["again"]
    assert (rerun.info.run_id, rerun.info.run_name) == (w.lost_run, "again")
    assert rerun.data.tags["search.rerun_of"] == "lost" and rerun.data.tags["search.run_key"].endswith(
        ":again"
    )
    assert sorted(m.step for m in mlc.get_metric_history(w.lost_run, "map")) == list(range(EPOCHS + 1))
    assert rerun.data.params["lr"] == str(w.lost.config["lr"])
    recorded = json.loads(w.runs_file.read_text())
    assert recorded["runs"]["again"] == w.lost_run
    assert "lost" not in recorded["runs"] and "lost" not in recorded["trials"]


@pytest.mark.parametrize("named", [True, False], ids=["in-the-run-map", "by-its-run-key-only"])
def test_a_lost_trial_the_time_budget_leaves_unrun_ends_killed(tmp_path, named):
    """The same kill, but the resumed study's time budget is spent before any new trial starts: the
    lost trial's run ends KILLED and ``interrupted`` (its Optuna trial stays RUNNING for a later
    resume), not RUNNING for ever; found by its run key when the run map does not name it."""
    w = _killed_after_a_trial_started(tmp_path, named)
    data = json.loads(w.runs_file.read_text())  # and one killed before the writer made its run
    data["trials"]["ghost"] = {"best": None, "best_epoch": None, "last_epoch": None, "done": False}
    w.runs_file.write_text(json.dumps(data))
    w.searcher.deadline = time.time() - 1
    assert w.searcher.suggest("again") == "FINISHED"
    runs, _ = _resume(w, [w.kept])
    assert sorted(runs) == ["kept", "lost", "parent"]
    assert (runs["kept"].info.status, runs["parent"].info.status) == ("FINISHED", "FINISHED")
    assert runs["lost"].info.status == "KILLED" and runs["lost"].data.tags["interrupted"] == "true"
    assert runs["lost"].data.tags["search.state"] == "PENDING" and runs["lost"].info.run_id == w.lost_run
    assert json.loads(w.runs_file.read_text())["runs"]["lost"] == w.lost_run  # a later resume finds it
    assert not (w.exp_dir / write_queue.PENDING_FILE).exists()  # no record rejected for the ghost
    journal = load_study(w.exp_dir / "optuna.journal", "lost").trials
    assert [t.state.name for t in journal if t.user_attrs.get("ray_trial_id") == "lost"] == ["RUNNING"]
    w.searcher.deadline = None  # resumed again, with time: the lost trial re-runs in that run
    again = SimpleNamespace(trial_id="again", config=w.searcher.suggest("again"), path="", status="RUNNING")
    runs, _ = _resume(w, [again])
    assert sorted(runs) == ["again", "kept", "parent"] and runs["again"].info.run_id == w.lost_run
    assert runs["again"].info.status == "FINISHED" and "interrupted" not in runs["again"].data.tags
    assert runs["again"].info.run_name == "again" and runs["again"].data.tags["search.rerun_of"] == "lost"


def test_a_saved_trial_whose_run_the_map_never_named_ends_killed(tmp_path):
    """A trial Ray did save, its run created but not named in the run map when the driver was
    killed, and a resume whose time budget ends before Ray restarts it: that run ends KILLED too."""
    w = _killed_after_a_trial_started(tmp_path, named=False)
    data = json.loads(w.runs_file.read_text())
    kept_run = data["runs"].pop("kept")
    w.runs_file.write_text(json.dumps(data))
    w.searcher.deadline = time.time() - 1
    runs, _ = _resume(w, [w.kept], run=False)
    assert sorted(runs) == ["kept", "lost", "parent"] and runs["kept"].info.run_id == kept_run
    assert [runs[k].info.status for k in ("kept", "lost", "parent")] == ["KILLED"] * 3
    assert runs["kept"].data.tags["interrupted"] == "true" == runs["parent"].data.tags["interrupted"]
