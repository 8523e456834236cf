"""MLflow recording (search.tracking), the parts that need no Ray: parameters and metrics as MLflow
takes them, trial tags from the study record, an unreachable or silent server failing fast, and
the write queue keeping what a store that is down did not take, with no duplicate run."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from search import facts, local_server, mlflow_store, run_map, write_queue
from search.errors import SpecError
from search.spec import load_spec
from tests.test_tracking import write_spec


def test_flatten_params_and_metric_filter():
    params = write_queue.flatten_params(
        {"lr": 0.01, "loss.box": "giou", "nested": {"a": True}, "long": "x" * 7000}
    )
    assert params["lr"] == "0.01" and params["loss.box"] == "giou" and params["nested.a"] == "true"
    assert len(params["long"]) == 6000
    metrics = write_queue.metric_values(
        {
            "epoch": 1,
            "map": 0.5,
            "pid": 7,
            "config": {"lr": 1},
            "loss": float("nan"),
            "ap_per_class": {"red": 0.4},
            "time_total_s": 3.0,
            "node_id": "x",
        }
    )
    assert metrics == {"map": 0.5, "ap_per_class/red": 0.4}
    assert (
        mlflow_store.redact("https://bob:secret@mlflow.example.com:8443/x")
        == "https://***@mlflow.example.com:8443/x"
    )


@pytest.mark.parametrize(
    "record, tags",
    [
        ({}, {"search.reference": "false"}),
        (
            {"reference": True, "recipe": "sqrt", "state": "COMPLETE"},
            {"search.reference": "true", "search.recipe": "sqrt", "search.state": "COMPLETE"},
        ),
        ({"state": "STOPPED"}, {"search.reference": "false"}),  # a legacy word, not one of study.STATES
        (
            {"state": "PRUNED", "stopped": {"epoch": 2, "value": 0.25, "cut": None, "rule": "halving"}},
            {
                "search.reference": "false",
                "search.state": "PRUNED",
                "search.stopped.epoch": "2",
                "search.stopped.value": "0.25",
                # no cut (a time-budget stop): no tag, not the string 'null'
                "search.stopped.rule": "halving",
            },
        ),
    ],
)
def test_trial_tags_from_the_study_record(record, tags):
    assert facts.trial_tags(record) == tags


class SilentServer:
    """A loopback port that accepts connections and never answers; counts the connections."""

    def __init__(self) -> None:
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)  # held open, never answered

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def test_check_tracking_unreachable_server_fails_fast(tmp_path):
    port = local_server.free_port()  # nothing listens there
    spec = load_spec(write_spec(tmp_path, tracking={"uri": f"http://hunter2@127.0.0.1:{port}"}))
    with pytest.raises(SpecError) as err:
        mlflow_store.check_tracking(spec)
    line = err.value.line()
    # refused at once: "unreachable", not the "no answer" of a probe that waited for its timeout
    assert err.value.key == "tracking.uri" and "unreachable" in line and "no answer" not in line
    assert "hunter2" not in line and "\n" not in line
    from search.launcher import preflight

    with pytest.raises(SpecError, match=r"Fix: start the server \(or make it reachable\), then resume[.]"):
        preflight(spec, None, weights=False)  # a resume cannot drop tracking.uri, as launch's fix said
    # a server that accepts and stays silent: the probe's timeout ends it, after one attempt
    silent = SilentServer()
    try:
        spec_s = load_spec(write_spec(tmp_path / "s", tracking={"uri": f"http://127.0.0.1:{silent.port}"}))
        with pytest.raises(SpecError) as err:
            mlflow_store.check_tracking(spec_s, timeout=1.0)
    finally:
        silent.close()
    assert err.value.key == "tracking.uri" and "is no answer" in err.value.line(), err.value.line()
    assert len(silent.accepted) == 1  # no retries: max_retries=0 on the probe
    # ui's page of a server's study: the root where the server is down or silent (user kept out)
    assert (
        mlflow_store.experiment_page(f"http://hunter2@127.0.0.1:{port}/", "s", 1.0)
        == f"http://***@127.0.0.1:{port}"
    )
    # the default store: a SQLite file beside the experiments
    spec = load_spec(write_spec(tmp_path / "b"))
    assert mlflow_store.tracking_uri(spec) == f"sqlite:///{(tmp_path / 'b' / 'runs' / 'mlflow.db').resolve()}"
    mlflow_store.check_tracking(spec)


def test_a_web_server_that_is_not_mlflow_is_refused(tmp_path):
    """Any 404 passed for MLflow's 'no such experiment' (a plain web server, a proxy without
    MLflow's path): the whole study trained and every record was rejected."""
    import http.server
    import threading

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{web.server_address[1]}/mlflow"
        spec = load_spec(write_spec(tmp_path, tracking={"uri": uri}))
        with pytest.raises(SpecError) as err:
            mlflow_store.check_tracking(spec)
        with pytest.raises(SpecError) as tls:  # the cause was cut off after "Max retri"
            mlflow_store.check_server(uri.replace("http://", "https://"), "e")
        from search import registry

        with pytest.raises(registry.RegistryError) as page:  # models:/ weights there: its HTML was the line
            registry.resolve_model_uri("models:/m@champion", uri, cache_dir=tmp_path / "cache")
    finally:
        web.shutdown()
    assert "(the answer is a web page, not MLflow's" in str(page.value) and "<" not in str(page.value)
    assert "did not answer like an MLflow server (HTTP 404" in err.value.line(), err.value.line()
    assert "is unreachable (TLS failed: " in tls.value.line(), tls.value.line()  # OpenSSL words the rest


