"""``bench/anytime.py``: the best so far after n trial-epochs, against R* and against random search
after the same n, from recorded studies (a later file's record replaces an earlier one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import anytime as A  # noqa: E402


def _record(arm: str, seed: int, values: list[float | None], mode: str = "max") -> dict:
    """One report per trial-epoch, in the order given."""
    events = [{"trial": f"trial_{i}", "epoch": 1, "value": v, "t": [i, 0.0]} for i, v in enumerate(values)]
    known = [v for v in values if v is not None]
    return {
        "arm": arm,
        "seed": seed,
        "mode": mode,
        "events": events,
        "trial_epochs": len(events),
        "best": (max(known) if mode == "max" else min(known)) if known else None,
    }


def _file(path: Path, task: str, trials: int, raw: list[dict]) -> Path:
    path.write_text(json.dumps({"args": {"task": task, "trials": trials, "limit_val": 32}, "raw": raw}))
    return path


def test_the_best_of_a_prefix_follows_the_mode_and_keeps_an_ended_arms_best():
    # anytime.py reads the best so far as search_efficiency's best() of the first n reports
    events = _record("x", 0, [None, 0.2, 0.1, 0.5])["events"]
    assert [A.best(events[:n], "max") for n in (1, 2, 3, 4)] == [None, 0.2, 0.2, 0.5]
    events = _record("x", 0, [0.9, 1.2, 0.4], "min")["events"]
    assert [A.best(events[:n], "min") for n in (1, 2, 3)] == [0.9, 0.9, 0.4]
    assert (A.best(events[:0], "min"), A.best(events[:2], "min"), A.best(events[:10], "min")) == (
        None,
        0.9,
        0.4,
    )
    assert A.gain(0.4, 0.9, "min") == pytest.approx(0.5) and A.gain(None, 0.9, "max") is None


def test_cell_compares_with_r_star_and_with_random_search_at_the_same_spend():
    # random search: 0.1 0.2 0.3 0.4 0.5 0.6 (R* 0.6); the arm reaches 0.59 at its 2nd trial-epoch
    # and ends after 4; another seed where it is behind random search at every spend
    seeds = {
        0: {
            "random_full": _record("random_full", 0, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]),
            "curve": _record("curve", 0, [0.3, 0.59, 0.2, 0.1]),
        },
        1: {
            "random_full": _record("random_full", 1, [0.5, 0.5, 0.5, 0.5, 0.5, 0.7]),
            "curve": _record("curve", 1, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]),
        },
        2: {"curve": _record("curve", 2, [0.9])},  # no random search: not counted
    }
    third = A.cell(seeds, "curve", 1 / 3, 0.005)  # 2 of 6 trial-epochs
    assert third["seeds"] == 2 and third["trial_epochs"] == [2, 2]
    assert third["gap_median"] == pytest.approx(((0.59 - 0.6) + (0.2 - 0.7)) / 2)
    assert third["gap_worst"] == pytest.approx(0.2 - 0.7)
    assert third["within_tol"] == 0  # 0.59 is 0.01 below R* 0.6
    assert (third["ahead"], third["level"], third["behind"]) == (1, 0, 1)  # 0.59 vs 0.2; 0.2 vs 0.5
    whole = A.cell(seeds, "curve", 1.0, 0.01)
    assert whole["gap_worst"] == pytest.approx(0.6 - 0.7) and whole["within_tol"] == 1
    assert whole["vs_median"] == pytest.approx(((0.59 - 0.6) + (0.6 - 0.7)) / 2)
    # against a second random search: only the seeds that hold it count; R* stays random_full's
    seeds[0]["random_other"] = _record("random_other", 0, [0.59, 0.1])
    other = A.cell(seeds, "curve", 1 / 3, 0.005, against="random_other")
    assert (other["seeds"], other["against"], other["level"]) == (1, "random_other", 1)
    assert other["gap_median"] == pytest.approx(0.59 - 0.6)


def test_a_later_file_replaces_the_same_arm_and_seed_only(tmp_path):
    first = _file(
        tmp_path / "a.json",
        "det",
        8,
        [
            {"random_full": _record("random_full", 0, [0.1, 0.5]), "curve": _record("curve", 0, [0.2, 0.3])},
        ],
    )
    rerun = _file(tmp_path / "b.json", "det", 8, [{"curve": _record("curve", 0, [0.6])}])
    other = _file(tmp_path / "c.json", "det", 16, [{"curve": _record("curve", 0, [0.7])}])
    groups = A.load([first, rerun, other])
    assert set(groups) == {("det", 8, 32), ("det", 16, 32)}
    assert groups[("det", 8, 32)][0]["curve"]["best"] == 0.6
    assert groups[("det", 8, 32)][0]["random_full"]["best"] == 0.5
    assert A.load([rerun, first])[("det", 8, 32)][0]["curve"]["best"] == 0.3


def test_the_script_writes_a_cell_per_arm_and_spend_and_refuses_a_bad_fraction(tmp_path):
    src = _file(
        tmp_path / "a.json",
        "seg",
        8,
        [
            {"random_full": _record("random_full", 0, [0.1, 0.5, 0.2]), "curve": _record("curve", 0, [0.5])},
        ],
    )
    out = tmp_path / "out.json"
    script = str(ROOT / "bench" / "anytime.py")
    run = subprocess.run(
        [sys.executable, script, str(src), "--fractions", "0.5,1", "--json", str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    (group,) = json.loads(out.read_text())["groups"]
    assert [(c["arm"], c["fraction"]) for c in group["cells"]] == [
        ("random_full", 0.5),
        ("random_full", 1.0),
        ("curve", 0.5),
        ("curve", 1.0),
    ]
    assert group["cells"][2]["gap_median"] == 0.0 and group["cells"][2]["ahead"] == 1
    bad = subprocess.run(
        [sys.executable, script, str(src), "--fractions", "0,1"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "0 < f <= 1 must hold, but got [0.0]" in bad.stderr
