"""Issue 13 §3 — the stopping rules alone, replayed on recorded learning curves.

``bench/search_efficiency.py`` runs real studies: each arm's sampler sees what its scheduler did,
so two arms differ in both their proposals and their stopping, and three seeds are few. This
script holds the proposals fixed and compares only the early-stopping rules: it feeds every
recorded study of a results file (each arm's trials, in the order they were created, with their
real per-epoch objective) through each scheduler of ``search.schedulers`` that decides from
reports alone (the real classes; Ray's HyperBand pauses trials through Ray's controller and is
left out), two trials at a time, one epoch per trial per step, and counts:

  best - R*   the best objective the replayed study reported, minus R* (random_full's best of that
              seed): what the rule cost in quality (0 = it never stopped the trial that won)
  total       trial-epochs trained
  reach       trial-epochs spent when the replay first reported R* - tolerance (None: never)

A stopped trial reports nothing more; a trial that was stopped in the recorded study ends there
in every replay (its later epochs are unknown): only studies whose trials all ran every epoch
(random_full, and the studies of ``none``) replay every rule fairly; the others are listed for
completeness. No Ray, no training: runs in seconds.

Two what-if rules, replay-only (not in the product), ask whether stopping harder would pay:
``curve_lr`` bounds a curve by its best recent gain per unit of learning rate times the cosine
schedule's learning rate still ahead (tighter than ``curve``'s constant gain per epoch), and
``curve_early`` judges curves (collapse and extrapolation) from the first rung on instead of half
the epochs. ``--with-reference`` puts the reference trial recorded in the same seed (the first arm
of the file that has one; it is never stopped, so its curve is whole) first into every study
that has none: random search's proposals as the default study would start them.

Run: python bench/stopping_replay.py [RESULTS.json ...] [--rules none,asha,stratified,curve]
     [--with-reference]
(default: the newest bench/results/search_efficiency-{det,seg}-*.json)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import _common as C  # noqa: I001  (puts the repo root on sys.path)

METRIC = "objective"


def rules(epochs: int, reference: dict | None) -> dict[str, Any]:
    """name -> a fresh scheduler, as ``search.schedulers`` builds them for the demo specs (grace
    period 1, reduction factor 2, warm-up 0.3 epochs: rungs at 2 and 4 for 8 epochs)."""
    from search.schedulers import rungs_for
    from search.stopping import NoStopping, RecordingASHA, StratifiedHalving

    rungs = rungs_for(epochs, 1, 2, 0.3)
    what_if = _what_if()

    def asha() -> Any:
        s = RecordingASHA(
            time_attr="epoch", max_t=epochs, grace_period=1, reduction_factor=2, reference=reference
        )
        s.set_search_properties(METRIC, "max")
        return s

    return {
        "none": NoStopping,
        "asha": asha,
        "stratified": lambda: StratifiedHalving(METRIC, "max", epochs, rungs, reference=reference),
        "curve": lambda: StratifiedHalving(
            METRIC, "max", epochs, rungs, reference=reference, extrapolate=True
        ),
        "curve_lr": lambda: what_if(METRIC, "max", epochs, rungs, reference=reference, extrapolate=True),
        "curve_early": lambda: StratifiedHalving(
            METRIC, "max", epochs, rungs, reference=reference, extrapolate=True, collapse_from=rungs[0]
        ),
    }


def _what_if() -> type:
    """``curve`` with the cosine schedule's learning rate in its bound (``curve_lr``, above)."""
    from search.stopping import StratifiedHalving

    class CurveLr(StratifiedHalving):
        def _bound(self, score: dict[int, float], epoch: int) -> float:
            def lr(e: int) -> float:  # the cosine schedule's lr in the middle of epoch e
                return 0.5 * (1 + math.cos(math.pi * (e - 0.5) / self.epochs))

            per_lr = [
                (score[e] - score[e - 1]) / lr(e) for e in (epoch - 1, epoch) if e - 1 in score and e in score
            ]
            ahead = sum(lr(e) for e in range(epoch + 1, self.epochs + 1))
            return score[epoch] + max([0.0, *per_lr]) * ahead

    return CurveLr


def replay(trials: list[dict], scheduler: Any, epochs: int, slots: int) -> list[float]:
    """The objective values reported, in report order, when ``scheduler`` decides."""
    from ray.tune.schedulers import TrialScheduler

    queue, running, reports = list(trials), {}, []
    while queue or running:
        while queue and len(running) < slots:
            t = queue.pop(0)
            t["obj"] = SimpleNamespace(trial_id=t["id"], config=t["params"])
            scheduler.on_trial_add(None, t["obj"])
            running[t["id"]] = (t, 1)
        for tid in list(running):
            t, epoch = running[tid]
            value = t["curve"].get(epoch)
            if value is None:
                del running[tid]
                continue
            reports.append(value)
            decision = scheduler.on_trial_result(None, t["obj"], {"epoch": epoch, METRIC: value})
            if decision == TrialScheduler.STOP or epoch >= epochs:
                del running[tid]
            else:
                running[tid] = (t, epoch + 1)
    return reports