def test_write_queue_keeps_unwritten_records_when_store_is_down(tmp_path, caplog):
    runs = run_map.RunMap(tmp_path)
    uri = f"http://127.0.0.1:{local_server.free_port()}"
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    queue = write_queue.WriteQueue(
        uri, "e", runs, tmp_path / write_queue.PENDING_FILE, backoff=0.1, max_backoff=0.2
    )
    queue.start()
    queue.put({"op": "open_run", "key": "parent", "name": "p", "tags": {}})
    queue.put({"op": "log", "key": "parent", "metrics": [["m", 1.0, 1, 0]], "params": {}, "tags": {}})
    import time

    deadline = time.time() + 30
    while queue.down_since is None and time.time() < deadline:
        time.sleep(0.05)
    left = queue.close(timeout=1.5)
    assert len(left) == 2 and queue.failures >= 1 and queue.written == 0
    # the wait at the end is said, not passed in silence (a Ctrl-C with the server down: a silent minute)
    assert "still unavailable: waiting up to 2s for it, then 2 record(s) are kept" in caplog.text
    lines = (tmp_path / write_queue.PENDING_FILE).read_text().splitlines()
    assert [json.loads(x)["op"] for x in lines] == ["open_run", "log"]
    # a disk-full stop saves MLflow's records after Ray's clean-up closed the queue: the second
    # close emptied the pending file it had found nothing to add to
    assert (
        queue.close(timeout=0.1) == []
        and (tmp_path / write_queue.PENDING_FILE).read_text().splitlines() == lines
    )
    again = write_queue.WriteQueue(uri, "e", runs, tmp_path / write_queue.PENDING_FILE)
    assert again.load_pending() == 2


def test_pending_records_go_first_in_their_order(tmp_path):
    """A resume queues the records an earlier run left ahead of its own, in the order they were
    made: reversed, a trial's status came before the run it ends was opened."""
    ops = [
        {"op": "open_run", "key": "t1", "name": "t1", "tags": {}},
        {"op": "log", "key": "t1", "metrics": [["m", 1.0, 1, 1]]},
        {"op": "status", "key": "t1", "status": "FINISHED", "error": "was down"},
    ]
    pending = tmp_path / write_queue.PENDING_FILE
    pending.write_text("".join(json.dumps(op) + "\n" for op in ops))
    queue = write_queue.WriteQueue("sqlite:///unused.db", "e", run_map.RunMap(tmp_path), pending)
    queue.put({"op": "status", "key": "parent", "status": "RUNNING"})
    assert queue.load_pending() == 3
    assert [(op["op"], op["key"]) for op in queue.ops] == [
        ("open_run", "t1"),
        ("log", "t1"),
        ("status", "t1"),
        ("status", "parent"),
    ]
    assert "error" not in queue.ops[2]  # the reason it waited is not sent again


