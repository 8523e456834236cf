"""A local ``mlflow server`` child process on 127.0.0.1: a port for it, its start (``/health``
answers) and its stop (its port released).

``search ui`` runs one; the tests run theirs through the same three functions.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
STOP_GRACE_S = 15.0  # SIGTERM's grace before the server's processes are killed


def server_command(uri: str, port: int, *extra: str) -> list[str]:
    """``mlflow server`` over ``uri`` on ``HOST:port`` with one worker (a UI, not a service)."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
        *extra,
    ]


def server_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: ``env`` (default: this process's) without MLflow's job runner
    (a UI over training runs starts no jobs; it would add a job runner and its huey consumers,
    eight processes in MLflow 3.17) unless the caller set ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION`` itself."""
    out = dict(os.environ if env is None else env)
    out.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return out


def free_port() -> int:
    """A port on ``HOST`` that nothing is bound to now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    """Whether a server could listen on ``HOST:port``. SO_REUSEADDR as the MLflow server sets
    it: a closed connection of an earlier server in TIME_WAIT is no server, a bound socket is."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def claim_port(port: int) -> int | None:
    """An open descriptor holding the lock of ``port`` for this process's life (close it to let
    go), or None when another ``search ui`` holds it: two started on one free port at once each
    found it free, and the one whose server lost the port printed the other's URL as its own."""
    import fcntl
    import tempfile

    path = Path(tempfile.gettempdir()) / f"search-ui-{os.getuid()}-{port}.lock"  # this user's own
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:  # not a file this user can open: go on without the lock, as before it had one
        return os.open(os.devnull, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def wait_healthy(proc: subprocess.Popen, port: int, timeout: float, log: Path | None = None) -> None:
    """Return once ``/health`` answers 200; RuntimeError when ``proc`` exits first (with the last
    lines of ``log``) or after ``timeout`` s."""
    url = f"http://{HOST}:{port}/health"
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            where = f" (see {log})" if log else ""
            raise RuntimeError(f"mlflow server did not answer {url} within {timeout:.0f}s{where}")
        time.sleep(0.3)
    tail = log.read_text(errors="replace").splitlines()[-5:] if log and log.is_file() else []
    raise RuntimeError(f"mlflow server exited with code {proc.returncode}: {' | '.join(tail)}")


def stop(proc: subprocess.Popen, port: int, grace: float = STOP_GRACE_S) -> None:
    """Stop the server's process group (``proc`` started with ``start_new_session=True``) and
    return once its port is released: ``mlflow server`` runs uvicorn as a child, which may still
    be shutting down when its parent has exited. SIGKILL what is left after ``grace`` s."""
    for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass  # every process of the group has exited
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if proc.poll() is not None and port_free(port):
                return
            time.sleep(0.2)
