"""Issue 8 §3 — search efficiency: ASHA + TPE vs random search without early stopping.

For each seed, two studies through ``python -m search launch`` on real data (default:
``../shared/data/bccd`` detection with the demo spec ``spaces/det.yaml``: ssdlite320 from the
bundled base, its search space, objective map50), the same number of trials, epochs, concurrency
and seed (``search.seed`` and ``train.seed``):

  asha_tpe     search.algorithm=tpe,    search.scheduler=asha (grace_period 1, reduction_factor 2)
  random_full  search.algorithm=random, search.scheduler=none (every trial runs every epoch)

Every trained epoch is one trial-epoch. Each trial's reports (``trial_*/result.json`` in the
experiment folder: epoch, objective, Ray's timestamp) are merged in time order; an arm "reaches"
a target at the cumulative trial-epoch count of its first report at or above it. Per seed:
random_full's best objective R*, the trial-epochs each arm needed to reach R*, and each arm's
best objective and total trial-epochs. Ratio = asha_tpe's trial-epochs to R* / random_full's
(target <= 1/3); an arm that never reaches R* is a miss (printed as inf with its best).

Sized for a shared 2-core CPU (one full run of 3 seeds fits in about 25 minutes): a subset of the
data (``--limit-train``/``--limit-val``: the first N images of each split), no base evaluation.
Segmentation: ``--spec spaces/seg.yaml --data ../shared/data/dsb2018_nuclei`` (same method).

Run: python bench/search_efficiency.py [--seeds 0,1,2] [--trials 8] [--epochs 4] [--limit-train 32]
     [--limit-val 24] [--set KEY=VALUE ...]
A variant of the asha_tpe arm against the same random_full studies: --work <the first run's folder>
--asha-tag -g2 --asha-set search.grace_period=2 (random_full is read from the folder, not rerun).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C  # noqa: I001  (puts the repo root on sys.path)

ARMS = {
    "asha_tpe": [
        "search.algorithm=tpe",
        "search.scheduler=asha",
        "search.grace_period=1",
        "search.reduction_factor=2",
    ],
    "random_full": ["search.algorithm=random", "search.scheduler=none"],
}


def events(exp_dir: Path, metric: str) -> list[dict]:
    """One row per trained epoch (epoch >= 1) of every trial, in report order."""
    rows = []
    for f in exp_dir.glob("trial_*/result.json"):
        for line in f.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if int(r.get("epoch", 0)) < 1:
                continue
            v = r.get(metric)
            ok = (
                isinstance(v, (int, float))
                and not isinstance(v, bool)
                and math.isfinite(v)
                and not r.get("diverged")
            )
            rows.append(
                {
                    "trial": f.parent.name,
                    "epoch": int(r["epoch"]),
                    "value": float(v) if ok else None,
                    "t": (r.get("timestamp", 0), r.get("time_total_s", 0.0)),
                }
            )
    rows.sort(key=lambda r: r["t"])
    return rows


def reach(rows: list[dict], target: float, mode: str) -> int | None:
    """Trial-epochs spent when the first report at/above ``target`` arrived (None: never)."""
    for i, r in enumerate(rows, 1):
        if r["value"] is not None and (
            r["value"] >= target - 1e-12 if mode == "max" else r["value"] <= target + 1e-12
        ):
            return i
    return None


def best(rows: list[dict], mode: str) -> float | None:
    vals = [r["value"] for r in rows if r["value"] is not None]
    return (max(vals) if mode == "max" else min(vals)) if vals else None


def run_arm(arm: str, seed: int, args: argparse.Namespace, work: Path) -> dict:
    data = Path(args.data).resolve()
    tag = args.asha_tag if arm == "asha_tpe" else ""
    name = f"bench-se-{arm}{tag}-s{seed}"
    sets = [
        f"data.train.images={data / 'images'}",
        f"data.train.annotations={data / 'annotations/instances_train.json'}",
        f"data.val.images={data / 'images'}",
        f"data.val.annotations={data / 'annotations/instances_val.json'}",
        f"search.num_trials={args.trials}",
        f"train.epochs={args.epochs}",
        f"search.max_concurrent={args.concurrent}",
        f"train.limit_train={args.limit_train}",
        f"train.limit_val={args.limit_val}",
        "train.eval_base=false",
        f"search.seed={seed}",
        f"train.seed={seed}",
        f"output_dir={work}",
        "resources.cpu=1",
        *([f"data.image_size={args.image_size}"] if args.image_size else []),
        *ARMS[arm],
        *args.set,
        *(args.asha_set if arm == "asha_tpe" else []),
    ]
    cmd = [sys.executable, "-m", "search", "launch", args.spec, "--name", name]
    for s in sets:
        cmd += ["--set", s]
    log = work / f"{name}.log"
    exp = work / name
    t0 = time.time()
    done = exp / "study.json"
    if done.is_file() and json.loads(done.read_text()).get("status") == "finished":
        rc = 0  # --work: this arm already ran there with these settings (see its log); read, not rerun
        print(f"  seed {seed} {arm}: reading the finished study in {exp}", flush=True)
    else:
        with open(log, "w") as f:
            rc = subprocess.call(
                cmd,
                cwd=C.ROOT,
                env=dict(os.environ, RAY_AUTH_MODE="disabled"),
                stdout=f,
                stderr=subprocess.STDOUT,
            )
    wall = time.time() - t0
    study = json.loads((exp / "study.json").read_text()) if (exp / "study.json").is_file() else {}
    metric, mode = study.get("metric", "map50"), study.get("mode", "max")
    rows = events(exp, metric)
    states: dict[str, int] = {}
    for t in study.get("trials", {}).values():
        states[t["state"]] = states.get(t["state"], 0) + 1
    print(
        f"  seed {seed} {arm}: rc {rc}, wall {wall:.0f}s, {len(rows)} trial-epochs, best {metric} "
        f"{best(rows, mode)}, trials {states}",
        flush=True,
    )
    if rc != 0:
        print("    " + "\n    ".join(log.read_text(errors="replace").splitlines()[-3:]), flush=True)
    return {
        "arm": arm,
        "seed": seed,
        "rc": rc,
        "wall_s": wall,
        "metric": metric,
        "mode": mode,
        "events": rows,
        "trial_epochs": len(rows),
        "best": best(rows, mode),
        "states": states,
        "log": str(log),
        "command": " ".join(cmd),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(C.ROOT / "spaces/det.yaml"))
    ap.add_argument("--data", default=str(C.ROOT.parent / "shared/data/bccd"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--concurrent", type=int, default=2)
    ap.add_argument("--limit-train", type=int, default=32)
    ap.add_argument("--limit-val", type=int, default=24)
    ap.add_argument("--image-size", type=int, default=None, help="default: the spec's")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra overrides, both arms"
    )
    ap.add_argument(
        "--asha-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="overrides for the asha_tpe arm only (e.g. search.grace_period=2)",
    )
    ap.add_argument("--asha-tag", default="", help="suffix of the asha_tpe arm's study names (variants)")
    ap.add_argument(
        "--work",
        default=None,
        help="work folder; an arm whose study already finished there is read, not rerun (same settings!)",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-se-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {C.machine()}", flush=True)
    print(
        f"{args.spec} on {args.data}: {args.trials} trials x {args.epochs} epochs, "
        f"{args.concurrent} at a time, "
        f"limit_train {args.limit_train}, limit_val {args.limit_val}; work folder {work}",
        flush=True,
    )
    per_seed = []
    t_start = time.time()
    for k, seed in enumerate(int(s) for s in args.seeds.split(",")):
        order = ("asha_tpe", "random_full") if k % 2 == 0 else ("random_full", "asha_tpe")
        res = {arm: run_arm(arm, seed, args, work) for arm in order}
        a, r = res["asha_tpe"], res["random_full"]
        mode = r["mode"]
        target = r["best"]
        row = {"seed": seed, "target": target, "asha": a, "random": r}
        if target is not None:
            row["asha_reach"], row["random_reach"] = (
                reach(a["events"], target, mode),
                reach(r["events"], target, mode),
            )
            row["ratio_reach"] = (row["asha_reach"] / row["random_reach"]) if row["asha_reach"] else math.inf
            row["ratio_total"] = a["trial_epochs"] / max(1, r["trial_epochs"])
            row["asha_reach_vs_full"] = (
                (row["asha_reach"] / r["trial_epochs"]) if row["asha_reach"] else math.inf
            )
        per_seed.append(row)
        print(
            f"  seed {seed}: random_full best {target} reached at trial-epoch {row.get('random_reach')} of "
            f"{r['trial_epochs']}; asha_tpe best {a['best']}, reaches it at {row.get('asha_reach')} of "
            f"{a['trial_epochs']}",
            flush=True,
        )
    C.dump(
        args.json,
        {
            "command": C.command_line(),
            "machine": C.machine(),
            "args": vars(args),
            "total_wall_s": time.time() - t_start,
            "seeds": per_seed,
        },
    )
    print(
        f"machine at end: loadavg {C.machine()['loadavg']}; total wall {time.time() - t_start:.0f}s; "
        f"logs in {work}"
    )
    print(
        f"{'seed':>4} {'R* (random best)':>16} {'asha best':>10} {'random reach':>12} {'asha reach':>10} "
        f"{'random total':>12} {'asha total':>10}"
    )
    for s in per_seed:
        print(
            f"{s['seed']:>4} {s['target'] or float('nan'):>16.4f} {s['asha']['best'] or float('nan'):>10.4f} "
            f"{str(s.get('random_reach')):>12} {str(s.get('asha_reach')):>10} "
            f"{s['random']['trial_epochs']:>12} "
            f"{s['asha']['trial_epochs']:>10}"
        )
    ok = [s for s in per_seed if "ratio_reach" in s]
    print(
        f"RATIO asha_tpe/random_full trial-epochs to reach random_full's best: "
        f"{C.fmt(C.spread([s['ratio_reach'] for s in ok]))}  target <= 0.333 (inf = never reached)"
    )
    print(
        f"RATIO asha_tpe trial-epochs to reach it / random_full's total trial-epochs: "
        f"{C.fmt(C.spread([s['asha_reach_vs_full'] for s in ok]))}"
    )
    print(f"RATIO total trial-epochs asha_tpe/random_full: {C.fmt(C.spread([s['ratio_total'] for s in ok]))}")
    print(
        "best objective asha_tpe - random_full: "
        f"{C.fmt(C.spread([(s['asha']['best'] or 0) - (s['target'] or 0) for s in ok]), 4)}"
    )


if __name__ == "__main__":
    main()
