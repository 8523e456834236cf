"""Issue 13 §3 — sampler settings screened on a surrogate built from the recorded studies.

A real study costs 3-12 minutes here, and a three-seed comparison of samplers is mostly the path
noise §3 measured (one trial more or less moves a seg study by 0.1). This script screens sampler
settings over many seeds in seconds, on a surrogate: each proposed configuration gets the learning
curve of a recorded trial (every trial that ran all epochs in
``bench/results/search_efficiency*-TASK-*.json`` with the benchmark's own settings) that made the
same categorical choices and is among the ``--k`` nearest in the numeric parameters (each scaled
to [0, 1] over its range, in log where the space is log), drawn at random, the same draw for the
same configuration in the same seed: the spread among neighbours stands in for the run-to-run
noise of a real trial, and random search and TPE's random start-up share their first proposals'
curves as real studies of one seed do.

Each simulated study runs the real sampler (Optuna, as ``search.samplers`` builds it, or the
arm's variant) over the spec's real space (``SearchSpace.sample``) and, where the arm stops
trials, the real scheduler (``search.stopping``, rule ``curve``), two trials at a time, one epoch
per trial per step (as ``stopping_replay.py``), the recipe's reference trial enqueued first.
Optuna is told what the product's searcher tells it: COMPLETE with the best value for a trial that
ran every epoch or that a ``VALUE_RULES`` rule stopped, PRUNED with its intermediate values
otherwise. ``random_full`` (random search, no stopping, no reference, the same seed) gives R*;
with ``--independent`` random search with another sampler seed (``random_other``) gives it, so
that no arm shares proposals with the baseline (``random_full`` is then a second random search:
the noise floor). Per arm: the median over seeds of reach / (trials x epochs) of R* - tol, the
share of seeds with reach <= 1/3, in how many seeds the arm ended below R* - 0.01, and P(met|n):
the chance that n seeds drawn from these meet issue 13's reach and quality targets together.

The surrogate only knows curves someone recorded, near configurations someone tried: it ranks
settings for a real run to check (``search_efficiency.py``); it measures nothing by itself.

Run: python bench/sampler_screen.py [RESULTS.json ...] --task det [--trials 16] [--seeds 0-39]
     [--arms curve,...] [--independent] [--k 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import _common as C  # noqa: I001  (puts the repo root on sys.path)
import search_efficiency as SE
import stopping_replay as R

# the benchmark's settings (search_efficiency.py's defaults): the records whose trials are comparable
SETTINGS = {"epochs": 8, "limit_train": 96, "limit_val": 32, "image_size": None, "spec": None, "data": None}
SETTINGS |= {"set": [], "arm_set": []}


def _tpe(**kw: Any) -> Callable[[int, int], Any]:
    """A TPE factory: the product's (multivariate, grouped, constant liar) with ``kw`` changed."""

    def make(seed: int, startup: int) -> Any:
        import optuna

        base = {"multivariate": True, "group": True, "constant_liar": True}
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, **(base | kw))

    return make


def _product(algorithm: str) -> Callable[[int, int], Any]:
    def make(seed: int, startup: int) -> Any:
        from search.samplers import make_sampler

        return make_sampler(algorithm, seed, 0, startup)

    return make


def _random_other(seed: int, startup: int) -> Any:
    """Random search drawing other configurations than ``random_full`` in the same seed (the
    sampler seed of search_efficiency.py's arm ``random_other``)."""
    import optuna

    return optuna.samplers.RandomSampler(seed=seed + SE.OTHER_SEED)


def _gamma(share: float) -> Callable[[int], int]:
    return lambda n: min(math.ceil(share * n), 25)


# arm -> (sampler factory(seed, start-up), the reference trial first, early stopping, start-up)
# start-up None: the product's size for the number of trials (search.samplers.make_sampler).
ARMS: dict[str, tuple[Callable[[int, int], Any], bool, bool, int | None]] = {
    "random_full": (_product("random"), False, False, None),
    "random_other": (_random_other, False, False, None),  # the noise floor: random search again
    "curve": (_product("tpe"), True, True, None),
    "tpe_nostop": (_product("tpe"), True, False, None),
    "random_curve": (_product("random"), True, True, None),
    "tpe_startup3": (_product("tpe"), True, True, 3),
    "tpe_prior0.3": (_tpe(prior_weight=0.3), True, True, None),
    "tpe_gamma0.25": (_tpe(gamma=_gamma(0.25)), True, True, None),
    "tpe_ei100": (_tpe(n_ei_candidates=100), True, True, None),
    "tpe_univariate": (_tpe(multivariate=False, group=False), True, True, None),
    "gp": (_product("gp"), True, True, None),
    "cmaes": (_product("cmaes"), True, True, None),
}