def trained(curve: dict) -> dict[int, float]:
    """A recorded curve's trained epochs (epoch >= 1, as ints) with a value."""
    return {int(e): v for e, v in curve.items() if int(e) >= 1 and v is not None}


def _created(record: dict) -> Any:
    """Sort key of a study's trials in creation order: the reference trial first (it is enqueued
    first), then by start time (first report's timestamp minus its ``time_total_s``; whole seconds,
    ties in recorded order). study.json's own order put the reference second before 889c834."""
    start: dict[str, float] = {}
    for e in record.get("events") or []:
        tid = e["trial"].removeprefix("trial_")
        start[tid] = min(start.get(tid, float("inf")), e["t"][0] - e["t"][1])
    return lambda t: (not t["reference"], start.get(t["id"], float("inf")))


def studies(path: Path, with_reference: bool = False) -> list[dict]:
    data = json.loads(path.read_text())
    modes = {r["mode"] for raw in data["raw"] for r in raw.values()}
    if modes != {"max"}:
        raise SystemExit(f"{path}: the replay scores a maximised objective, but the records say {modes}")
    out = []
    for seed, raw in zip(data["seeds"], data["raw"], strict=True):  # raw: one {arm: result} per seed
        ref = None  # the seed's recorded reference trial, for --with-reference
        for r in raw.values():
            ref = ref or next(
                (
                    {"id": t, "params": c["params"], "curve": c["curve"]}
                    for t, c in r["curves"].items()
                    if c["reference"]
                ),
                None,
            )
        for arm, r in raw.items():
            trials = [
                {
                    "id": tid,
                    "params": c["params"] or {},
                    "reference": c["reference"],
                    "curve": trained(c["curve"]),
                }
                for tid, c in r["curves"].items()
            ]
            trials.sort(key=_created(r))
            if with_reference and ref and not any(t["reference"] for t in trials):
                curve = trained(ref["curve"])
                trials.insert(
                    0, {"id": f"ref-{ref['id']}", "params": ref["params"], "reference": True, "curve": curve}
                )
                arm += "+reference"
            full = all(len(t["curve"]) >= data["args"]["epochs"] for t in trials)
            out.append(
                {"seed": seed["seed"], "arm": arm, "target": seed["target"], "trials": trials, "full": full}
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="*", type=Path)
    ap.add_argument("--rules", default="none,asha,stratified,curve")
    ap.add_argument("--tolerance", type=float, default=0.005)
    ap.add_argument(
        "--with-reference", action="store_true", help="the seed's reference trial first in every study"
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    paths = args.results or [
        sorted((C.ROOT / "bench/results").glob(f"search_efficiency-{task}-*.json"))[-1]
        for task in ("det", "seg")
    ]
    names = [n for n in args.rules.split(",") if n]
    print(f"machine: {C.machine()}")
    rows = []
    for path in paths:
        data = json.loads(path.read_text())
        epochs, slots, task = data["args"]["epochs"], data["args"]["concurrent"], data["args"]["task"]
        print(f"\n{task}: {path.name}, {epochs} epochs, {slots} at a time")
        print(f"{'seed':>4} {'arm':14} {'all ran':7} " + " ".join(f"{n:>22}" for n in names))
        for st in studies(path, args.with_reference):
            ref = next((t["params"] for t in st["trials"] if t["reference"]), None)
            cells = []
            for name in names:
                sched = rules(epochs, ref)[name]()
                reports = replay([dict(t) for t in st["trials"]], sched, epochs, slots)
                best = max(reports)
                reach = next(
                    (i for i, v in enumerate(reports, 1) if v >= st["target"] - args.tolerance), None
                )
                row = {"task": task, "seed": st["seed"], "arm": st["arm"], "full": st["full"], "rule": name}
                rows.append(row | {"gap": best - st["target"], "total": len(reports), "reach": reach})
                cells.append(f"{best - st['target']:+.3f} {len(reports):3d} {str(reach):>5}")
            print(
                f"{st['seed']:>4} {st['arm']:14} {'yes' if st['full'] else 'no':7} "
                + " ".join(f"{c:>22}" for c in cells)
            )
    print("\nper task, over the studies whose trials all ran every epoch:")
    print("  lost = the study's best with no stopping minus its best under the rule (worst study)")
    for task in dict.fromkeys(r["task"] for r in rows):
        full = [r for r in rows if r["task"] == task and r["full"]]
        plain = {(r["seed"], r["arm"]): r["gap"] for r in full if r["rule"] == "none"}
        for name in names:
            mine = [r for r in full if r["rule"] == name]
            if not mine:
                continue
            lost = max(plain[(r["seed"], r["arm"])] - r["gap"] for r in mine) if plain else float("nan")
            reaches = [r["reach"] if r["reach"] is not None else float("inf") for r in mine]
            print(
                f"  {task} {name:11} lost {lost:.4f}, trial-epochs {sum(r['total'] for r in mine)}, "
                f"median reach {statistics.median(reaches)}, over {len(mine)} studies"
            )
    if args.json:
        args.json.write_text(
            json.dumps({"machine": C.machine(), "paths": [str(p) for p in paths], "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
