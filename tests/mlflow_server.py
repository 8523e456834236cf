"""A real ``mlflow server`` on 127.0.0.1 for tests (tracking and fault suites share it), started
and stopped by the same functions as ``search ui`` (``search.local_server``)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from search import local_server


def start_server(
    port: int, root: Path, *extra: str, env: dict[str, str] | None = None, timeout: float = 120.0
) -> subprocess.Popen:
    """Start ``mlflow server`` (with ``extra`` arguments) over a SQLite file in ``root`` (its own
    process group) and wait until ``/health`` answers; raise RuntimeError when it exits or stays
    silent ``timeout`` s."""
    root.mkdir(parents=True, exist_ok=True)
    cmd = local_server.server_command(
        f"sqlite:///{root / 'server.db'}", port, "--artifacts-destination", str(root / "art"), *extra
    )
    log = root / f"server-{port}-{time.time():.0f}.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=local_server.server_env(env or {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}),
        )
    try:
        local_server.wait_healthy(proc, port, timeout, log)
    except RuntimeError:
        stop_server(proc)
        raise
    return proc


def stop_server(proc: subprocess.Popen, grace: float = local_server.STOP_GRACE_S) -> None:
    """Stop the server's process group and wait until its port is released."""
    local_server.stop(proc, int(proc.args[proc.args.index("--port") + 1]), grace)
