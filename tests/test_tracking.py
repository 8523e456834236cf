"""MLflow recording (search.tracking) against real stores: SQLite and a real ``mlflow server``.

The tracker is driven by real Ray Tune runs of a toy function trainable (fast, no torch), and
the launcher integration test (a real 4-trial study on a tiny COCO set) lives at the end.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from ray.tune import Callback

from search import local_server, mlflow_store, run_map, tracking, write_queue
from search.errors import SpecError
from search.promote import _registry_store
from search.spec import load_spec
from tests.mlflow_server import start_server, stop_server
from tests.tinydata import make_tiny_coco

EPOCHS = 3


# ---------------------------------------------------------------- helpers


def write_spec(tmp: Path, name: str = "toy", **extra) -> Path:
    images, ann = make_tiny_coco(tmp / "data", n_images=4, size=64)
    raw = {
        "name": name,
        "task": "detection",
        "model": {"arch": "ssdlite320_mobilenet_v3_large", "weights": "none"},
        "data": {
            "train": {"images": str(images), "annotations": str(ann)},
            "val": {"images": str(images), "annotations": str(ann)},
            "image_size": 96,
        },
        "train": {"epochs": EPOCHS, "batch_size": 2},
        "objective": {"metric": "map", "mode": "max"},
        "space": {"lr": {"low": 0.001, "high": 0.1, "log": True}, "optimizer": {"choices": ["sgd", "adamw"]}},
        "search": {"num_trials": 4, "max_concurrent": 4},
        "output_dir": str(tmp / "runs"),
    }
    for key, value in extra.items():
        node = raw
        parts = key.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


COUNTS = {"trainable_params": 1000, "frozen_params": 10}  # as a trial reports them at every epoch


def toy_trainable(config: dict) -> None:
    """Reports epoch 0 (base), then epochs 1..EPOCHS with a checkpoint; ``kind`` picks a fate."""
    import shutil

    from ray import tune

    kind = config.get("kind", "ok")
    ckpt = tune.get_checkpoint()
    start = 1
    if ckpt is not None:
        start = json.loads((Path(ckpt.path) / "state.json").read_text())["epoch"] + 1
    else:
        tune.report({"epoch": 0, "map": 0.1, "map50": 0.2, "base_metric": 0.1, **COUNTS})
    for epoch in range(start, EPOCHS + 1):
        time.sleep(float(config.get("sleep", 0.05)))
        gate = config.get("gate")
        if gate and epoch >= 2:
            deadline = time.time() + 120
            while not Path(gate).exists() and time.time() < deadline:
                time.sleep(0.2)
        if kind == "error" and epoch == 2:
            raise ValueError("toy trial broke on purpose")
        if kind == "diverge" and epoch == 2:
            tune.report({"epoch": epoch, "diverged": 1, "map": float("-inf"), "loss": float("nan")})
            return
        value = (
            {"ok": 0.3, "stop": 0.2, "error": 0.25, "diverge": 0.15}[kind]
            + 0.1 * epoch
            - (0.25 if epoch == 3 else 0)
        )
        folder = Path(tempfile.mkdtemp(prefix="toyck-"))
        (folder / "state.json").write_text(json.dumps({"epoch": epoch}))
        tune.report(
            {
                "epoch": epoch,
                "map": value,
                "map50": value + 0.1,
                "loss": 1.0 / epoch,
                "loss_classifier": 0.5,
                "lr": config["lr"],
                "epoch_seconds": 0.05,
                "images_per_s": 80.0,
                "ap_per_class": {"red": value, "blue": value / 2},
                **COUNTS,
            },
            checkpoint=tune.Checkpoint.from_directory(str(folder)),
        )
        shutil.rmtree(folder, ignore_errors=True)


def _stop_when(trial_id: str, result: dict) -> bool:
    """Stops the ``kind=stop`` trial after epoch 1 (a stand-in for the ASHA scheduler)."""
    return (result.get("config") or {}).get("kind") == "stop" and result.get("epoch", 0) >= 1


class Interrupt:
    """Driver callback: Ctrl-C (SIGINT to this process) once ``n`` trials have reported epoch 1."""

    def __new__(cls, n: int):
        from ray.tune import Callback

        class _Interrupt(Callback):
            def __init__(self) -> None:
                self.seen: set[str] = set()
                self.sent = False

            def on_trial_result(self, iteration, trials, trial, result, **info):
                if result.get("epoch") == 1:
                    self.seen.add(trial.trial_id)
                if len(self.seen) >= n and not self.sent:
                    self.sent = True
                    os.kill(os.getpid(), signal.SIGINT)

        return _Interrupt()


def run_toy(
    spec, exp_dir: Path, configs: list[dict], callbacks: list, restore: bool = False, stop=_stop_when
):
    """A Tune run (or restore) of ``toy_trainable`` over fixed configs, with ``callbacks``."""
    from ray import tune

    trainable = tune.with_resources(toy_trainable, {"cpu": 0.5})
    if restore:
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True)
        run_config = tuner._local_tuner.get_run_config()  # as search.launcher.resume does
        run_config.callbacks = callbacks
        return tuner.fit()
    tuner = tune.Tuner(
        trainable,
        param_space={
            "kind": tune.grid_search([c["kind"] for c in configs]),
            "lr": 0.01,
            **{k: v for k, v in configs[0].items() if k not in ("kind",)},
        },
        tune_config=tune.TuneConfig(metric="map", mode="max", max_concurrent_trials=4),
        run_config=tune.RunConfig(
            name=exp_dir.name, storage_path=str(exp_dir.parent), callbacks=callbacks, stop=stop, verbose=0
        ),
    )
    return tuner.fit()


def children(mlc, exp_id: str, parent: str) -> list:
    runs = mlc.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent}'", max_results=100)
    return sorted(runs, key=lambda r: r.data.tags["search.trial_id"])


# ---------------------------------------------------------------- the tracker in real Tune runs


@pytest.fixture(scope="module")
def toy_study(ray_local, tmp_path_factory):
    """One toy study (ok / stopped early / errored / diverged) recorded in a SQLite store."""
    tmp = tmp_path_factory.mktemp("toy")
    spec = load_spec(write_spec(tmp))
    exp_dir = Path(spec.output_dir) / spec.name
    exp_dir.mkdir(parents=True)
    (exp_dir / "spec.yaml").write_text("name: toy\n")
    (exp_dir / "space.json").write_text("{}")
    cb = tracking.make_callback(spec, exp_dir, resume=False)
    t0 = time.time()
    grid = run_toy(spec, exp_dir, [{"kind": k} for k in ("ok", "stop", "error", "diverge")], [cb])
    return {"spec": spec, "exp_dir": exp_dir, "cb": cb, "grid": grid, "seconds": time.time() - t0}


def test_parent_and_nested_children(toy_study):
    spec, exp_dir, cb = toy_study["spec"], toy_study["exp_dir"], toy_study["cb"]
    assert cb.report["unwritten"] == 0, cb.report
    mlc = mlflow_store.client(mlflow_store.tracking_uri(spec))
    exp = mlc.get_experiment_by_name("toy")
    assert exp.artifact_location == (Path(spec.output_dir) / "mlartifacts" / "toy").resolve().as_uri()
    runs_file = json.loads((exp_dir / run_map.RUNS_FILE).read_text())
    parent = mlc.get_run(runs_file["runs"]["parent"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "toy"
    for tag in ("git_commit", "version.torch", "version.mlflow", "seed", "base_weights_sha256"):
        assert parent.data.tags.get(tag), tag
    assert parent.data.tags["base_weights_sha256"] == "none" and parent.data.tags.get("dataset_fingerprint")
    assert parent.data.params["arch"] == "ssdlite320_mobilenet_v3_large"
    assert parent.data.metrics["base_map"] == pytest.approx(0.1)
    best_hist = mlc.get_metric_history(parent.info.run_id, "best_map")
    assert [m.step for m in best_hist] == sorted(m.step for m in best_hist) and best_hist[-1].step == 4
    assert parent.data.tags["summary.status"] == "finished"
    arts = {a.path for a in mlc.list_artifacts(parent.info.run_id)}
    assert {"spec.yaml", "space.json", "summary.json"} <= arts

    kids = children(mlc, exp.experiment_id, parent.info.run_id)
    assert len(kids) == 4
    by_kind = {k.data.params["kind"]: k for k in kids}
    ok = by_kind["ok"]
    assert ok.info.status == "FINISHED" and "stopped_early" not in ok.data.tags
    assert ok.data.params["lr"] == "0.01"
    hist = mlc.get_metric_history(ok.info.run_id, "map")
    assert [m.step for m in hist] == [0, 1, 2, 3]
    assert ok.data.metrics["best_map"] == pytest.approx(0.5) and ok.data.metrics["best_epoch"] == 2
    keys = ("loss", "loss_classifier", "lr", "epoch_seconds", "images_per_s", "map50", "ap_per_class/red")
    for key in keys:
        assert key in ok.data.metrics, key
    noise = {"pid", "time_total_s", "training_iteration", "timestamp", "time_this_iter_s", "base_metric"}
    noise |= {"epoch", "iterations_since_restore", "time_since_restore", "done"}
    assert not noise & set(ok.data.metrics)
    for key in ok.data.metrics:  # one point per step: the parameter counts once, at step 0
        steps = [m.step for m in mlc.get_metric_history(ok.info.run_id, key)]
        assert len(steps) == len(set(steps)), (key, steps)
    assert [m.step for m in mlc.get_metric_history(ok.info.run_id, "trainable_params")] == [0]
    assert not [k for k in ok.data.metrics if k.startswith("config")]

    stop = by_kind["stop"]
    assert stop.info.status == "FINISHED"
    assert stop.data.tags["stopped_early"] == "true" and stop.data.tags["stopped_at_epoch"] == "1"
    err = by_kind["error"]
    assert (
        err.info.status == "FAILED"
        and "ValueError: toy trial broke on purpose" in err.data.tags["failure_reason"]
    )
    assert "traceback.txt" in {a.path for a in mlc.list_artifacts(err.info.run_id)}
    tb = Path(mlc.download_artifacts(err.info.run_id, "traceback.txt", str(exp_dir.parent))).read_text()
    assert "in toy_trainable" in tb and "\x1b[" not in tb
    div = by_kind["diverge"]
    assert div.info.status == "FAILED" and div.data.tags["failure_reason"].startswith("diverged")
    assert not [r for r in kids + [parent] if r.info.status == "RUNNING"]
    # README: the losses of the step that diverged are the run's metrics (NaN was dropped as not finite)
    losses = {m.step: m.value for m in mlc.get_metric_history(div.info.run_id, "loss")}
    assert losses[1] == 1.0 and math.isnan(losses[2]), losses
    # its objective's -inf is the worst value put in, not a measurement
    assert 2 not in {m.step for m in mlc.get_metric_history(div.info.run_id, "map")}


@pytest.mark.slow  # the quick suite proves resume through the launcher (tests/test_select.py)
def test_resume_continues_the_same_runs(ray_local, tmp_path, monkeypatch):
    """...and says which code went on with them: a parent's and a promoted trial's git_commit named
    the launch's code only. (Every trial here starts before the interrupt, so each run's own
    git_commit is the launch's; a trial a resume starts is opened by the same code path.)"""
    from search import facts, select

    spec = load_spec(write_spec(tmp_path, name="resumable"))
    exp_dir = Path(spec.output_dir) / spec.name
    exp_dir.mkdir(parents=True)
    configs = [{"kind": "ok", "sleep": 0.4}] * 4
    monkeypatch.setattr(facts, "git_commit", lambda: "launched")
    cb = tracking.make_callback(spec, exp_dir, resume=False)
    run_toy(spec, exp_dir, configs, [cb, Interrupt(2)], stop=None)
    mlc = mlflow_store.client(mlflow_store.tracking_uri(spec))
    exp_id = mlc.get_experiment_by_name("resumable").experiment_id
    first = json.loads((exp_dir / run_map.RUNS_FILE).read_text())["runs"]
    parent = mlc.get_run(first["parent"])
    assert parent.info.status == "KILLED" and parent.data.tags.get("interrupted") == "true"
    before = children(mlc, exp_id, first["parent"])
    assert before and not [r for r in before if r.info.status == "RUNNING"]
    assert [r for r in before if r.info.status == "KILLED"], "the interruption left no unfinished trial"

    monkeypatch.setattr(facts, "git_commit", lambda: "resumed")
    cb2 = tracking.make_callback(spec, exp_dir, resume=True)
    run_toy(spec, exp_dir, configs, [cb2], restore=True)
    after_map = json.loads((exp_dir / run_map.RUNS_FILE).read_text())["runs"]
    assert after_map["parent"] == first["parent"]
    assert {k: v for k, v in after_map.items() if k in first} == first  # the same runs continued
    all_runs = mlc.search_runs([exp_id], "", max_results=100)
    assert len(all_runs) == 5  # 1 parent + 4 children: no duplicates
    kids = children(mlc, exp_id, first["parent"])
    assert len(kids) == 4
    assert all(r.info.status == "FINISHED" for r in kids + [mlc.get_run(first["parent"])])
    for kid in kids:
        steps = sorted({m.step for m in mlc.get_metric_history(kid.info.run_id, "map")})
        assert steps == [0, 1, 2, 3]
        assert "interrupted" not in kid.data.tags
    assert mlc.get_run(first["parent"]).data.tags["summary.status"] == "finished"
    tags = mlc.get_run(first["parent"]).data.tags
    assert (tags["git_commit"], tags["resumed_git_commit"]) == ("launched", "resumed")
    went_on = 0
    for kid in kids:  # each run's git_commit is its creator's (a resume's new trials: the resume's)
        trial = {"id": kid.data.tags["search.trial_id"], "run_id": kid.info.run_id}
        lineage = {k: v for k, v in select.provenance(exp_dir, trial, spec).items() if "git" in k}
        went_on += kid.data.tags.get("resumed") == "true"
        assert lineage == {"git_commit": "launched"} | (
            {"resumed_git_commit": "resumed"} if kid.data.tags.get("resumed") else {}
        ), trial
    assert went_on


