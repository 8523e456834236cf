"""The tiny CLI study shared by the command tests: ``python -m search`` as a real process, its
exit code and output checks, and two session fixtures (registered in ``conftest.py``):
``cli_study``, one tiny study (ssdlite320, random init, 4 images of 64 px, 2 trials of 1 epoch,
recorded in the default SQLite MLflow store) launched once through the CLI, and ``cli_bundle``,
the ``export --json`` of its best trial."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tinydata import make_tiny_coco, write_tiny_spec

ROOT = Path(__file__).resolve().parents[1]
NAME = "cmds"


def cli_env() -> dict[str, str]:
    return dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))


def search(*args: str, cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """``python -m search ARGS`` in ``cwd`` (timeout: a did-not-hang guard, not a speed claim)."""
    return subprocess.run(
        [sys.executable, "-m", "search", *args],
        cwd=cwd,
        env={**cli_env(), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok_json(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def one_error_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2 and exactly one non-empty stderr line, naming every one of ``words``."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1000:], proc.stderr[-3000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr, lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture(scope="session")
def cli_study(tmp_path_factory):
    """The tiny study, launched by ``python -m search launch --json`` (MLflow on: SQLite)."""
    root = tmp_path_factory.mktemp("cmds")
    images, _ = make_tiny_coco(root / "data", n_images=4, size=64)
    spec = write_tiny_spec(
        root,
        NAME,
        space={"optimizer": "sgd", "lr": {"low": 0.005, "high": 0.02, "log": True}},
        search={"algorithm": "random", "scheduler": "none", "num_trials": 2, "max_concurrent": 2},
        epochs=1,
    )
    proc = search("launch", str(spec), "--json", cwd=root, timeout=600)
    summary = ok_json(proc)
    # stdout is the one JSON object (the header, progress and text summary go to stderr)
    assert json.loads(proc.stdout) == summary and "launching study" in proc.stderr
    runs = root / "runs"
    return {
        "root": root,
        "runs": runs,
        "exp_dir": runs / NAME,
        "summary": summary,
        "images": sorted(images.glob("*.png")),
        "where": ["--output-dir", str(runs)],
    }


@pytest.fixture(scope="session")
def cli_bundle(cli_study):
    """``export --json`` of the best trial, with its TorchScript check (the documented default)."""
    out = cli_study["root"] / "bundle"
    where = cli_study["where"]
    meta = ok_json(search("export", NAME, *where, "--out", str(out), "--json", cwd=cli_study["root"]))
    return out, meta