def recorded(task: str, paths: list[Path]) -> list[dict]:
    """Every distinct recorded trial of ``task`` in the results files ``paths`` (default: every
    ``bench/results/search_efficiency*-TASK-*.json``) that ran all epochs with the benchmark's
    settings."""
    seen, out = set(), []
    for path in paths or sorted((C.ROOT / "bench/results").glob(f"search_efficiency*-{task}-*.json")):
        data = json.loads(path.read_text())
        if data["args"].get("task") != task or any(data["args"].get(k) != v for k, v in SETTINGS.items()):
            continue
        for raw in data["raw"]:
            for r in raw.values():
                for c in r["curves"].values():
                    curve = R.trained(c["curve"])
                    if len(curve) < SETTINGS["epochs"] or not c["params"]:
                        continue
                    key = json.dumps([c["params"], sorted(curve.items())], sort_keys=True)
                    if key not in seen:
                        seen.add(key)
                        out.append({"params": c["params"], "curve": curve})
    return out


class Surrogate:
    """A proposed configuration -> the curve of one of the ``k`` nearest recorded trials with the
    same categorical choices (module docstring)."""

    def __init__(self, trials: list[dict], space: Any, k: int):
        self.space, self.k = space, k
        self.groups: dict[tuple, list[dict]] = {}
        for t in trials:
            self.groups.setdefault(self._key(t["params"]), []).append(t)

    def _key(self, params: dict[str, Any]) -> tuple:
        return tuple((d.name, params.get(d.name)) for d in self.space.searched if d.kind == "categorical")

    def _scaled(self, dim: Any, x: float) -> float:
        if dim.log:
            return (math.log(x) - math.log(dim.low)) / (math.log(dim.high) - math.log(dim.low))
        return (x - dim.low) / (dim.high - dim.low)

    def _distance(self, a: dict[str, Any], b: dict[str, Any]) -> float:
        dims = [d for d in self.space.searched if d.kind != "categorical" and d.name in a and d.name in b]
        return math.sqrt(sum((self._scaled(d, a[d.name]) - self._scaled(d, b[d.name])) ** 2 for d in dims))

    def curve(self, params: dict[str, Any], seed: int) -> dict[int, float] | None:
        """The same configuration in the same seed gets the same curve (as a real trial with the
        same ``train.seed``: random search and TPE's random start-up share their first proposals)."""
        group = self.groups.get(self._key(params))
        if not group:
            return None
        near = sorted(group, key=lambda t: self._distance(params, t["params"]))[: self.k]
        return random.Random(json.dumps([seed, params], sort_keys=True)).choice(near)["curve"]


def simulate(arm: str, seed: int, world: SimpleNamespace) -> list[float] | None:
    """The objective values one simulated study reports, in report order (None: the surrogate
    had no recorded trial with the categorical choices of a proposal)."""
    import optuna
    from ray.tune.schedulers import TrialScheduler

    from search.samplers import startup_size
    from search.searcher import VALUE_RULES

    factory, with_reference, stops, startup = ARMS[arm]
    if startup is None:  # the product's size (the reference counts as one start-up trial)
        startup = startup_size(world.trials, 1 if with_reference else 0)
    study = optuna.create_study(direction="maximize", sampler=factory(seed, startup))
    if with_reference:
        study.enqueue_trial(world.reference, user_attrs={"reference": True})
    sched = R.rules(world.epochs, world.reference if with_reference else None)["curve" if stops else "none"]()
    running, reports, asked = {}, [], 0
    while asked < world.trials or running:
        while asked < world.trials and len(running) < world.slots:
            trial = study.ask()
            params = world.space.sample(trial)
            curve = world.surrogate.curve(params, seed)
            if curve is None:
                return None
            obj = SimpleNamespace(trial_id=str(trial.number), config=params)
            sched.on_trial_add(None, obj)
            running[trial.number] = [trial, curve, 1, obj]
            asked += 1
        for number in list(running):
            trial, curve, epoch, obj = running[number]
            value = curve[epoch]
            reports.append(value)
            trial.report(value, epoch)
            stop = sched.on_trial_result(None, obj, {"epoch": epoch, R.METRIC: value}) == TrialScheduler.STOP
            if not stop and epoch < world.epochs:
                running[number][2] = epoch + 1
                continue
            del running[number]
            rule = (sched.stop_record(obj.trial_id) or {}).get("rule") if stop else None
            if stop and rule not in VALUE_RULES:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(trial, max(curve[e] for e in range(1, epoch + 1)))
    return reports


