"""Issue 13 §3 — the best model found for the compute spent, read from recorded studies.

``bench/search_efficiency.py`` asks one question per study: after how many trial-epochs did an
arm first report random search's best (R*) minus a tolerance. That count turns on differences
smaller than the tolerance where the top configurations sit on a plateau. This script reads the
same records and asks the other way round, at fixed spends: after n trial-epochs (a fraction of
random_full's total), how far is each arm's best so far from R*, and from what random search
itself had found after the same n. No run: it reads ``--json`` files of ``search_efficiency.py``.

  best - R*          the arm's best report among its first n trial-epochs (report order, as
                     ``search_efficiency.py`` counts them) minus R*, random_full's final best:
                     median over seeds (worst seed); an arm that ended before n spent fewer
                     trial-epochs and keeps its final best
  vs random search   the same best minus random_full's best among ITS first n trial-epochs:
                     median over seeds, and in how many seeds the arm was ahead / level / behind
                     (``--against ARM``: that arm's best after n instead, e.g. random_other, a
                     random search that shares no proposal with the arms' random start-up)
  within tol         in how many seeds the arm's best so far was within ``--tolerance`` of R*

Records are grouped by task, trials and validation images (``--limit-val``); within a group a
seed's arm comes from the last file given that holds it (so a rerun of an arm replaces the
earlier record of it); only seeds with a random_full record count.

Run: python bench/anytime.py RESULTS.json [RESULTS.json ...] [--arms curve,random_other]
     [--against random_other] [--fractions 0.125,0.25,0.5,1] [--tolerance 0.005] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

import _common as C  # noqa: I001  (puts the repo root on sys.path)
from search_efficiency import best, gain

FRACTIONS = (0.125, 0.25, 1 / 3, 0.5, 1.0)
Group = tuple[str, int, int]  # task, trials, validation images (--limit-val)


def load(paths: list[Path]) -> dict[Group, dict[int, dict[str, dict]]]:
    """(task, trials, limit_val) -> seed -> arm -> record; a later file's record replaces an
    earlier one of the same group, seed and arm."""
    groups: dict[Group, dict[int, dict[str, dict]]] = {}
    for path in paths:
        data = json.loads(path.read_text())
        a = data["args"]
        key = (a["task"], int(a["trials"]), int(a["limit_val"]))
        for res in data["raw"]:
            for arm, rec in res.items():
                groups.setdefault(key, {}).setdefault(int(rec["seed"]), {})[arm] = rec
    return groups


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def cell(
    seeds: dict[int, dict[str, dict]], arm: str, fraction: float, tol: float, against: str = "random_full"
) -> dict[str, Any]:
    """One arm at one spend, over the seeds that hold it, random_full and ``against``."""
    gaps, versus, n_used = [], [], []
    for runs in seeds.values():
        full, rec, other = runs.get("random_full"), runs.get(arm), runs.get(against)
        if full is None or rec is None or other is None:
            continue
        mode = full["mode"]
        n = max(1, math.floor(fraction * full["trial_epochs"] + 1e-9))  # "within 1/3" of 64: 21
        mine = best(rec["events"][:n], mode)  # an arm that spent fewer keeps its final best
        gaps.append(gain(mine, full["best"], mode))
        versus.append(gain(mine, best(other["events"][:n], mode), mode))
        n_used.append(n)
    known = [g for g in gaps if g is not None]
    vs = [v for v in versus if v is not None]
    return {
        "seeds": len(gaps),
        "trial_epochs": n_used,
        "gap_median": _median(known),
        "gap_worst": min(known) if known else None,
        "within_tol": sum(g >= -tol - 1e-12 for g in known),
        "against": against,
        "vs_median": _median(vs),
        "ahead": sum(v > 1e-12 for v in vs),
        "level": sum(abs(v) <= 1e-12 for v in vs),
        "behind": sum(v < -1e-12 for v in vs),
    }


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:+.4f}"


def report(key: Group, arms: list[str], fractions: list[float], cells: dict, against: str) -> None:
    task, trials, val = key
    print(f"\n{task}, {trials} trials, limit_val {val}; 'vs': against {against} after the same trial-epochs")
    print(
        f"{'arm':<13} {'spend':>6} {'seeds':>5} {'best-R* med':>11} {'worst':>8} {'in tol':>6} "
        f"{'vs':>8} a/l/b"
    )
    for arm in arms:
        for f in fractions:
            c = cells[arm][f]
            if not c["seeds"]:
                continue
            print(
                f"{arm:<13} {f:>6.3f} {c['seeds']:>5} {_fmt(c['gap_median']):>11} {_fmt(c['gap_worst']):>8} "
                f"{c['within_tol']:>6} {_fmt(c['vs_median']):>8} "
                f"{c['ahead']}/{c['level']}/{c['behind']}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path, help="search_efficiency.py --json files")
    ap.add_argument("--arms", default=None, help="default: every arm recorded beside random_full")
    ap.add_argument(
        "--fractions",
        default=None,
        help="shares of random_full's trial-epochs (default: 1/8, 1/4, 1/3, 1/2, 1)",
    )
    ap.add_argument("--tolerance", type=float, default=0.005)
    ap.add_argument("--against", default="random_full", help="the arm 'vs' compares with at each spend")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    fractions = [float(f) for f in args.fractions.split(",") if f] if args.fractions else list(FRACTIONS)
    if bad := [f for f in fractions if not 0 < f <= 1]:
        ap.error(f"--fractions: 0 < f <= 1 must hold, but got {bad}")
    out = []
    for key, seeds in sorted(load(args.results).items()):
        recorded = sorted({arm for runs in seeds.values() for arm in runs} - {"random_full"})
        arms = ["random_full"] + [
            a for a in (args.arms.split(",") if args.arms else recorded) if a in recorded
        ]
        cells = {
            arm: {f: cell(seeds, arm, f, args.tolerance, args.against) for f in fractions} for arm in arms
        }
        report(key, arms, fractions, cells, args.against)
        out.append(
            {
                "task": key[0],
                "trials": key[1],
                "limit_val": key[2],
                "cells": [{"arm": a, "fraction": f} | cells[a][f] for a in arms for f in fractions],
            }
        )
    C.dump(
        args.json,
        {
            "command": C.command_line(),
            "args": vars(args) | {"results": [str(p) for p in args.results]},
            "groups": out,
        },
    )


if __name__ == "__main__":
    main()
