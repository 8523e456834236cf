"""The fault tests' harness (tests/faults/test_faults.py, test_crash_points.py): a launch as a
process with its own TMPDIR, waiting on a study's files, a real MLflow server's port, the tiny
world's specs, and the checks every fault ends with (MLflow and Optuna figures, the base weights
unchanged, the best checkpoint evaluating to its recorded metric)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from search import study as S
from tests.faults.common import env, sha256, short_tmp
from tests.tinydata import write_tiny_spec

METRIC = "map50"


# ---------------------------------------------------------------- processes


class Proc:
    """``python -m search ARGV`` in its own session and private TMPDIR (its Ray cluster's processes
    carry that TMPDIR in their environment: :meth:`cleanup` finds and kills exactly those)."""

    def __init__(self, argv: list[str], cwd: Path, logs: Path, **env_extra: str):
        self.tmpdir = short_tmp("ft")
        logs.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = logs / "stdout.txt", logs / "stderr.txt"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "search", *argv],
            cwd=cwd,
            stdout=self._out,
            stderr=self._err,
            env=env(self.tmpdir, **env_extra),
            start_new_session=True,
        )

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.flush()
            self._err.flush()

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def session_pids(self) -> list[int]:
        """Processes (other than this test's) whose environment holds this run's TMPDIR."""
        mark = f"TMPDIR={self.tmpdir}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if mark in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    def cleanup(self) -> list[int]:
        """SIGKILL whatever this run left (the launcher, Ray's GCS/raylet/workers); returns the pids."""
        left = self.session_pids()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait(30)
        self._out.close()
        self._err.close()
        return left


def wait_until(pred, timeout: float, proc: Proc | None = None, what: str = "") -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        if proc is not None and proc.proc.poll() is not None:
            raise AssertionError(
                f"the process ended ({proc.proc.returncode}) before {what}:\n{proc.stderr[-3000:]}"
            )
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def study_json(exp_dir: Path) -> dict:
    try:
        return S.read_study(exp_dir)
    except (OSError, ValueError):
        return {}


def results_of(trial: dict) -> list[dict]:
    """The Ray result lines of a trial (``result.json`` in its folder: epoch, pid, ...)."""
    path = Path(trial["trial_dir"]) / "result.json"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


# ---------------------------------------------------------------- a real mlflow server


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- the world: data, base weights, specs


def write_spec(world: dict, name: str, space: dict, search: dict, epochs: int, **extra) -> Path:
    search = {"scheduler": "none", "max_concurrent": 2, "max_failures": 1, **search}
    return write_tiny_spec(
        world["root"],
        name,
        space=space,
        search=search,
        epochs=epochs,
        weights=str(world["base"]),
        metric=METRIC,
        **extra,
    )


# ---------------------------------------------------------------- checks shared by every fault


def optuna_trials(exp_dir: Path, name: str) -> list:
    from search.searcher import load_study

    return load_study(exp_dir / S.JOURNAL_FILE, name).get_trials(deepcopy=False)


def clean_figures(n_trials: int) -> dict:
    """What ``mlflow_figures`` counts for a study of ``n_trials`` that lost and repeated nothing."""
    return {
        "runs_expected": n_trials,
        "runs_lost": 0,
        "runs_duplicated": 0,
        "runs_running": 0,
        "metric_points_missing": 0,
        "metric_points_duplicated": 0,
    }


def mlflow_figures(uri: str, experiment: str, state: dict, record) -> dict:
    """One MLflow run per study trial, none RUNNING, each epoch's objective exactly once; records
    the figures and returns ``{"runs": {trial id: [runs]}, "client": ...}``."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    mlc = MlflowClient(tracking_uri=uri)
    exp = mlc.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} at {uri}"
    runs = mlc.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    by_trial: dict[str, list] = defaultdict(list)
    for r in runs:
        if "mlflow.parentRunId" in r.data.tags:
            by_trial[r.data.tags.get("search.trial_id", "?")].append(r)
    trials = state["trials"]
    lost = [tid for tid in trials if not by_trial.get(tid)]
    duplicated = sum(max(0, len(v) - 1) for v in by_trial.values()) + len(
        [k for k in by_trial if k not in trials]
    )
    duplicated += max(0, len(parents) - 1)
    running = [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    points_missing = points_dup = 0
    for tid, t in trials.items():
        if len(by_trial.get(tid, [])) != 1:
            continue
        steps = [m.step for m in mlc.get_metric_history(by_trial[tid][0].info.run_id, METRIC)]
        want = {row["epoch"] for row in t["history"] if not row.get("diverged")}
        points_missing += len(want - set(steps))
        points_dup += len(steps) - len(set(steps))
    figures = {
        "runs_expected": len(trials),
        "runs_lost": len(lost),
        "runs_duplicated": duplicated,
        "runs_running": len(running),
        "metric_points_missing": points_missing,
        "metric_points_duplicated": points_dup,
    }
    record("study", experiment)
    for k, v in figures.items():
        record(k, v)
    return {"runs": by_trial, "parents": parents, "client": mlc, "figures": figures}


def optuna_figures(exp_dir: Path, name: str, state: dict, record) -> dict:
    ot = optuna_trials(exp_dir, name)
    by_id = defaultdict(list)
    for t in ot:
        by_id[t.user_attrs.get("ray_trial_id")].append(t)
    extra = len(ot) - len([k for k in by_id if k in state["trials"]])
    missing = len([k for k in state["trials"] if k not in by_id])
    record("optuna_extra", extra)
    record("optuna_missing", missing)
    return {"by_id": by_id, "extra": extra, "missing": missing, "trials": ot}


def check_base_and_best(world: dict, exp_dir: Path, tmp: Path) -> None:
    """The base file is untouched, and the best trial's checkpoint (what ``promote`` ships) rebuilt
    from it evaluates to the trial's recorded best metric."""
    import torch

    from search import select
    from search.launcher import read_spec
    from trainables import checkpoint, engine
    from trainables import params as P
    from trainables import trial as T

    assert sha256(world["base"]) == world["sha"], "the base weights file changed"
    best = select.choose_trial(exp_dir)
    spec = read_spec(exp_dir)
    cfg = spec.trial_config(out_dir=tmp, threads=1)
    params = P.resolve(best["params"])
    torch.set_num_threads(1)
    model = checkpoint.load_trained(cfg, params, spec.num_classes + 1, Path(best["checkpoint"]))
    _, val_index, _, val_loader = T._build_data(cfg, params)
    metrics = engine.evaluate(model, val_loader, val_index, device=torch.device("cpu"), task=cfg.task)
    assert metrics[METRIC] == pytest.approx(best["best_metric"], abs=1e-6), (metrics, best["best_metric"])
    assert torch.load(best["checkpoint"], weights_only=True)["epoch"] == best["best_epoch"]
