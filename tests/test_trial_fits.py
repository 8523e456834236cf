"""A trial no node can hold: refused (exit 2, nothing left) where this tool starts its own Ray,
before Ray starts; a warning on a joined cluster (an autoscaler may add the node)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from search import durable
from tests.test_launcher import _env, tiny_data, write_spec


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_data(tmp_path_factory)


def test_a_trial_no_node_can_hold_exits_2_at_once(data_dir, tmp_path):
    """``resources.gpu: 64`` (more than this machine has, with or without a GPU) where this tool
    starts its own Ray: exit 2 naming the keys, nothing left (``resources.gpu: 1`` on a CPU
    machine once waited for ever with 0 trials running)."""
    path = write_spec(data_dir, "gpu", {"lr": 0.01}, {"num_trials": 1})
    out = tmp_path / "runs"
    done = subprocess.run(
        [sys.executable, "-m", "search", "launch", str(path), "--set", "resources.gpu=64"]
        + ["--set", f"output_dir={out}"],
        capture_output=True,
        text=True,
        timeout=300,  # a did-not-hang guard
        env=_env(),
    )
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "resources.gpu" in last and "64 GPU" in last and "Fix:" in last, last
    assert not out.exists(), sorted(out.rglob("*"))  # not even the MLflow store its start made


@pytest.mark.parametrize(
    "cpu, gpu, nodes, fits",
    [
        (1, 0, [{"Alive": True, "Resources": {"CPU": 2.0}}], True),
        (1, 1, [{"Alive": True, "Resources": {"CPU": 2.0}}], False),
        (4, 0, [{"Alive": True, "Resources": {"CPU": 2.0}}], False),
        (1, 1, [{"Alive": False, "Resources": {"CPU": 8.0, "GPU": 1.0}}], False),  # a dead node
        (1, 0.5, [{"Alive": True, "Resources": {"CPU": 1.0, "GPU": 1.0}}], True),
    ],
)
def test_trial_fits_table(cpu, gpu, nodes, fits):
    from search.cluster import ClusterError, check_trial_fits

    assert (check_trial_fits(cpu, gpu, False, nodes) is None) is fits  # joined: a warning at most
    if fits:
        assert check_trial_fits(cpu, gpu, True, nodes) is None
    else:
        with pytest.raises(ClusterError, match="resources.gpu / resources.cpu"):
            check_trial_fits(cpu, gpu, True, nodes)


@pytest.mark.parametrize("dry", [[], ["--dry-run"]], ids=["launch", "dry-run"])
def test_a_trial_this_machine_cannot_hold_is_refused_before_ray_starts(data_dir, tmp_path, dry):
    """resources.cpu above this machine's: exit 2 came after ray.init, which had made a Ray
    session, the signing key, and the study's experiment in the store another study shares (and
    the dry run printed its plan, exit 0)."""
    import hashlib

    from search import mlflow_store

    path = write_spec(data_dir, "toolarge", {"lr": 0.01}, {"algorithm": "random", "num_trials": 1}, epochs=1)
    shared = mlflow_store.client(mlflow_store.default_uri(data_dir / "runs"))  # another study's store
    shared.search_experiments(max_results=1)
    db = data_dir / "runs" / mlflow_store.DB_FILE
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    import shutil
    import tempfile

    ray_tmp, key = Path(tempfile.mkdtemp(prefix="r", dir="/tmp")), tmp_path / "key" / "state.key"  # short
    env = _env(RAY_TMPDIR=str(ray_tmp), **{durable.KEY_ENV: str(key)})
    proc = subprocess.run(
        [sys.executable, "-m", "search", "launch", str(path), *dry, "--set", "resources.cpu=1000"],
        cwd=data_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "a trial asks for 1000 CPU" in lines[0], proc.stderr[-2000:]
    made = list(ray_tmp.iterdir())
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not made and not key.exists() and not (data_dir / "runs" / "toolarge").exists(), made
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
