"""Faults a multi-day study must survive (issue 7), each against real processes (slow):

1. a trial raises: the study completes; the trial is ERROR, FAILED in MLflow with the reason, FAIL
   in Optuna;
2. a NaN loss: the trial ends DIVERGED and is not retried;
3. a trial's worker process is SIGKILLed mid-epoch: retried from its last checkpoint, it finishes;
   its MLflow run continues (one run, each epoch once);
4. the launcher is SIGKILLed mid-study (with its whole process group: the local Ray cluster dies
   too): ``resume`` finishes every trial; one MLflow run per trial, none RUNNING; the Optuna study
   has no duplicate or lost trial; results completed before the kill are unchanged;
5. the MLflow server (a real ``mlflow server``) is stopped mid-study and restarted on the same
   port and store: no trial dies; the records written while it was down arrive afterwards (or are
   reported missing and replayed).

After each: the base weights file's sha256 is unchanged, and the best trial's checkpoint loads and
evaluates to its recorded metric. Every study is a real ``python -m search launch`` process with a
real local Ray (its own TMPDIR, so its processes can be found and cleaned up), a real MLflow store,
tiny data (tests/tinydata.py), ssdlite320 from a state_dict FILE, image_size 96.

Figures for ``tests/faults/summary`` are recorded with ``record_property`` (runs expected/lost/
duplicated, RUNNING runs, metric points missing/duplicated, Optuna extra/missing trials).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from search import study as S
from tests.faults.common import closed_port, env
from tests.faults.harness import (
    METRIC,
    Proc,
    check_base_and_best,
    clean_figures,
    mlflow_figures,
    optuna_figures,
    port_open,
    results_of,
    study_json,
    wait_until,
    write_spec,
)
from tests.mlflow_server import start_server, stop_server

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------- faults 1-3: one study


LR_OK, LR_RAISE, LR_NAN = 0.01, 0.03, 1e20


@pytest.fixture(scope="module")
def study_a(world):
    """Grid over three lr values, 3 epochs, 2 at a time, max_failures 1: lr=0.03 raises at epoch 1
    (test hook), lr=1e20 diverges, and the lr=0.01 trial's worker is SIGKILLed right after its
    epoch-1 result (during epoch 2)."""
    name = "faults-a"
    spec = write_spec(
        world,
        name,
        {"optimizer": "sgd", "lr": {"choices": [LR_OK, LR_RAISE, LR_NAN]}},
        {"algorithm": "grid", "num_trials": 3},
        epochs=3,
    )
    exp_dir = world["root"] / "runs" / name
    t0 = time.time()
    run = Proc(
        ["launch", str(spec)], world["root"], world["root"] / "logs-a", SEARCH_TEST_FAIL_WHEN=f"lr={LR_RAISE}"
    )
    killed = None
    try:

        def ok_trial_at_epoch_1():  # its epoch-1 result is in study.json and in Ray's result.json
            for t in study_json(exp_dir).get("trials", {}).values():
                if t["params"].get("lr") == LR_OK and t.get("epochs", 0) >= 1 and t["state"] == S.RUNNING:
                    rows = results_of(t)
                    if rows and rows[-1]["epoch"] >= 1:
                        return t, rows
            return None

        t, rows = wait_until(ok_trial_at_epoch_1, 400, run, "the lr=0.01 trial's epoch 1")
        pid = rows[-1]["pid"]
        assert rows[-1]["epoch"] == 1, (
            f"epoch {rows[-1]['epoch']} already reported: the kill is not in epoch 2"
        )
        os.kill(pid, signal.SIGKILL)
        killed = {"trial": t["id"], "pid": pid, "at": time.time() - t0}
        rc = run.wait(600)
    finally:
        left = run.cleanup()
    return {
        "rc": rc,
        "exp_dir": exp_dir,
        "run": run,
        "killed": killed,
        "left": left,
        "name": name,
        "seconds": time.time() - t0,
        "state": S.read_study(exp_dir),
        "uri": f"sqlite:///{world['root'] / 'runs' / 'mlflow.db'}",
    }


def _by_lr(state: dict, lr: float) -> dict:
    (t,) = [t for t in state["trials"].values() if t["params"]["lr"] == lr]
    return t


def test_fault1_trial_raises(world, study_a, tmp_path, record_property):
    a = study_a
    print(f"study A (faults 1-3) took {a['seconds']:.0f}s; worker killed at {a['killed']['at']:.0f}s")
    assert a["rc"] == 0, a["run"].stderr[-3000:]
    state = a["state"]
    assert state["status"] == "finished" and len(state["trials"]) == 3
    t = _by_lr(state, LR_RAISE)
    assert t["state"] == S.FAILED and t["failure"] == S.ERROR and "test hook" in (t["error"] or ""), t
    rows = results_of(t)  # its own error is not retried: one attempt, epoch 0 reported once
    assert [r["epoch"] for r in rows] == [0] and len({r["pid"] for r in rows}) == 1, rows
    mlf = mlflow_figures(a["uri"], a["name"], state, record_property)
    opt = optuna_figures(a["exp_dir"], a["name"], state, record_property)
    (run,) = mlf["runs"][t["id"]]
    assert run.info.status == "FAILED" and "test hook" in run.data.tags.get("failure_reason", ""), (
        run.data.tags
    )
    assert "traceback.txt" in [f.path for f in mlf["client"].list_artifacts(run.info.run_id)]
    assert [m.step for m in mlf["client"].get_metric_history(run.info.run_id, METRIC)] == [0]
    (ot,) = opt["by_id"][t["id"]]
    assert ot.state.name == "FAIL"
    check_base_and_best(world, a["exp_dir"], tmp_path)


def test_fault2_nan_loss_diverges_not_retried(world, study_a, tmp_path, record_property):
    a = study_a
    state = a["state"]
    t = _by_lr(state, LR_NAN)
    assert (
        t["state"] == S.FAILED
        and t["failure"] == S.DIVERGED
        and t["best_metric"] is None
        and t.get("retries", 0) == 0
    ), t
    rows = results_of(t)
    assert len({r["pid"] for r in rows}) == 1, "the diverged trial ran more than once"
    assert [r["epoch"] for r in rows] == [0, 1] and rows[-1].get("diverged") == 1
    mlf = mlflow_figures(a["uri"], a["name"], state, record_property)
    (run,) = mlf["runs"][t["id"]]
    assert run.info.status == "FAILED" and "diverged" in run.data.tags.get("failure_reason", "")
    (ot,) = optuna_figures(a["exp_dir"], a["name"], state, record_property)["by_id"][t["id"]]
    assert ot.state.name == "FAIL"
    check_base_and_best(world, a["exp_dir"], tmp_path)


def test_fault3_worker_sigkilled_mid_epoch(world, study_a, tmp_path, record_property):
    a = study_a
    state = a["state"]
    t = state["trials"][a["killed"]["trial"]]
    assert t["state"] == S.COMPLETE and t["epochs"] == 3 and t["retries"] == 1, t
    assert t["error"] is None and t["last_error"], t  # no error on a COMPLETE trial; its retry's cause kept
    assert [r["epoch"] for r in t["history"]] == [0, 1, 2, 3]
    rows = results_of(t)
    before = [r["epoch"] for r in rows if r["pid"] == a["killed"]["pid"]]
    after = [r["epoch"] for r in rows if r["pid"] != a["killed"]["pid"]]
    assert before == [0, 1] and after == [2, 3], (before, after)  # resumed from the epoch-1 checkpoint
    mlf = mlflow_figures(a["uri"], a["name"], state, record_property)
    (run,) = mlf["runs"][t["id"]]  # one run, continued
    assert run.info.status == "FINISHED" and run.data.tags.get("retries") == "1", run.data.tags
    history = mlf["client"].get_metric_history(run.info.run_id, METRIC)
    assert sorted(m.step for m in history) == [0, 1, 2, 3]
    recorded = {row["epoch"]: row[METRIC] for row in t["history"]}
    assert {m.step: m.value for m in history} == pytest.approx(recorded)
    assert (
        mlf["figures"]["runs_lost"]
        == mlf["figures"]["runs_duplicated"]
        == mlf["figures"]["runs_running"]
        == 0
    )
    opt = optuna_figures(a["exp_dir"], a["name"], state, record_property)
    (ot,) = opt["by_id"][t["id"]]
    assert ot.state.name == "COMPLETE" and ot.value == pytest.approx(t["best_metric"])
    assert opt["extra"] == opt["missing"] == 0
    assert all(p not in a["left"] for p in [a["killed"]["pid"]])
    check_base_and_best(world, a["exp_dir"], tmp_path)


# ---------------------------------------------------------------- fault 4: the launcher SIGKILLed


def test_fault4_launcher_sigkilled_then_resumed(world, tmp_path, record_property):
    name = "faults-b"
    n = 3
    spec = write_spec(
        world,
        name,
        {"optimizer": "sgd", "lr": {"low": 0.005, "high": 0.03, "log": True}},
        {"algorithm": "random", "num_trials": n, "max_concurrent": 1},
        epochs=2,
    )
    exp_dir = world["root"] / "runs" / name
    t0 = time.time()
    run = Proc(["launch", str(spec)], world["root"], world["root"] / "logs-b")
    try:

        def one_done_one_mid():
            state = study_json(exp_dir)
            trials = list(state.get("trials", {}).values())
            done = [t for t in trials if t["state"] == S.COMPLETE]
            mid = [t for t in trials if t["state"] == S.RUNNING and t.get("epochs", 0) >= 1]
            # no wait for Ray's own files: study.json changes only after Ray's state is saved
            # (search/durable.py), so a kill at any moment after this resumes consistently
            return state if done and mid else None

        before = wait_until(one_done_one_mid, 500, run, "one finished trial and one mid-trial")
        os.kill(run.proc.pid, signal.SIGKILL)  # the launcher only; Ray's processes follow or are cleaned up
        run.wait(30)
        time.sleep(3)
    finally:
        left = run.cleanup()
    killed_at = time.time() - t0
    resumed = Proc(["resume", str(exp_dir)], world["root"], world["root"] / "logs-b-resume")
    try:
        rc = resumed.wait(600)
    finally:
        resumed.cleanup()
    print(
        f"fault 4: launcher killed at {killed_at:.0f}s ({len(left)} processes left behind and cleaned up); "
        f"resume took {time.time() - t0 - killed_at:.0f}s"
    )
    state = S.read_study(exp_dir)
    mlf = mlflow_figures(f"sqlite:///{world['root'] / 'runs' / 'mlflow.db'}", name, state, record_property)
    opt = optuna_figures(exp_dir, name, state, record_property)
    assert rc == 0, resumed.stderr[-3000:]
    assert state["status"] == "finished" and state.get("resumed") == 1
    assert len(state["trials"]) == n, f"{len(state['trials'])} trials for {n}: {list(state['trials'])}"
    assert all(t["state"] == S.COMPLETE for t in state["trials"].values()), state["trials"]
    for tid, t in before["trials"].items():  # completed before the kill: unchanged
        if t["state"] == S.COMPLETE:
            after = state["trials"][tid]
            for key in ("best_metric", "best_epoch", "history", "checkpoint", "params"):
                assert after[key] == t[key], (tid, key)
    assert mlf["figures"] == clean_figures(n), mlf["figures"]
    assert all(r.info.status == "FINISHED" for runs in mlf["runs"].values() for r in runs)
    assert len(opt["trials"]) == n and opt["extra"] == opt["missing"] == 0, [
        (t.number, t.state.name, t.user_attrs) for t in opt["trials"]
    ]
    assert all(len(v) == 1 and v[0].state.name == "COMPLETE" for v in opt["by_id"].values())
    check_base_and_best(world, exp_dir, tmp_path)


# ---------------------------------------------------------------- fault 5: the MLflow server stops


# Enough epochs that most results still lie ahead when the server goes down: the first results arrive
# in a burst (the shared base evaluation reports epoch 0 of both trials with their epoch 1).
EPOCHS_C = 8


def test_fault5_mlflow_server_stopped_and_restarted(world, tmp_path, record_property):
    name = "faults-c"
    port = closed_port()
    srv_root = world["root"] / "mlflow-server"
    uri = f"http://127.0.0.1:{port}"
    t0 = time.time()
    server = start_server(port, srv_root, env=env())
    print(f"fault 5: server up in {time.time() - t0:.0f}s")
    spec = write_spec(
        world,
        name,
        {"optimizer": "sgd", "lr": {"choices": [0.01, 0.02]}},
        {"algorithm": "grid", "num_trials": 2, "max_concurrent": 2},
        epochs=EPOCHS_C,
        tracking={"uri": uri},
    )
    exp_dir = world["root"] / "runs" / name
    run = Proc(["launch", str(spec)], world["root"], world["root"] / "logs-c", SEARCH_MLFLOW_FLUSH_S="240")
    outage = {}
    try:

        def results_count():
            return sum(len(t.get("history", [])) for t in study_json(exp_dir).get("trials", {}).values())

        wait_until(lambda: results_count() >= 1, 400, run, "the first result")
        stop_server(server, grace=2.0)
        assert not port_open(port)
        outage["down_at"], n_down = time.time() - t0, results_count()
        want = min(n_down + 2, 2 * (EPOCHS_C + 1))
        wait_until(lambda: results_count() >= want or run.proc.poll() is not None, 300, None, "")
        outage["results_while_down"] = results_count() - n_down
        outage["before_down"] = n_down
        assert outage["results_while_down"] >= 1, "no result arrived while the server was down"
        server = start_server(port, srv_root, env=env())
        outage["up_at"] = time.time() - t0
        rc = run.wait(600)
    finally:
        run.cleanup()
    try:
        state = S.read_study(exp_dir)
        pending = exp_dir / "mlflow_pending.jsonl"
        replayed = None
        if pending.exists():  # reported missing at the end: the study says so, and replay writes them
            assert "could not be written" in run.stderr, run.stderr[-3000:]
            from search import write_queue

            replayed = write_queue.replay_pending(exp_dir)
        print(
            f"fault 5: server down {outage['down_at']:.0f}s-{outage['up_at']:.0f}s after "
            f"{outage['before_down']} of {2 * (EPOCHS_C + 1)} results, "
            f"{outage['results_while_down']}+ results while down; replayed {replayed}; "
            f"study done at {time.time() - t0:.0f}s"
        )
        mlf = mlflow_figures(uri, name, state, record_property)
        assert rc == 0, run.stderr[-3000:]
        assert "unavailable" in run.stderr, "the outage was not noticed"
        assert len(state["trials"]) == 2 and all(t["state"] == S.COMPLETE for t in state["trials"].values())
        assert all(t.get("retries", 0) == 0 and not t.get("error") for t in state["trials"].values())
        assert mlf["figures"] == clean_figures(2), mlf["figures"]
        for tid, t in state["trials"].items():
            (r,) = mlf["runs"][tid]
            assert r.info.status == "FINISHED"
            history = mlf["client"].get_metric_history(r.info.run_id, METRIC)
            assert {m.step: m.value for m in history} == pytest.approx(
                {row["epoch"]: row[METRIC] for row in t["history"]}
            )
        assert [p.info.status for p in mlf["parents"]] == ["FINISHED"]
        check_base_and_best(world, exp_dir, tmp_path)
    finally:
        stop_server(server, grace=5.0)