def test_a_record_the_store_rejected_is_kept_in_the_pending_file(tmp_path, monkeypatch):
    """A record MLflow refused (not a store that is down) is set aside, not retried; closing the
    queue kept only the unwritten ones and lost it."""
    written = []

    def execute(op):
        if op["key"] == "bad":
            raise ValueError("INVALID_PARAMETER_VALUE: metric value is not a number")
        written.append(op["key"])

    pending = tmp_path / write_queue.PENDING_FILE
    queue = write_queue.WriteQueue("sqlite:///unused.db", "e", run_map.RunMap(tmp_path), pending)
    monkeypatch.setattr(queue, "_execute", execute)
    queue.start()
    for key in ("a", "bad", "b"):
        queue.put({"op": "log", "key": key, "metrics": [["m", 1.0, 1, 1]]})
    left = queue.close(timeout=10)
    assert written == ["a", "b"] and queue.failures == 0
    assert [op["key"] for op in left] == ["bad"] and "INVALID_PARAMETER_VALUE" in left[0]["error"]
    saved = [json.loads(line) for line in pending.read_text().splitlines()]
    assert [(op["op"], op["key"]) for op in saved] == [("log", "bad")]
    assert "INVALID_PARAMETER_VALUE" in queue.left_reason()  # the rejection is the reason given


def test_the_reason_records_are_left_is_not_an_outage_that_ended(tmp_path, monkeypatch):
    """A store down for a moment, then a record it rejected: the end-of-study warning gave the
    outage's 'Connection refused' as the reason."""
    tries = []

    def execute(op):
        tries.append(op["key"])
        if tries == ["a"]:
            raise ConnectionError("Connection refused")
        if op["key"] == "bad":
            raise ValueError("INVALID_PARAMETER_VALUE: metric value is not a number")

    pending = tmp_path / write_queue.PENDING_FILE
    queue = write_queue.WriteQueue(
        "sqlite:///unused.db", "e", run_map.RunMap(tmp_path), pending, backoff=0.05
    )
    monkeypatch.setattr(queue, "_execute", execute)
    queue.start()
    for key in ("a", "bad"):
        queue.put({"op": "log", "key": key, "metrics": [["m", 1.0, 1, 1]]})
    left = queue.close(timeout=10)
    assert tries == ["a", "a", "bad"] and [op["key"] for op in left] == ["bad"]
    assert queue.last_error == "Connection refused" and "INVALID_PARAMETER_VALUE" in queue.left_reason()


def test_records_left_by_a_store_that_never_answered_are_not_called_rejected(tmp_path, monkeypatch):
    """A hung server (a request that never returns): the end-of-study warning said the records
    were "rejected"; none was."""
    release = threading.Event()
    pending = tmp_path / write_queue.PENDING_FILE
    queue = write_queue.WriteQueue("sqlite:///unused.db", "e", run_map.RunMap(tmp_path), pending)
    monkeypatch.setattr(queue, "_execute", lambda op: release.wait(30))
    queue.start()
    queue.put({"op": "log", "key": "a", "metrics": [["m", 1.0, 1, 1]]})
    queue.put({"op": "log", "key": "b", "metrics": [["m", 1.0, 1, 1]]})
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "0")  # the join gives up after 5 s
    closing = threading.Thread(target=queue.close, kwargs={"timeout": 0.2})
    closing.start()  # a SIGKILL in its wait (Kubernetes' grace period ends) lost every record
    for _ in range(100):  # while it waits (its flush 0.2 s, then the join's 5 s)
        if pending.is_file():
            break
        time.sleep(0.02)
    assert [op["key"] for op in write_queue.read_pending(pending)] == ["a", "b"] and closing.is_alive()
    closing.join()
    left = queue.close(timeout=0.2) or write_queue.read_pending(pending)  # closed once: the file says
    release.set()
    assert [op["key"] for op in left] == ["a", "b"] and queue.rejected == []
    assert queue.left_reason() == "the store did not answer within the wait"


