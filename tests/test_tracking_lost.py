"""A trial lost in a SIGKILL (started, its MLflow run opened, never in Ray's saved state) and
re-run by ``resume``: the re-run takes the lost trial's run over (real SQLite MLflow store, the real
searcher; the tracker driven without Ray, as the launcher's callbacks would)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.entities import ViewType

from search import mlflow_store, run_map, tracking
from search.spec import load_spec
from tests.test_searcher import study_search
from tests.test_tracking import EPOCHS, write_spec


@pytest.mark.parametrize("named", [True, False], ids=["in-the-run-map", "by-its-run-key-only"])
def test_a_trial_lost_in_a_kill_is_rerun_in_the_run_it_had(tmp_path, named):
    """SIGKILLed after the tracker opened a new trial's run (named in the run map, or only by its
    ``search.run_key`` tag when the kill came before the map was saved) and before Ray saved that
    trial: resume re-runs its Optuna trial as a new Ray trial, which takes the run over (renamed,
    re-tagged, closed) instead of leaving it RUNNING for ever beside a second run."""
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
    runs_file = exp_dir / run_map.RUNS_FILE
    lost_run = json.loads(runs_file.read_text())["runs"]["lost"]
    if not named:
        data = json.loads(runs_file.read_text())
        del data["runs"]["lost"]
        runs_file.write_text(json.dumps(data))

    restored = study_search(journal, "lost", EPOCHS)
    restored.restore(str(ckpt))
    again = SimpleNamespace(trial_id="again", config=restored.suggest("again"), path="", status="RUNNING")
    assert again.config == lost.config and restored.replaces("again") == "lost"
    cb = tracking.make_callback(spec, exp_dir, resume=True)
    cb.study_state = SimpleNamespace(searcher=restored, state={"trials": {}}, deadline=None)
    cb.setup()
    trials = [kept, again]
    for trial in trials:
        for epoch in range(EPOCHS + 1):
            cb.on_trial_result(0, trials, trial, {"epoch": epoch, "map": 0.1 * epoch})
        cb.on_trial_complete(0, trials, trial)
    cb.on_experiment_end(trials)

    mlc = mlflow_store.client(mlflow_store.tracking_uri(spec))
    exp_id = mlc.get_experiment_by_name("lost").experiment_id
    every = mlc.search_runs([exp_id], "", run_view_type=ViewType.ALL, max_results=100)
    assert [r.info.status for r in every] == ["FINISHED"] * 3  # the parent and one run per trial
    kids = {r.data.tags["search.trial_id"]: r for r in every if "mlflow.parentRunId" in r.data.tags}
    assert sorted(kids) == ["again", "kept"]
    rerun = kids["again"]
    assert (rerun.info.run_id, rerun.info.run_name, rerun.data.tags["search.rerun_of"]) == (
        lost_run,
        "again",
        "lost",
    )
    assert rerun.data.tags["search.run_key"].endswith(":again")
    assert sorted(m.step for m in mlc.get_metric_history(lost_run, "map")) == list(range(EPOCHS + 1))
    assert rerun.data.params["lr"] == str(lost.config["lr"])
    runs = json.loads(runs_file.read_text())
    assert runs["runs"]["again"] == lost_run and "lost" not in runs["runs"] and "lost" not in runs["trials"]
