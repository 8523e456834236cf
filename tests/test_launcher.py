"""The launcher with a real local Ray: states in study.json and in the Optuna journal, checkpoints,
status, a raising and a diverged trial, the time budget, Ctrl-C + resume, cluster checks.

Tiny on purpose: 6 images of 100 px at image_size 96, ssdlite320 with random weights, 2 epochs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray.tune import Callback

from search import study as S
from tests.tinydata import make_tiny_coco, write_tiny_spec

ROOT = Path(__file__).resolve().parents[1]
ARCH = "ssdlite320_mobilenet_v3_large"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_data(tmp_path_factory)


def tiny_data(tmp_path_factory) -> Path:
    """A folder with ``data/``: 6 tiny COCO images of 100 px (the launcher tests' data)."""
    root = tmp_path_factory.mktemp("launcher")
    make_tiny_coco(root / "data", n_images=6, size=100)
    return root


def write_spec(root: Path, name: str, space: dict, search: dict, epochs: int = 2, **extra) -> Path:
    search = {"max_concurrent": 2, "grace_period": 1, "reduction_factor": 2, **search}
    return write_tiny_spec(root, name, space=space, search=search, epochs=epochs, **extra)


def test_set_matching_only_frozen_batchnorm_is_refused_before_ray(data_dir):
    """A BatchNorm saved from FrozenBatchNorm2d (no ``num_batches_tracked`` in the file) is rebuilt as
    FrozenBatchNorm2d: buffers, not parameters. The weightless skeleton that ``validate`` checks has
    BatchNorm2d parameters there, so the launcher checks the sets again on the model it builds."""
    import torch
    import torchvision
    import yaml

    from search.errors import SpecError
    from search.spec import check_weights, deep_check, load_spec

    state = torchvision.models.get_model(
        ARCH, weights=None, weights_backbone=None, num_classes=3
    ).state_dict()
    files = {"plain": data_dir / "plain_bn.pt", "frozen": data_dir / "frozen_bn.pt"}
    torch.save(state, files["plain"])
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, files["frozen"])
    specs = {}
    for kind, weights in files.items():
        path = write_tiny_spec(
            data_dir, f"sets-{kind}", space={"lr": 0.01}, search={}, epochs=1, weights=str(weights)
        )
        raw = yaml.safe_load(path.read_text())
        raw["model"]["trainable_sets"] = {
            "first_conv": ["backbone.features.0.0.0.*"],
            "first_bn": ["backbone.features.0.0.1.*"],  # the first BatchNorm's weight and bias only
        }
        path.write_text(yaml.safe_dump(raw))
        specs[kind] = load_spec(path)
        deep_check(specs[kind])  # the skeleton: BatchNorm2d, so both sets match parameters
    check_weights(specs["plain"])
    with pytest.raises(SpecError) as err:
        check_weights(specs["frozen"])
    message = str(err.value)
    assert "model.trainable_sets.first_bn" in message and "FrozenBatchNorm2d" in message, message
    assert "backbone.features.0.0.1.*" in message and "model.weights" in message, message
    cli = subprocess.run(  # validate (not --quick) checks what launch checks
        [sys.executable, "-m", "search", "validate", str(data_dir / "sets-frozen.yaml")],
        capture_output=True,
        text=True,
        cwd=data_dir,
    )
    assert cli.returncode == 2 and "model.trainable_sets.first_bn" in cli.stderr, cli.stderr


def optuna_trials(exp_dir: Path, name: str):
    from search.searcher import load_study

    return load_study(exp_dir / S.JOURNAL_FILE, name).get_trials(deepcopy=False)


def _env(**kw: str) -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT), **kw)
    return env


