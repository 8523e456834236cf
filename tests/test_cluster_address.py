"""Which Ray cluster a study joins, and the one-line refusals of addresses that name none (an
audit on a real cluster): a stale RAY_ADDRESS hung the launch for minutes, SIGTERM blocked, as if
it started its own Ray; http:// and ray:// addresses ended with Ray's ValueError (exit 1); a
malformed port read as a host; and the printed resume command left out the cluster, so running it
started a Ray of its own."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from search import cluster
from search.cluster import ClusterError, check_reachable, given_address
from search.study_folder import resume_command
from tests.cli_study import cli_env, one_error_line, search
from tests.tinydata import make_tiny_coco, write_tiny_spec


@pytest.mark.parametrize(
    ("address", "spec_address", "env", "expected"),
    [
        ("10.0.0.5:6379", "10.0.0.6:6379", "10.0.0.7:6379", ("10.0.0.5:6379", "--address")),
        (None, "10.0.0.6:6379", "10.0.0.7:6379", ("10.0.0.6:6379", "resources.address")),
        (None, None, "10.0.0.7:6379", ("10.0.0.7:6379", "RAY_ADDRESS")),
        (None, None, "  ", (None, "--address")),
        (None, None, "local", (None, "--address")),  # Ray's word for a Ray of its own
        (None, None, None, (None, "--address")),
    ],
)
def test_the_cluster_a_study_joins(address, spec_address, env, expected, monkeypatch):
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    assert given_address(address, spec_address) == expected


@pytest.mark.parametrize(
    ("address", "words"),
    [
        ("http://127.0.0.1:8265", ["is an HTTP address", "HOST:PORT"]),
        ("ray://127.0.0.1:10001", ["is a Ray Client address", "a node of the cluster"]),
        ("127.0.0.1:6390:1", ["is not HOST:PORT"]),  # was: "Name or service not known"
        (" 127.0.0.1:6390", ["is not HOST:PORT"]),  # was: "cannot reach"
    ],
)
def test_addresses_that_name_no_cluster_are_refused_at_once(address, words, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cluster, "_last_started", lambda: None)  # no 'ray start' on this machine
    with pytest.raises(ClusterError) as err:
        check_reachable(address)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_auto_checks_ray_address_and_never_echoes_its_password(monkeypatch):
    monkeypatch.setattr(cluster, "_last_started", lambda: None)  # no 'ray start' on this machine
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    check_reachable("auto")  # nothing to check: ray.init looks further (Ray's processes on this machine)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("RAY_ADDRESS", f"bob:hunter2@127.0.0.1:{port}")
    with pytest.raises(ClusterError, match="cannot reach") as err:
        check_reachable("auto")
    assert "hunter2" not in str(err.value) and f"127.0.0.1:{port}" in str(err.value)
    monkeypatch.setenv("RAY_ADDRESS", f"ray://bob:hunter2@127.0.0.1:{port}")
    with pytest.raises(ClusterError, match="Ray Client") as err:
        check_reachable("auto")
    assert "hunter2" not in str(err.value), str(err.value)


def test_the_resume_command_names_the_cluster():
    exp = Path("/shared/runs/my study")
    assert resume_command(exp) == "python -m search resume '/shared/runs/my study'"
    assert resume_command(exp, 2, "10.0.0.5:6379") == (
        "python -m search resume '/shared/runs/my study' --address 10.0.0.5:6379 --keep-top 2"
    )


def test_a_stale_ray_address_is_refused_before_anything_is_written(tmp_path):
    make_tiny_coco(tmp_path / "data", n_images=2, size=64)
    spec = write_tiny_spec(
        tmp_path, "stale", space={"lr": 0.01}, search={"algorithm": "random", "num_trials": 1}, epochs=1
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    proc = search("launch", str(spec), cwd=tmp_path, timeout=120, RAY_ADDRESS=f"127.0.0.1:{port}")
    one_error_line(proc, "cannot reach the Ray cluster", f"127.0.0.1:{port}", "fix RAY_ADDRESS")
    assert not (tmp_path / "runs").exists()


def test_a_temp_folder_too_long_for_rays_sockets_is_refused_before_anything_is_written(tmp_path):
    """A long TMPDIR (a CI runner's, a job scheduler's) failed after the study folder was made,
    with Ray's "AF_UNIX path length cannot exceed 107 bytes" and no fix."""
    make_tiny_coco(tmp_path / "data", n_images=2, size=64)
    spec = write_tiny_spec(
        tmp_path, "longtmp", space={"lr": 0.01}, search={"algorithm": "random", "num_trials": 1}, epochs=1
    )
    long = tmp_path / ("t" * max(1, 80 - len(str(tmp_path))))
    long.mkdir()
    env = {k: v for k, v in cli_env().items() if k != "RAY_TMPDIR"} | {"TMPDIR": str(long)}
    run = [sys.executable, "-m", "search", "launch", str(spec)]
    proc = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    one_error_line(proc, f"TMPDIR={long} is too long for a local Ray", "Fix: set RAY_TMPDIR to a short")
    assert not (tmp_path / "runs").exists()
    env["RAY_TMPDIR"] = str(long)  # Ray's own variable, named when it is the one set
    proc = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    one_error_line(proc, f"RAY_TMPDIR={long} is too long", "(the folder may be at most")


