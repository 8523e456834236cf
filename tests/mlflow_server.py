"""A real ``mlflow server`` on 127.0.0.1 for tests (tracking and fault suites share it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def start_server(
    port: int, root: Path, *, env: dict[str, str] | None = None, timeout: float = 120.0
) -> subprocess.Popen:
    """Start ``mlflow server`` over a SQLite file in ``root`` (its own process group) and wait
    until ``/health`` answers; raise RuntimeError when it exits or stays silent ``timeout`` s."""
    root.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination",
        str(root / "art"),
    ]
    log = open(root / f"server-{port}-{time.time():.0f}.log", "w")
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env or {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    stop_server(proc)
    raise RuntimeError(f"mlflow server did not answer /health within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the server's process group; SIGKILL it when it has not exited after ``grace`` s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
