"""``bench/search_efficiency.py --reuse-prefix``: a recorded random search of more trials counts as
its first N trials (creation order), its reports kept in their order, its best and totals
recomputed; other arms and records of N trials or fewer are read as recorded."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import search_efficiency as SE  # noqa: E402


def _record(arm: str, seed: int, finals: list[float]) -> dict:
    """Trials t0, t1, ... (creation order), two epochs each, reports interleaved as 2 at a time."""
    curves = {
        f"t{i}": {"params": {"lr": i}, "state": "COMPLETE", "curve": {1: v / 2, 2: v}}
        for i, v in enumerate(finals)
    }
    events = []
    for i, v in enumerate(finals):
        events += [
            {"trial": f"trial_t{i}", "epoch": e, "value": c, "t": [2 * i + e, 0.0]}
            for e, c in ((1, v / 2), (2, v))
        ]
    events.sort(key=lambda r: r["t"])
    best = max(finals)
    return {
        "arm": arm,
        "seed": seed,
        "mode": "max",
        "events": events,
        "trial_epochs": len(events),
        "best": best,
        "curves": curves,
    }


def test_first_trials_keeps_the_first_trials_reports_in_order():
    rec = _record("random_full", 0, [0.2, 0.5, 0.9])
    cut = SE.first_trials(rec, 2)
    assert list(cut["curves"]) == ["t0", "t1"]
    assert [r["trial"] for r in cut["events"]] == [
        r["trial"] for r in rec["events"] if r["trial"] != "trial_t2"
    ]
    assert (cut["trial_epochs"], cut["best"], cut["states"]) == (4, 0.5, {"COMPLETE": 2})
    assert SE.reach(cut["events"], 0.5, "max") == SE.reach(rec["events"], 0.5, "max")
    assert rec["best"] == 0.9 and len(rec["events"]) == 6  # the record itself is left as it was
    with pytest.raises(ValueError, match="holds 3 trials, fewer than the 4"):
        SE.first_trials(rec, 4)


@pytest.mark.parametrize("prefix", [False, True])
def test_reuse_prefix_cuts_only_a_larger_random_search(tmp_path, prefix):
    raw = [
        {
            "random_full": _record("random_full", 0, [0.2, 0.5, 0.9]),
            "curve": _record("curve", 0, [0.3, 0.4, 0.8]),
        }
    ]
    raw.append({"random_full": _record("random_full", 1, [0.6, 0.1])})
    (tmp_path / "r.json").write_text(json.dumps({"raw": raw}))
    got = SE.reused(SimpleNamespace(reuse=str(tmp_path / "r.json"), reuse_prefix=prefix, trials=2))
    assert got[(0, "random_full")]["best"] == (0.5 if prefix else 0.9)
    assert got[(0, "curve")]["best"] == 0.8  # a TPE arm's proposals depend on the budget: never cut
    assert got[(1, "random_full")]["trial_epochs"] == 4 and "derived" not in got[(1, "random_full")]