class TcpProxy:
    """A loopback TCP forwarder in front of the MLflow server: ``down()`` makes the server drop out
    at once (connections refused, open ones cut), ``up()`` brings it back on the same port."""

    def __init__(self, upstream: int):
        import threading

        self.upstream, self.port = upstream, local_server.free_port()
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.up()

    def up(self) -> None:
        import threading

        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self.lock:
            listener, self.listener = self.listener, None
            conns, self.conns = self.conns, []
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
            except OSError:
                pass
            listener.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self, listener: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream), timeout=10)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s_ in (src, dst):
                try:
                    s_.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


_PROXY: dict = {}  # the test's proxy, shared with the driver callback below (a module global: not pickled)


class Outage(Callback):
    """Driver callback: once ``n`` trials reported epoch 1 the server drops out (the proxy goes
    down); ``back_after`` seconds later (None: never) it is back; the gate opens either way, so
    the trials go on. A module-level class: Ray pickles it by reference."""

    def __init__(self, gate: Path, n: int, back_after: float | None):
        self.gate, self.n, self.back_after = gate, n, back_after
        self.seen, self.done = set(), False

    def on_trial_result(self, iteration, trials, trial, result, **info):
        import threading

        if result.get("epoch") == 1:
            self.seen.add(trial.trial_id)
        if len(self.seen) >= self.n and not self.done:
            self.done = True
            _PROXY["proxy"].down()
            if self.back_after is None:
                Path(self.gate).touch()
                return

            def back() -> None:
                time.sleep(self.back_after)
                _PROXY["proxy"].up()
                Path(self.gate).touch()

            threading.Thread(target=back, daemon=True).start()


