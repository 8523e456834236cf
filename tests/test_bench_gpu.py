"""``bench/gpu.py`` runs only when a GPU is lent, so its code paths are smoke-tested here on the
CPU (``--device cpu``, hidden): every part (AMP step times, in-process memory, the trial arms as
separate processes) runs to the end and writes its JSON; the CUDA counters are None off CUDA.
Slow: about a minute on 2 CPU cores. Measures nothing (no times are asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_gpu_bench_runs_every_part_on_cpu(tmp_path: Path):
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(ROOT / "bench/gpu.py"), "--device", "cpu", "--json", str(out)]
    cmd += ["--amp-rounds", "1", "--amp-steps", "1", "--epochs", "1", "--whole-trials", "1"]
    cmd += ["--frac-trials", "2", "--frac", "2", "--threads", "1", "--workers", "0", "--limit", "4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [r["arch"] for r in res["amp"]] == [
        "ssdlite320_mobilenet_v3_large",
        "fasterrcnn_mobilenet_v3_large_320_fpn",
    ]
    assert all(r["speedup"]["n"] >= 1 for r in res["amp"]), res["amp"]
    assert [m["when"] for m in res["memory"]] == ["before", "after trial 1", "after trial 2"]
    assert all(m["allocated"] is None for m in res["memory"])
    arms = {(a["arm"], a["repeat"]): a for a in res["trials"]}
    assert set(arms) == {("whole", 0), ("frac", 0)}
    assert all(a["errors"] == 0 for a in arms.values()), arms
    assert "RATIO trials/hour 2 per GPU / 1 per GPU" in proc.stdout
