"""A study SIGKILLed at a named point, then resumed (issue 14, item 1; slow, real local Ray).

Each case launches a real ``python -m search launch`` with the test hook
``SEARCH_TEST_PAUSE_AT`` (``trainables/testhooks.py``): the first process to reach the point
(a Ray worker, the driver, or the driver's MLflow writer) stops there and says so, and the test
then SIGKILLs every process of that run at once (launcher, Ray's GCS, raylet and workers). Then
``python -m search resume`` must finish the study:

- exit 0, the study ``finished``, exactly ``num_trials`` trials, all COMPLETE, none PAUSED or
  RUNNING, no configuration run twice;
- one MLflow run per trial, none RUNNING, each epoch's objective logged exactly once;
- Optuna's journal holds exactly the study's trials, each once, COMPLETE with the trial's value;
- ``study.json`` shows the resumed run live while it runs;
- the base weights are untouched, and the best checkpoint evaluates to its recorded metric.

A full disk (the hook's ``enospc`` action: ``OSError(ENOSPC)`` once, at a named point) is the same
story: in the driver, ``launch`` stops (exit 1, naming the resume command) and ``resume`` finishes
the study; in a trial, Ray's retry continues it from its last checkpoint and the launch finishes.
"""

from __future__ import annotations

import json
import time

import pytest

from search import study as S
from tests.faults.harness import (
    Proc,
    check_base_and_best,
    clean_figures,
    mlflow_figures,
    optuna_figures,
    study_json,
    wait_until,
    write_spec,
)
from trainables.testhooks import ACTION_ENV, PAUSE_AT_ENV, PAUSE_DIR_ENV, PAUSED_FILE

pytestmark = pytest.mark.slow

N_TRIALS, EPOCHS = 3, 2

# point (trainables/testhooks.py names; @N = the N-th pass in that process) -> where it is
POINTS = {
    "evaluate": "a worker, during a trial's epoch-0 evaluation (the shared base evaluation)",
    "mid_epoch@2": "a worker, inside epoch 2 (after epoch 1's checkpoint)",
    "checkpoint_write@2": "a worker, while a checkpoint file is written",
    "trial_complete": "the driver, when a trial ended and before Ray saved that (between trials)",
    "mlflow_create@2": "the MLflow writer, after creating a trial's run and before recording it",
    "snapshot@2": "the driver, while the signed snapshot of Ray's state is written",
    "study_write@4": "the driver, after the snapshot and before study.json is rewritten",
}


def _launch(world, name: str, point: str, hook, action: str = "pause") -> tuple[Proc, object]:
    spec = write_spec(
        world,
        name,
        {"optimizer": "sgd", "lr": {"low": 0.005, "high": 0.03, "log": True}},
        {"algorithm": "random", "num_trials": N_TRIALS, "max_concurrent": 2},
        epochs=EPOCHS,
    )
    logs = world["root"] / f"logs-{name}"
    hook.mkdir()
    env = {PAUSE_AT_ENV: point, PAUSE_DIR_ENV: str(hook), ACTION_ENV: action}
    return Proc(["launch", str(spec)], world["root"], logs, **env), logs


@pytest.mark.parametrize("point", list(POINTS))
def test_killed_at_point_then_resumed(point, world, tmp_path, record_property):
    name = "crash-" + point.split("@")[0].replace("_", "-")
    exp_dir = world["root"] / "runs" / name
    hook = tmp_path / "hook"
    run, logs = _launch(world, name, point, hook)
    try:
        wait_until(lambda: (hook / PAUSED_FILE).is_file(), 400, run, f"a process paused at {point}")
        time.sleep(0.5)  # other processes go on meanwhile; then everything dies at once
    finally:
        killed = run.cleanup()
    print(f"{point}: paused ({(hook / PAUSED_FILE).read_text().strip()}), {len(killed)} processes killed")
    _resume_and_check(world, name, exp_dir, logs, tmp_path, record_property)
    record_property("crash_point", point)


def _disk_full(world, name: str, point: str, hook, action: str = "enospc") -> tuple[Proc, object, int]:
    """A launch whose disk fills up (or turns read-only: ``erofs``) once at ``point``, run to its end."""
    run, logs = _launch(world, name, point, hook, action=action)
    try:
        return run, logs, run.wait(400)
    finally:
        run.cleanup()


