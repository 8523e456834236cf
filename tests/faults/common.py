"""Helpers shared by the reliability suites: batched CLI runs, folder snapshots, isolated env."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_tmp(prefix: str) -> Path:
    """A short private folder under /tmp (Ray's unix socket paths must stay under 108 chars)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def env(tmpdir: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a ``python -m search`` child: this repository first on the path, Ray's
    token warning off, and (``tmpdir``) a private TMPDIR, so a Ray session it starts appears as
    ``<tmpdir>/ray/session_*`` and nowhere else."""
    out = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT), MLFLOW_DISABLE_TELEMETRY="true")
    out.pop("SEARCH_NO_MLFLOW", None)
    out.pop("SEARCH_TEST_FAIL_WHEN", None)
    if tmpdir is not None:
        out["TMPDIR"] = str(tmpdir)
    out.update(extra)
    return out


def ray_sessions(tmpdir: Path) -> list[str]:
    root = Path(tmpdir) / "ray"
    return sorted(p.name for p in root.glob("session_2*")) if root.is_dir() else []


def snapshot(folder: Path) -> set[str]:
    """Every path under ``folder`` (relative), to tell what a command created."""
    return {str(p.relative_to(folder)) for p in Path(folder).rglob("*")}


def run_batch(
    cases: list[dict[str, Any]], work: Path, timeout: float = 300, **env_extra: str
) -> dict[str, dict]:
    """Run ``cases`` (``{"id", "argv", "cwd"}``) through ``tests.faults.cli_batch`` in one child
    process with a private TMPDIR; returns ``{id: result}`` plus ``"__ray_sessions__"``."""
    work.mkdir(parents=True, exist_ok=True)
    cases_file, results_file = work / "cases.json", work / "results.json"
    cases_file.write_text(json.dumps(cases))
    tmpdir = short_tmp("fb")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.faults.cli_batch", str(cases_file), str(results_file)],
        cwd=ROOT,
        env=env(tmpdir, **env_extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0 or not results_file.is_file():
        raise RuntimeError(f"cli_batch failed ({proc.returncode}): {proc.stderr[-3000:]}")
    results = {r["id"]: r for r in json.loads(results_file.read_text())}
    results["__ray_sessions__"] = {"sessions": ray_sessions(tmpdir)}
    return results


def one_error_line(stderr: str) -> str:
    """The single non-empty stderr line (AssertionError when there are more or none)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr
    return lines[0]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