def test_shared_storage_rules(monkeypatch, tmp_path):
    from search import cluster

    assert cluster.mount_fstype(Path("/proc/self")) == "proc"
    assert cluster.is_shared_storage("s3://bucket/runs") and cluster.is_shared_storage("gs://b/x")
    node = {"Alive": True, "NodeManagerAddress": "10.0.0.1"}
    same_host = [node, dict(node)]
    assert cluster.check_cluster_storage(tmp_path, same_host, "10.0.0.1")["hosts"] == ["10.0.0.1"]
    other_host = [node, {"Alive": True, "NodeManagerAddress": "10.0.0.2"}]
    dead_other = [node, {"Alive": False, "NodeManagerAddress": "10.0.0.2"}]
    assert cluster.check_cluster_storage(tmp_path, dead_other, "10.0.0.1")["nodes"] == 1  # dead nodes ignored
    assert not cluster.is_shared_storage(tmp_path)  # pytest's tmp folder is local
    with pytest.raises(cluster.ClusterError, match="other hosts"):
        cluster.check_cluster_storage(tmp_path, other_host, "10.0.0.1")
    monkeypatch.setenv("SEARCH_SHARED_STORAGE", "1")
    assert cluster.check_cluster_storage(tmp_path, other_host, "10.0.0.1")["nodes"] == 2


def test_other_hosts_refused_on_a_real_node_list(ray_local, tmp_path, monkeypatch):
    """The real local Ray's own ``ray.nodes()`` and IP: one host, accepted; the same list with one
    node moved to another host address (its real shape otherwise): refused for a local folder."""
    from search import cluster

    monkeypatch.delenv("SEARCH_SHARED_STORAGE", raising=False)
    nodes, here = ray_local.nodes(), ray_local.util.get_node_ip_address()
    assert cluster.check_cluster_storage(tmp_path) == {"nodes": 1, "hosts": [here]}
    elsewhere = {**nodes[0], "NodeManagerAddress": "192.0.2.77", "NodeID": "f" * 56}
    with pytest.raises(cluster.ClusterError, match=r"other hosts \(192\.0\.2\.77\)") as err:
        cluster.check_cluster_storage(tmp_path, [*nodes, elsewhere], here)
    assert str(tmp_path) in str(err.value) and "SEARCH_SHARED_STORAGE=1" in str(err.value)