WATCHED = """
import socket, sys, time
from pathlib import Path
from search.cluster import gcs_watch

server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
gcs, saved = f"127.0.0.1:{server.getsockname()[1]}", Path(sys.argv[1])
with gcs_watch("RESUME", before_exit=lambda: saved.write_text("saved"), every=0.2, misses=2, gcs=gcs):
    time.sleep(1.0)  # the GCS answers: nothing happens
    print("alive", flush=True)
    if sys.argv[2] == "lost":
        server.close()  # the cluster goes down while the study runs
        time.sleep(30)
server.close()  # after the run: not watched any more
time.sleep(1.0)
print("ended", flush=True)
"""


@pytest.mark.parametrize("lost", [True, False])
def test_a_cluster_lost_mid_study_ends_the_launch_with_its_resume_command(lost, tmp_path):
    """An audit: the cluster's GCS going down (ray stop on the head) left the launch silent for 60
    s, Ctrl-C ignored, until Ray's core worker ended it with its own C++ text and no resume command."""
    import subprocess
    import sys

    from tests.cli_study import cli_env

    saved = tmp_path / "saved"
    args = [sys.executable, "-c", WATCHED, str(saved), "lost" if lost else "kept"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, env=cli_env())
    assert "alive" in proc.stdout, proc.stderr[-2000:]
    if lost:
        assert proc.returncode == 1 and "ended" not in proc.stdout
        assert "stopped answering" in proc.stderr and proc.stderr.strip().endswith("continue with: RESUME")
        assert saved.read_text() == "saved"  # MLflow's queue went to its pending file first
    else:
        assert proc.returncode == 0 and "ended" in proc.stdout and not saved.exists(), proc.stderr[-2000:]


def test_only_a_gcs_passes_for_a_ray_head(ray_local):
    """A raylet's gRPC port passed the check (any HTTP/2 server did); Ray then took ~24 s and 23
    lines of C++ warnings to refuse it. The check now calls the GCS's own method."""
    node = ray_local._private.worker._global_node
    check_reachable(node.gcs_address)  # the GCS: no error
    with cluster.gcs_watch("RESUME", every=60):  # the launcher's: it finds the GCS of the Ray it runs on
        assert "gcs-watch" in [t.name for t in threading.enumerate()]
    with pytest.raises(ClusterError, match="another Ray process's port") as err:
        check_reachable(f"127.0.0.1:{node.node_manager_port}")
    assert "is not a Ray head node" in str(err.value)


def _serve_once(answer) -> int:
    """A one-connection server on a free port that reads the client's first bytes, then writes
    ``answer`` (frames) and closes."""
    from search import gcs_probe as gp

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def run():
        conn, _ = server.accept()
        with conn, server:
            conn.recv(65536)
            conn.sendall(answer(gp))

    threading.Thread(target=run, daemon=True).start()
    return server.getsockname()[1]


@pytest.mark.parametrize(
    ("answer", "verdict"),
    [
        (lambda gp: b"HTTP/1.1 400 Bad Request\r\n\r\n", "other"),
        (lambda gp: gp._frame(gp._SETTINGS, 0, 0), "unsure"),  # closed after SETTINGS: was "grpc"
        (lambda gp: gp._frame(gp._SETTINGS, 0, 0) + gp._frame(gp._DATA, 0, 1, b"\x00" * 7), "gcs"),
        (
            lambda gp: (
                gp._frame(gp._SETTINGS, 0, 0)
                + gp._frame(
                    gp._HEADERS, gp._END_STREAM | gp._END_HEADERS, 1, gp._literal("grpc-status", "12")
                )
            ),
            "grpc",
        ),
        (
            lambda gp: (
                gp._frame(gp._SETTINGS, 0, 0)
                + gp._frame(
                    gp._HEADERS, gp._END_STREAM | gp._END_HEADERS, 1, gp._literal("grpc-status", "16")
                )
            ),
            "gcs",  # a GCS that wants Ray's auth token
        ),
        (lambda gp: gp._frame(gp._SETTINGS, 0, 0) + gp._frame(gp._GOAWAY, 0, 0, b"\x00" * 8), "unsure"),
    ],
)
def test_what_the_probe_makes_of_each_answer(answer, verdict):
    from search import gcs_probe

    port = _serve_once(answer)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        assert gcs_probe.probe(sock, f"127.0.0.1:{port}", 3.0) == verdict