@pytest.mark.parametrize(
    ("action", "words"),
    [("enospc", "error: No space left on device"), ("erofs", "error: Read-only file system")],
)  # erofs: was the bare OSError, no resume command
def test_disk_full_in_the_driver_then_resumed(action, words, world, tmp_path, record_property):
    name = f"crash-disk-{action}-driver"
    exp_dir = world["root"] / "runs" / name
    run, logs, rc = _disk_full(world, name, "snapshot@2", tmp_path / "hook", action)
    assert rc == 1, run.stderr[-3000:]
    kept = "the study stopped; its saved state and checkpoints are kept."
    assert words in run.stderr and kept in run.stderr, run.stderr[-3000:]
    assert run.stderr.rstrip().endswith(f"then resume with: python -m search resume {exp_dir}"), run.stderr[
        -3000:
    ]
    assert study_json(exp_dir)["status"] == "interrupted"
    _resume_and_check(world, name, exp_dir, logs, tmp_path, record_property)


def test_disk_full_in_a_trial_is_retried(world, tmp_path, record_property):
    name = "crash-disk-full-trial"
    exp_dir = world["root"] / "runs" / name
    run, _, rc = _disk_full(world, name, "checkpoint_write@2", tmp_path / "hook")
    assert rc == 0, run.stderr[-3000:]
    state = S.read_study(exp_dir)
    _check_finished(world, name, exp_dir, state, tmp_path, record_property)
    assert sorted(t["retries"] for t in state["trials"].values()) == [0] * (N_TRIALS - 1) + [1]


def _resume_and_check(world, name, exp_dir, logs, tmp_path, record_property) -> None:
    before = study_json(exp_dir)
    resumed = Proc(["resume", str(exp_dir)], world["root"], logs / "resume")
    live = []
    try:
        deadline = time.time() + 600
        while resumed.proc.poll() is None and time.time() < deadline:
            now = study_json(exp_dir)
            if now.get("status") == "running" and now.get("resumed") == 1:
                live.append(sum(int(t.get("epochs") or 0) for t in now["trials"].values()))
            time.sleep(0.3)
        rc = resumed.wait(30)
    finally:
        resumed.cleanup()
    assert rc == 0, f"resume exited {rc}:\n{resumed.stderr[-3000:]}"
    state = S.read_study(exp_dir)
    assert state.get("resumed") == 1
    for tid, t in (before.get("trials") or {}).items():  # finished before the kill: unchanged
        if t["state"] == S.COMPLETE:
            assert state["trials"][tid]["best_metric"] == t["best_metric"], tid
    assert live, "study.json never showed the resumed run while it ran"
    _check_finished(world, name, exp_dir, state, tmp_path, record_property)


def _check_finished(world, name, exp_dir, state, tmp_path, record_property) -> None:
    uri = f"sqlite:///{world['root'] / 'runs' / 'mlflow.db'}"
    mlf = mlflow_figures(uri, name, state, record_property)
    opt = optuna_figures(exp_dir, name, state, record_property)
    assert state["status"] == "finished"
    assert len(state["trials"]) == N_TRIALS, list(state["trials"])
    assert all(t["state"] == S.COMPLETE for t in state["trials"].values()), state["trials"]
    configs = [json.dumps(t["params"], sort_keys=True) for t in state["trials"].values()]
    assert len(set(configs)) == N_TRIALS, f"a configuration ran twice: {configs}"
    for t in state["trials"].values():
        assert sorted(r["epoch"] for r in t["history"]) == list(range(EPOCHS + 1)), (t["id"], t["history"])
    assert mlf["figures"] == clean_figures(N_TRIALS), mlf["figures"]
    assert len(opt["trials"]) == N_TRIALS and opt["extra"] == opt["missing"] == 0, [
        (t.number, t.state.name, t.user_attrs) for t in opt["trials"]
    ]
    for tid, (ot,) in ((k, v) for k, v in opt["by_id"].items()):
        assert ot.state.name == "COMPLETE" and ot.value == pytest.approx(state["trials"][tid]["best_metric"])
    check_base_and_best(world, exp_dir, tmp_path)