def test_lost_answer_to_create_run_makes_no_duplicate(tmp_path):
    """The store created the run but its answer was lost (connection cut): the retry, in this
    process or after a restart (pending file), finds that run instead of creating a second one."""
    uri = mlflow_store.default_uri(tmp_path)
    real = mlflow_store.client(uri)

    class LosesFirstAnswer:
        def __init__(self):
            self.lost = 0

        def __getattr__(self, name):
            return getattr(real, name)

        def create_run(self, *args, **kwargs):
            run = real.create_run(*args, **kwargs)
            if self.lost == 0:
                self.lost += 1
                raise ConnectionError("connection reset while reading the answer")
            return run

    runs = run_map.RunMap(tmp_path)
    queue = write_queue.WriteQueue(uri, "lost", runs, tmp_path / write_queue.PENDING_FILE, backoff=0.05)
    queue._client = LosesFirstAnswer()
    queue.start()
    queue.put({"op": "open_run", "key": "parent", "name": "p", "tags": {}})
    queue.put({"op": "status", "key": "parent", "status": "FINISHED"})
    assert queue.close(timeout=20) == [] and queue.failures == 1
    exp_id = real.get_experiment_by_name("lost").experiment_id
    found = real.search_runs([exp_id], "")
    assert len(found) == 1 and found[0].info.run_id == runs.run_id("parent")
    assert found[0].info.status == "FINISHED"


def test_the_parents_figures_said_again_are_written_once_per_value(tmp_path):
    """A launch's end writes the parent's step-0 figures (reference, best vs reference); a replay of
    its pending records, or a resume's end, says them again: the same value once, a new one added
    (MLflow shows the newest)."""
    uri = mlflow_store.default_uri(tmp_path)
    runs = run_map.RunMap(tmp_path)
    queue = write_queue.WriteQueue(uri, "again", runs, tmp_path / write_queue.PENDING_FILE, backoff=0.05)
    queue.start()
    queue.put({"op": "open_run", "key": "parent", "name": "p", "tags": {}})
    for value, ts in ((0.25, 1), (0.25, 2), (0.5, 3), (0.5, 4)):
        queue.put({"op": "log", "key": "parent", "metrics": [["reference_map", value, ts, 0]], "same": True})
    queue.put({"op": "log", "key": "parent", "metrics": [["best_map", 0.5, 5, 1]], "same": True})
    queue.put({"op": "log", "key": "parent", "metrics": [["best_map", 0.5, 6, 2]], "same": True})
    assert queue.close(timeout=20) == []
    mlc = mlflow_store.client(uri)
    run_id = runs.run_id("parent")
    points = [(m.step, m.value) for m in mlc.get_metric_history(run_id, "reference_map")]
    assert (
        sorted(points) == [(0, 0.25), (0, 0.5)] and mlc.get_run(run_id).data.metrics["reference_map"] == 0.5
    )
    assert len(mlc.get_metric_history(run_id, "best_map")) == 2  # other steps are other points


_KILLED_MAKER = """
import os, signal, sys
import mlflow.store.db.utils as u
from search import mlflow_store

def upgrade(engine):  # the first tables exist, the migrations have not run: killed here
    os.kill(os.getpid(), signal.SIGKILL)

u._upgrade_db = upgrade
mlflow_store.client(sys.argv[1]).search_experiments()
"""


def test_a_store_being_made_when_its_process_is_killed_is_not_left_half_made(tmp_path):
    """MLflow makes a SQLite store's tables in seconds of migrations; a launch SIGKILLed meanwhile
    left a store that MLflow then refused for good. Now the store appears whole or not at all,
    and the next client makes it (removing the killed maker's leftover)."""
    import subprocess
    import sys

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    killed = subprocess.run([sys.executable, "-c", _KILLED_MAKER, uri], env=env, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-500:]
    assert not db.exists() and len(list(tmp_path.glob(".mlflow.db.*.creating"))) == 1
    left = next(tmp_path.glob(".mlflow.db.*.creating"))  # killed in a transaction: SQLite's journal
    left.with_name(left.name + "-journal").write_bytes(b"")  # too (it stayed after the next launch)
    mlc = mlflow_store.client(uri)
    exp = mlflow_store.get_or_create_experiment(mlc, "study", uri)
    run = mlc.create_run(exp)
    mlc.log_metric(run.info.run_id, "map50", 0.5)
    assert mlc.get_run(run.info.run_id).data.metrics == {"map50": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]  # the leftover is gone


