"""The README's demo figures, from the exact commands the README shows beside them.

README "Demo base models": each demo's default trial, ``python -m search trial spaces/X.yaml`` (no
``--set``), run as shown from the repository root: the base model's epoch-0 score, the best
score and its epoch, and the wall time, parsed from what the command prints. With ``--launch``,
also ``python -m search launch spaces/X.yaml --json`` (the study; ``--set output_dir=<a temporary
folder>`` is added so an earlier study under ``runs/`` does not stop it): trial counts by state,
the base model's score and the best trial's. Prints the machine (CPU model, cores, torch) and the
date with the figures, then one README-ready line.

Run: python bench/demo_figures.py [--demos det,seg,inst] [--launch] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C  # noqa: I001  (puts the repo root on sys.path)

DEMOS = {"det": "spaces/det.yaml", "seg": "spaces/seg.yaml", "inst": "spaces/inst.yaml"}
BASE_LINE = re.compile(r"^base model (\S+) \(epoch 0\): (\S+)$", re.M)
BEST_LINE = re.compile(r"^best (\S+): (\S+) at epoch (\S+)$", re.M)
STATUS_LINE = re.compile(r"^status: (\S+)$", re.M)


def _num(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def run_trial(spec: str) -> dict[str, Any]:
    """``python -m search trial SPEC`` as the README shows it; figures parsed from its output."""
    cmd = [sys.executable, "-m", "search", "trial", spec]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=C.ROOT, capture_output=True, text=True)
    wall = time.monotonic() - t0
    out = proc.stdout
    base, best, status = BASE_LINE.search(out), BEST_LINE.search(out), STATUS_LINE.search(out)
    row = {
        "command": f"python -m search trial {spec}",
        "rc": proc.returncode,
        "status": status.group(1) if status else None,
        "metric": base.group(1) if base else None,
        "base": _num(base.group(2)) if base else None,
        "best": _num(best.group(2)) if best else None,
        "best_epoch": best.group(3) if best else None,
        "wall_s": round(wall, 1),
    }
    if proc.returncode != 0 or not (base and best):
        row["stderr_tail"] = proc.stderr[-1500:]
    return row


def run_launch(spec: str, tmp: Path) -> dict[str, Any]:
    """``python -m search launch SPEC --json`` into a temporary output_dir."""
    cmd = [sys.executable, "-m", "search", "launch", spec, "--json", "--set", f"output_dir={tmp}"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=C.ROOT, capture_output=True, text=True)
    wall = time.monotonic() - t0
    row: dict[str, Any] = {"command": f"python -m search launch {spec}", "rc": proc.returncode}
    try:
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        row["stderr_tail"] = proc.stderr[-1500:]
        return row
    best = summary.get("best") or {}
    row.update(
        metric=summary.get("metric"),
        base=summary.get("base_metric"),
        best=best.get("best_metric"),
        best_trial=best.get("id"),
        counts=summary.get("counts"),
        wall_s=round(wall, 1),
    )
    return row


def _g(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) else str(x)


def readme_line(rows: list[dict[str, Any]]) -> str:
    parts = []
    for r in rows:
        if r["command"].startswith("python -m search trial"):
            parts.append(
                f"`{r['command']}`: base {r['metric']} {_g(r['base'])} → {_g(r['best'])} "
                f"(epoch {r['best_epoch']}, {r['wall_s'] / 60:.1f} min)"
            )
        else:
            counts = ", ".join(f"{v} {k.lower()}" for k, v in sorted((r.get("counts") or {}).items()))
            parts.append(
                f"`{r['command']}`: base {_g(r.get('base'))} → best {_g(r.get('best'))} "
                f"({counts}; {r.get('wall_s', 0) / 60:.1f} min)"
            )
    return "; ".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demos", default=",".join(DEMOS), help=f"comma-separated, of {list(DEMOS)}")
    ap.add_argument("--launch", action="store_true", help="also run each demo's launch")
    ap.add_argument("--json", type=Path, help="keep the rows as JSON")
    args = ap.parse_args()
    names = [n.strip() for n in args.demos.split(",") if n.strip()]
    unknown = [n for n in names if n not in DEMOS]
    if unknown:
        ap.error(f"unknown demos {unknown}; known: {list(DEMOS)}")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    mach = C.machine()
    print(f"date: {started}; machine: {mach['cpu']}, {mach['cores']} cores, torch {mach.get('torch')}")
    rows = []
    for name in names:
        row = run_trial(DEMOS[name])
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.launch:
        for name in names:
            with tempfile.TemporaryDirectory(prefix=f"demo-{name}-") as tmp:
                row = run_launch(DEMOS[name], Path(tmp))
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(
        f"README: Measured with `python bench/demo_figures.py` on {started}, {mach['cores']} cores "
        f"({mach['cpu']}): {readme_line(rows)}."
    )
    if args.json:
        args.json.write_text(json.dumps({"date": started, "machine": mach, "rows": rows}, indent=2))
    ok = all(r["rc"] == 0 for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