def world_of(args: argparse.Namespace) -> SimpleNamespace:
    """The task's spec (as search_efficiency.py runs it), its reference trial and the surrogate."""
    from search.spec.load import load_spec

    spec = load_spec(
        C.ROOT / SE.TASKS[args.task]["spec"], [f"train.epochs={SETTINGS['epochs']}"], study=False
    )
    trials = recorded(args.task, args.results)
    return SimpleNamespace(
        space=spec.search_space,
        reference=spec.reference_params(),
        surrogate=Surrogate(trials, spec.search_space, args.k),
        recorded=len(trials),
        trials=args.trials,
        epochs=SETTINGS["epochs"],
        slots=args.concurrent,
    )


def reach(reports: list[float], target: float) -> int | None:
    return next((i for i, v in enumerate(reports, 1) if v >= target), None)


def screen(args: argparse.Namespace, world: SimpleNamespace, arms: list[str]) -> list[dict]:
    rows = []
    for seed in args.seeds:
        baseline = simulate("random_other" if args.independent else "random_full", seed, world)
        if baseline is None:
            continue
        r_star = max(baseline)
        for arm in arms:
            reports = simulate(arm, seed, world)
            if reports is None:
                continue
            rows.append(
                {
                    "seed": seed,
                    "arm": arm,
                    "gap": max(reports) - r_star,
                    "reach": reach(reports, r_star - args.tolerance),
                    "total": len(reports),
                }
            )
    return rows


def summary(rows: list[dict], arms: list[str], budget: int) -> list[dict]:
    out = []
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        if not mine:
            continue
        reaches = [r["reach"] / budget if r["reach"] is not None else math.inf for r in mine]
        out.append(
            {
                "arm": arm,
                "seeds": len(mine),
                "median_reach": statistics.median(reaches),
                "reach_le_third": sum(x <= 1 / 3 for x in reaches) / len(mine),
                "below_0.01": sum(r["gap"] < -0.01 for r in mine),
                "median_gap": statistics.median(r["gap"] for r in mine),
                "total": statistics.mean(r["total"] for r in mine) / budget,
                "p_met_3": p_met(reaches, [r["gap"] for r in mine], 3),
                "p_met_5": p_met(reaches, [r["gap"] for r in mine], 5),
            }
        )
    return out


def p_met(reaches: list[float], gaps: list[float], n: int, draws: int = 4000) -> float:
    """The chance that ``n`` seeds drawn from these meet issue 13's targets: median reach <= 1/3
    and no seed below R* - 0.01 (the reference check holds by construction)."""
    rng, met = random.Random(0), 0
    for _ in range(draws):
        pick = [rng.randrange(len(reaches)) for _ in range(n)]
        met += statistics.median(reaches[i] for i in pick) <= 1 / 3 and min(gaps[i] for i in pick) >= -0.01
    return met / draws


def _seeds(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="*", type=Path, help="results files of the surrogate (default: all)")
    ap.add_argument("--task", choices=("det", "seg"), default="det")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--concurrent", type=int, default=2)
    ap.add_argument("--seeds", type=_seeds, default=_seeds("0-39"))
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--k", type=int, default=3, help="draw each curve from this many nearest trials")
    ap.add_argument("--tolerance", type=float, default=0.005)
    ap.add_argument(
        "--independent",
        action="store_true",
        help="R* from random search with another sampler seed (random_other), not the arms' own",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    if unknown := [a for a in arms if a not in ARMS]:
        ap.error(f"--arms: {unknown} not among {sorted(ARMS)}")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")
    world = world_of(args)
    budget = args.trials * world.epochs
    print(f"machine: {C.machine()}")
    print(
        f"{args.task}: {world.recorded} recorded trials, {len(world.surrogate.groups)} categorical groups; "
        f"{args.trials} trials x {world.epochs} epochs, {args.concurrent} at a time, k={args.k}, "
        f"{len(args.seeds)} seeds"
    )
    rows = screen(args, world, arms)
    table = summary(rows, arms, budget)
    print(
        f"{'arm':16} {'seeds':>5} {'median reach':>12} {'reach<=1/3':>10} {'<R*-0.01':>8} "
        f"{'median gap':>10} {'epochs':>7} {'P(met|3)':>8} {'P(met|5)':>8}"
    )
    for s in table:
        print(
            f"{s['arm']:16} {s['seeds']:>5} {s['median_reach']:>12.2f} {s['reach_le_third']:>10.2f} "
            f"{s['below_0.01']:>8} {s['median_gap']:>+10.4f} {s['total']:>7.2f} {s['p_met_3']:>8.2f} "
            f"{s['p_met_5']:>8.2f}"
        )
    C.dump(
        str(args.json) if args.json else None,
        {
            "command": C.command_line(),
            "machine": C.machine(),
            "args": vars(args) | {"seeds": args.seeds},
            "summary": table,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