def test_a_moved_or_copied_store_keeps_its_artifacts_beside_it(tmp_path):
    """MLflow records absolute artifact locations: a copied output folder's store named the
    original's artifacts (a promote of the copy wrote its bundle there; with the original moved
    away the UI listed none). Opening the copy's store points this tool's experiments at the
    ``mlartifacts`` beside it; another tool's experiment, a store seen through a link to where it
    was, and a store whose study runs now (maybe writing through another mount of it) are left."""
    import shutil

    from search.guards import StudyLock

    ran = tmp_path / "ran"
    (ran / "s").mkdir(parents=True)
    (ran / "s" / "spec.yaml").write_text("name: s\n")  # a study beside it: the default store
    uri = f"sqlite:///{ran / mlflow_store.DB_FILE}"
    mlc = mlflow_store.client(uri)
    ours = mlc.create_experiment("st x", artifact_location=mlflow_store.artifact_location(uri, "st x"))
    theirs = mlc.create_experiment("other", artifact_location=(tmp_path / "elsewhere").as_uri())
    run = mlc.create_run(ours).info.run_id
    (tmp_path / "f.txt").write_text("x")
    mlc.log_artifact(run, str(tmp_path / "f.txt"), "bundle")
    shutil.move(ran, tmp_path / "real")
    ran.symlink_to(tmp_path / "real")  # where it was is a link to it: the same store, not a copy
    assert mlflow_store.mend_moved(tmp_path / "real" / mlflow_store.DB_FILE) == 0
    ran.unlink()
    shutil.copytree(tmp_path / "real", tmp_path / "copy")
    shutil.move(tmp_path / "real", tmp_path / "gone")  # the original is not there to read from
    lock = StudyLock(tmp_path / "copy" / "s").acquire()  # its study runs: not now
    try:
        assert mlflow_store.mend_moved(tmp_path / "copy" / mlflow_store.DB_FILE) == 0
    finally:
        lock.release()
    here = f"sqlite:///{tmp_path / 'copy' / mlflow_store.DB_FILE}"
    copied = mlflow_store.client(here)
    assert copied.get_experiment(ours).artifact_location.startswith((tmp_path / "copy").as_uri())
    assert copied.get_run(run).info.artifact_uri.startswith((tmp_path / "copy" / "mlartifacts").as_uri())
    assert [f.path for f in copied.list_artifacts(run, "bundle")] == ["bundle/f.txt"]
    assert copied.get_experiment(theirs).artifact_location == (tmp_path / "elsewhere").as_uri()
    assert mlflow_store.mend_moved(tmp_path / "copy" / mlflow_store.DB_FILE) == 0  # once is enough


def test_warm_up_creates_the_local_store_in_the_background(tmp_path, monkeypatch):
    monkeypatch.delenv(mlflow_store.DISABLE_ENV, raising=False)
    spec = load_spec(write_spec(tmp_path))
    uri = mlflow_store.tracking_uri(spec)
    assert uri.startswith("sqlite:///") and not (tmp_path / "runs" / "mlflow.db").exists()
    mlflow_store.warm_up(spec)
    mlflow_store.warm_up(spec)  # once per store
    mlflow_store.warmed(uri)  # what the writer does before its first write
    assert uri not in mlflow_store._WARMING
    assert (tmp_path / "runs" / "mlflow.db").is_file()  # made whole, its tables there
    # the experiment is the writer's to make: a launch refused after the warm-up made one
    assert mlflow_store.client(uri).get_experiment_by_name(mlflow_store.experiment_name(spec)) is None
    other = load_spec(write_spec(tmp_path, name="other"))
    monkeypatch.setenv(mlflow_store.DISABLE_ENV, "1")
    mlflow_store.warm_up(other)  # tracking off: nothing started
    assert mlflow_store.tracking_uri(other) not in mlflow_store._WARMING


def test_a_database_error_is_said_in_its_drivers_words():
    """A busy SQLite store: the writer's warning was cut to '...(sqlite3.OperationalError) d)' and
    a command's error line held the whole SELECT with its parameters."""
    from search.failures import exception_line

    locked = (
        "(sqlite3.OperationalError) database is locked [SQL: SELECT experiments.experiment_id FROM "
        "experiments WHERE experiments.name = ?] [parameters: ('a',)] (Background on this error at: "
        "https://sqlalche.me/e/20/e3q8)"
    )
    assert mlflow_store.short_reason(locked) == "sqlite3.OperationalError: database is locked"
    said = "RuntimeError: sqlite3.OperationalError: database is locked"
    assert exception_line(RuntimeError(locked)) == said
    long = exception_line(ValueError("x " * 400))
    assert long.startswith("ValueError: x x") and long.endswith("...") and len(long) == 312