def test_unreachable_address_is_a_clear_error(data_dir, capsys, monkeypatch):
    from search.cli import main

    monkeypatch.setenv("SEARCH_NO_MLFLOW", "1")
    spec = write_spec(data_dir, "unreach", {"lr": 0.01}, {"algorithm": "random", "num_trials": 1})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    assert main(["launch", str(spec), "--address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    # refused at once by the reachability probe (not a ray.init that waited for its own timeout)
    assert "cannot reach the Ray cluster" in err and "Connection refused" in err, err
    assert f"ray start --head --port {port}" in err
    assert not (data_dir / "runs" / "unreach" / S.STUDY_FILE).exists()


def test_dry_run(data_dir, capsys):
    from search.cli import main

    spec = write_spec(
        data_dir,
        "dry",
        {"optimizer": {"choices": ["sgd", "adamw"]}, "lr": 0.01},
        {"algorithm": "tpe", "num_trials": 4, "n_startup_trials": 4},
    )
    assert main(["launch", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "  note: search.n_startup_trials 4 >= search.num_trials 4: every trial" in out
    assert "2 branch configuration(s)" in out and "plan: 4 trials x 2 epochs, 2 at a time" in out
    assert "estimate:" in out and '"optimizer": "adamw"' in out
    # what the launch would run: the search and the reference trial (sgd, the recipe's optimizer)
    assert "search: tpe + auto (curve)" in out
    assert "trial 1 is the reference (torchvision's recipe" in out and "optimizer=sgd" in out
    assert not (data_dir / "runs" / "dry").exists()  # no Ray, nothing written
    (data_dir / "runs" / "dry").mkdir(parents=True)
    (data_dir / "runs" / "dry" / S.STUDY_FILE).write_text("{}")
    assert main(["launch", str(spec), "--dry-run"]) == 2  # the launch it plans would be refused
    err = capsys.readouterr().err
    assert "already holds a study" in err and "--name" in err
    assert main(["launch", str(spec), "--dry-run", "--name", "dry2"]) == 0


# ---------------------------------------------------------------- one real study: grid over lr


LRS = [0.005, 0.01, 0.02, 0.03, 1e20]  # 0.03 raises (test hook), 1e20 diverges


@pytest.fixture(scope="module")
def grid_study(ray_local, data_dir):
    from search.launcher import launch
    from search.spec import load_spec

    path = write_spec(
        data_dir,
        "grid",
        {"optimizer": "sgd", "lr": {"choices": LRS}},
        # a retry for a worker that died: the trial that raises is not run again (search.worker)
        {"algorithm": "grid", "scheduler": "asha", "num_trials": 10, "max_failures": 1},
    )
    old = {k: os.environ.get(k) for k in ("SEARCH_TEST_FAIL_WHEN", "SEARCH_NO_MLFLOW")}
    os.environ.update(SEARCH_TEST_FAIL_WHEN="lr=0.03", SEARCH_NO_MLFLOW="1")
    try:
        t0 = time.time()
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            summary = launch(load_spec(path))
        took = time.time() - t0
        summary["printed"] = printed.getvalue()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return summary, data_dir / "runs" / "grid", took


def test_grid_study_states(grid_study):
    import optuna

    summary, exp_dir, took = grid_study
    assert not summary["interrupted"] and summary["status"] == "finished"
    trials = {t["params"]["lr"]: t for t in summary["trials"]}
    assert sorted(trials) == LRS  # the grid was capped at its 5 points, every one ran
    assert (
        trials[1e20]["state"] == S.FAILED
        and trials[1e20]["failure"] == S.DIVERGED
        and trials[1e20]["best_metric"] is None
    )
    assert (
        trials[0.03]["state"] == S.FAILED
        and trials[0.03]["failure"] == S.ERROR
        and "test hook" in trials[0.03]["error"]
    )
    # Ray's retry did not train again, and what users read is the trial's own error, not the retry's
    raised = (Path(trials[0.03]["trial_dir"]) / "error.txt").read_text()
    assert "not retried (retries are for workers that died)" in raised
    assert trials[0.03]["error"].startswith("RuntimeError: SEARCH_TEST_FAIL_WHEN"), trials[0.03]["error"]
    # nor is it called a retry: its progress said "retrying from its last checkpoint", started it
    # again and counted retries 1, though it had no checkpoint and never trained again
    said = [ln for ln in summary["printed"].splitlines() if f" {trials[0.03]['id']} " in ln]
    assert [ln.split()[4] for ln in said if ln.startswith("[")] == ["started", "result", "error"], said
    assert not trials[0.03]["retries"] and not trials[0.03].get("last_error"), trials[0.03]
    assert said[0].endswith("| lr=0.03000"), said[0]  # 4 digits, as status and best print it (was 3)
    rows = [ln for ln in summary["printed"].splitlines() if ln.startswith(trials[1e20]["id"])]
    assert rows and rows[-1].endswith("[diverged: a non-finite loss]"), rows  # the summary said no reason
    optuna_by_id = {t.user_attrs["ray_trial_id"]: t for t in optuna_trials(exp_dir, "grid")}
    assert len(optuna_by_id) == len(optuna_trials(exp_dir, "grid")) == 5
    TS = optuna.trial.TrialState
    for t in summary["trials"]:
        ot = optuna_by_id[t["id"]]
        assert t["optuna_number"] == ot.number
        curve = {row["epoch"]: row["map50"] for row in t["history"] if not row.get("diverged")}
        if t["state"] == S.COMPLETE:
            assert t["epochs"] == 2 and ot.state == TS.COMPLETE
            assert ot.value == pytest.approx(max(v for e, v in curve.items() if e >= 1))
            assert ot.intermediate_values == pytest.approx(curve)
        elif t["state"] == S.PRUNED:
            assert t["epochs"] < 2 and t["stopped_by"] == "scheduler" and ot.state == TS.PRUNED
            assert ot.intermediate_values == pytest.approx(curve)
        else:
            assert t["state"] == S.FAILED and ot.state == TS.FAIL
    assert summary["base_metric"] is not None and summary["best"]["state"] in (S.COMPLETE, S.PRUNED)
    assert summary["best"]["params"]["lr"] in (0.005, 0.01, 0.02)
    assert ray_leftovers("grid") == []  # raised, diverged, stopped, complete: nothing left in /tmp/ray
    # one base evaluation for the study, shared: every trained trial knows the same base metric
    shared = sorted((exp_dir / S.BASE_EVAL_DIR).iterdir())
    assert [p.suffix for p in shared] == [".json"], shared
    base = json.loads(shared[0].read_text())["metrics"]["map50"]
    assert summary["base_metric"] == pytest.approx(base)
    for t in summary["trials"]:
        if t["state"] in (S.COMPLETE, S.PRUNED):
            assert t["base_metric"] == pytest.approx(base), t
    print(f"grid study of 5 trials took {took:.0f}s")


def test_grid_study_checkpoints_best_by_metric(grid_study):
    import torch

    summary, exp_dir, _ = grid_study
    for t in summary["trials"]:
        kept = sorted(Path(t["trial_dir"]).glob("checkpoint_*"))
        if t["state"] == S.FAILED:
            assert t["checkpoint"] is None
            continue
        assert 1 <= len(kept) <= 2  # the best and the latest only
        best = torch.load(t["checkpoint"], map_location="cpu", weights_only=True)
        assert best["epoch"] == t["best_epoch"]
        assert best["metrics"]["map50"] == pytest.approx(t["best_metric"])
        latest = torch.load(t["latest_checkpoint"], map_location="cpu", weights_only=True)
        assert latest["epoch"] == t["epochs"]
        assert t["disk_bytes"] >= sum(f.stat().st_size for f in Path(t["trial_dir"]).rglob("model.pt"))


def test_status_json(grid_study, data_dir, capsys):
    from search.cli import main

    summary, exp_dir, _ = grid_study
    assert main(["status", str(exp_dir), "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert {"name", "metric", "mode", "base_metric", "trials", "best"} <= set(obj)
    assert obj["name"] == "grid" and obj["metric"] == "map50" and obj["mode"] == "max"
    for t in obj["trials"]:
        assert {"id", "state", "epochs", "best_metric", "params", "checkpoint"} <= set(t)
    assert obj["best"] in obj["trials"] and obj["best"]["id"] == summary["best"]["id"]
    assert main(["status", "grid", "--output-dir", str(data_dir / "runs")]) == 0
    text = capsys.readouterr().out
    assert "best: " + summary["best"]["id"] in text and "FAILED" in text and "failed: diverged" in text
    assert "5 trials: " in text and "2 failed" in text  # counts in words, one vocabulary
    assert main(["status", "no-such-study", "--output-dir", str(data_dir / "runs")]) == 2
    assert main(["launch", str(data_dir / "grid.yaml")]) == 2  # the folder holds a study: resume it
    assert f"python -m search resume {exp_dir}" in capsys.readouterr().err


def test_keep_top(grid_study, monkeypatch, capsys):
    """``resume --keep-top 1`` of a finished study: only the best trial keeps its checkpoints, and
    study.json (hence status, best, export) says so (it once kept the old paths: the study's state,
    saved after the removal, put them back)."""
    from search.launcher import FINISHED_RESUMED, resume

    summary, exp_dir, _ = grid_study
    monkeypatch.setenv("SEARCH_NO_MLFLOW", "1")
    again = resume(exp_dir, keep_top=1)
    assert FINISHED_RESUMED.format(" and applies --keep-top") in capsys.readouterr().out  # it said nothing
    state = S.read_study(exp_dir)
    best_id = summary["best"]["id"]
    assert again["best"]["id"] == best_id and state["trials"][best_id]["checkpoint"]
    assert Path(state["trials"][best_id]["checkpoint"]).exists()
    kept = state["trials"][best_id]  # its latest (another epoch's, with the optimizer) is gone too
    assert [p.name for p in Path(kept["trial_dir"]).glob("checkpoint_*")] == [
        Path(kept["checkpoint"]).parent.name
    ]
    assert kept["latest_checkpoint"] == kept["checkpoint"]
    removed = 0
    for tid, t in state["trials"].items():
        if tid != best_id and t.get("trial_dir"):
            assert not list(Path(t["trial_dir"]).glob("checkpoint_*")), tid
            if t.get("checkpoints_removed"):
                removed += 1
                assert t["checkpoint"] is None and t["latest_checkpoint"] is None, t
    assert removed >= 2
    shown = {t["id"]: t for t in again["trials"]}
    assert all(shown[tid].get("checkpoint") is None for tid, t in state["trials"].items() if tid != best_id)
    resume(exp_dir)  # a later resume restores the signed state: the removal is in it (it listed them again)
    after = S.read_study(exp_dir)["trials"]
    assert all(after[t]["checkpoint"] is None and after[t]["checkpoints_removed"] for t in removed_ids(state))


@pytest.mark.parametrize(
    ("status", "failure", "restart_errored", "left"),
    [("finished", None, False, True), ("finished", S.ERROR, True, False), ("finished", S.ERROR, False, True),
     ("interrupted", None, False, False), ("finished", S.DIVERGED, True, True)],
)  # fmt: skip
def test_what_a_resume_has_left_to_run(status, failure, restart_errored, left):
    from search.launcher import _nothing_left

    study = {
        "status": status,
        "trials": {"a": {"state": S.FAILED if failure else S.COMPLETE, "failure": failure}},
    }
    assert _nothing_left(study, restart_errored) is left


def ray_leftovers(name: str) -> list[Path]:
    """Files the study's trials left in Ray's trial working directories on this node, outside the
    study folder (``/tmp/ray/session_*/artifacts/*/<name>/working_dirs``): an audit found each
    stopped, failed or resumed trial's checkpoints there (3 x 39 MB for one), never deleted."""
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    return sorted(p for p in session.glob(f"artifacts/*/{name}/working_dirs/**/*") if p.is_file())


def removed_ids(state: dict) -> list[str]:
    return [tid for tid, t in state["trials"].items() if t.get("checkpoints_removed")]


def test_time_budget(ray_local, data_dir):
    from search.launcher import launch
    from search.spec import load_spec

    budget = 20
    path = write_spec(
        data_dir,
        "budget",
        {"lr": {"choices": [0.01]}},
        {"algorithm": "random", "scheduler": "none", "num_trials": 8, "time_budget": budget},
        epochs=30,
    )  # far longer than the budget: a running trial must be cut by it
    os.environ["SEARCH_NO_MLFLOW"] = "1"
    order = ResultOrder()
    try:
        summary = launch(load_spec(path), extra_callbacks=[order])
    finally:
        os.environ.pop("SEARCH_NO_MLFLOW", None)
    assert summary["budget_reached"] and not summary["interrupted"] and summary["status"] == "finished"
    assert 1 <= len(summary["trials"]) < 8  # no new trial after the budget
    stopped = [t for t in summary["trials"] if t["state"] == S.PRUNED]
    assert stopped and all(t["stopped_by"] == "time_budget" for t in stopped)
    assert ray_leftovers("budget") == []  # trials Ray stopped, blocked in their report, left them all
    assert all(t["epochs"] < 30 for t in summary["trials"])  # cut by the budget, not finished
    # once the budget stopped a trial (at its last result, the deadline had passed), every running
    # trial stops at its next report: at most one more result per trial after that point
    last = {tid: i for i, (tid, _) in enumerate(order.seen)}
    first_stop = min(last[t["id"]] for t in stopped)
    after = [tid for tid, _ in order.seen[first_stop + 1 :]]
    assert all(after.count(tid) <= 1 for tid in after), (
        order.seen,
        [(t["id"], t["stopped"]) for t in stopped],
    )
    for t in stopped:  # the stop record says when, at what value, and why
        assert t["stopped"]["rule"] == "time_budget" and t["stopped"]["epoch"] == t["epochs"]
        assert t["stopped"]["group"] == "all trials" and t["stopped"]["cut"] is None
    ot = optuna_trials(data_dir / "runs" / "budget", "budget")
    states = {t.user_attrs["ray_trial_id"]: t.state.name for t in ot}
    assert all(states[t["id"]] == "PRUNED" for t in stopped)
    shown = subprocess.run(
        [sys.executable, "-m", "search", "status", "budget", "--output-dir", str(data_dir / "runs")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert "(time budget reached)" in shown.stdout.splitlines()[0], shown.stdout  # as the summary says


class ResultOrder(Callback):
    """Driver callback: every trial result in the order the driver processed it, as (id, epoch).
    Module level: Ray pickles it by reference."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int | None]] = []

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.seen.append((trial.trial_id, result.get("epoch")))