@pytest.mark.slow  # a real server starts in 10-40 s on a 2-core box
def test_real_server_outage(ray_local, tmp_path, capfd):
    """A real ``mlflow server`` on loopback (behind a proxy that can cut it off): an unreachable
    server fails the check in seconds; one that drops out mid-study and comes back fails no trial
    and every record lands; one that stays away until the end leaves the rest in the pending file,
    reported, and written later by replay."""
    t0 = time.time()
    server = start_server(local_server.free_port(), tmp_path / "srv", timeout=90)
    print(f"server up in {time.time() - t0:.1f}s")
    proxy = _PROXY["proxy"] = TcpProxy(int(server.args[server.args.index("--port") + 1]))
    uri = f"http://127.0.0.1:{proxy.port}"
    try:
        spec = load_spec(write_spec(tmp_path, name="remote", tracking={"uri": uri}))
        mlflow_store.check_tracking(spec)  # reachable: no error
        proxy.down()
        with pytest.raises(SpecError, match="tracking.uri: the MLflow server .* is unreachable") as err:
            mlflow_store.check_tracking(spec)
        assert "no answer" not in str(err.value)  # refused at once, not waited out until the timeout
        proxy.up()

        exp_dir = Path(spec.output_dir) / spec.name
        exp_dir.mkdir(parents=True)
        gate = tmp_path / "gate"
        cb = tracking.make_callback(spec, exp_dir, resume=False)
        cb.max_backoff = 1.0
        t1 = time.time()
        grid = run_toy(
            spec, exp_dir, [{"kind": "ok", "gate": str(gate)}] * 2, [cb, Outage(gate, 2, 3.0)], stop=None
        )
        print(f"study with an outage: {time.time() - t1:.1f}s")
        assert grid.num_errors == 0
        assert cb.queue.failures >= 1, "the outage was not noticed"
        assert cb.report["unwritten"] == 0, cb.report
        mlc = mlflow_store.client(uri)
        exp_id = mlc.get_experiment_by_name("remote").experiment_id
        parent_id = json.loads((exp_dir / run_map.RUNS_FILE).read_text())["runs"]["parent"]
        kids = children(mlc, exp_id, parent_id)
        assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)
        assert mlc.get_run(parent_id).info.status == "FINISHED"
        for kid in kids:
            assert [m.step for m in mlc.get_metric_history(kid.info.run_id, "map")] == [0, 1, 2, 3]
        assert "View run" not in capfd.readouterr().out  # MLflow printed each run's URL as it ended
        mlflow_store.check_tracking(spec)  # the experiment exists now: read, and written to (a tag)
        assert mlc.get_experiment(exp_id).tags.get("search.checked") == "1"
        proxy.down()  # promote with the server down retried get_run for minutes (MLflow's 7 retries)
        with pytest.raises(SpecError, match="is unreachable .*Fix: start the server"):
            _registry_store(exp_dir)
        proxy.up()

        # the server stays away until the study ends: the study still finishes, the rest is kept
        spec2 = load_spec(write_spec(tmp_path / "two", name="remote2", tracking={"uri": uri}))
        exp2 = Path(spec2.output_dir) / spec2.name
        exp2.mkdir(parents=True)
        gate2 = tmp_path / "gate2"
        cb2 = tracking.make_callback(spec2, exp2, resume=False)
        cb2.flush_timeout = 2.0
        t1 = time.time()
        grid = run_toy(
            spec2, exp2, [{"kind": "ok", "gate": str(gate2)}], [cb2, Outage(gate2, 1, None)], stop=None
        )
        assert grid.num_errors == 0
        print(f"study with the server gone: {time.time() - t1:.1f}s")
        assert cb2.report["unwritten"] > 0 and Path(cb2.report["pending_file"]).is_file()
        proxy.up()
        assert write_queue.replay_pending(exp2) == {"written": cb2.report["unwritten"], "left": 0}
        assert not (exp2 / write_queue.PENDING_FILE).exists()
        parent2 = json.loads((exp2 / run_map.RUNS_FILE).read_text())["runs"]["parent"]
        exp2_id = mlc.get_experiment_by_name("remote2").experiment_id
        kid = children(mlc, exp2_id, parent2)[0]
        assert kid.info.status == "FINISHED" and mlc.get_run(parent2).info.status == "FINISHED"
        assert [m.step for m in mlc.get_metric_history(kid.info.run_id, "map")] == [0, 1, 2, 3]
    finally:
        proxy.down()
        stop_server(server)
