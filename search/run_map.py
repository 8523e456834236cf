"""``<exp>/mlflow_runs.json``: which MLflow run records what (the parent, each trial); and
:func:`read_pending`, the records of ``mlflow_pending.jsonl`` that the store did not take.

The tracker (:mod:`search.tracking`) and its write queue (:mod:`search.write_queue`) keep it; the
read-only commands (``best``, ``promote``, ``ui``) read it with :func:`read_runs`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import uuid
from pathlib import Path
from typing import Any

from search.study import atomic_write_text

log = logging.getLogger(__name__)

RUNS_FILE = "mlflow_runs.json"


class RunMap:
    """``<exp>/mlflow_runs.json``: experiment, parent and trial run ids and the tracker's progress
    (per-trial best so far, finished count). Thread-safe; every change is written atomically."""

    def __init__(self, exp_dir: Path):
        self.path = Path(exp_dir) / RUNS_FILE
        self.lock = threading.RLock()
        self.data: dict[str, Any] = {}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                log.warning("ignoring unreadable %s", self.path)
        self.data.setdefault("runs", {})  # key ("parent" or a trial id) -> run id
        self.data.setdefault("trials", {})  # trial id -> {best, best_epoch, last_epoch, done}
        self.data.setdefault("study", {"finished": 0, "best": None, "best_trial": None, "base": None})
        if "uid" not in self.data:  # names this study's runs (tag search.run_key): on disk before any run
            self.data["uid"] = uuid.uuid4().hex[:12]
            self.save()

    def save(self) -> None:
        with self.lock:
            text = json.dumps(self.data, indent=1, default=str)
            atomic_write_text(self.path, text)

    def run_id(self, key: str) -> str | None:
        with self.lock:
            return self.data["runs"].get(key)

    def set_run(self, key: str, run_id: str) -> None:
        with self.lock:
            self.data["runs"][key] = run_id
            self.save()

    def move_run(self, old: str, new: str, run_id: str) -> None:
        """``run_id`` (the run of ``old``, a trial that will never report) is ``new``'s from now on."""
        with self.lock:
            self.data["runs"].pop(old, None)
            self.data["trials"].pop(old, None)
            self.data["runs"][new] = run_id
            self.save()

    def trial(self, trial_id: str) -> dict[str, Any]:
        with self.lock:
            return self.data["trials"].setdefault(
                trial_id, {"best": None, "best_epoch": None, "last_epoch": None, "done": False}
            )


def read_runs(exp_dir: Path) -> dict[str, Any]:
    """The parsed ``mlflow_runs.json`` of an experiment ({} when the study was not tracked)."""
    path = Path(exp_dir) / RUNS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def read_pending(path: Path) -> list[dict[str, Any]]:
    """The ops a pending file holds, in order (a line cut by a crash is skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    ops = []
    for line in lines:
        with contextlib.suppress(ValueError):
            ops.append(json.loads(line))
    return [op for op in ops if isinstance(op, dict)]
