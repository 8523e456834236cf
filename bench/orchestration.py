"""Issue 8 §1 — orchestration efficiency of ``python -m search launch`` vs a plain hand-written loop.

Workload (defaults): the bundled detection demo ``spaces/det.yaml``, 8 trials x 3 epochs, 2
concurrent trials of 1 CPU each, ``search.scheduler=none`` and ``search.algorithm=random`` so both
arms train exactly the same configurations for the same trial-epochs (a seeded random sampler
draws the same sequence whatever order trials finish in; TPE's constant liar does not).
``--set search.scheduler=asha --set search.algorithm=tpe`` measures the spec's own setting.

A = ``python -m search launch SPEC --set ...`` (Ray Tune + Optuna + MLflow), as a user runs it.
B = a plain loop in one process: the same spec, the same Optuna sampler (``search.searcher.make_sampler``,
same seed), ``study.ask``/``tell`` in memory, ``run_trial`` in a pool of 2 worker processes sharing
one base-model evaluation folder as the launcher's trials do; no Ray, no MLflow
(``python bench/orchestration.py --plain-loop SPEC --set ...``).

Both arms run as child processes with ``bench/_timing`` on ``PYTHONPATH``: its sitecustomize wraps
``trainables.engine.train_one_epoch`` and ``evaluate`` in every process that imports them and
logs each call's start and end (the project's code is not edited). Per arm:

  efficiency = sum(time inside train_one_epoch + evaluate over all trials) / (wall time x concurrency)

with the wall time from starting the child process to its exit (imports, ``ray.init``, validation,
shutdown included), and launch -> first loop entry / first training epoch (first step) in seconds.
Arms alternate A B, B A, ... (``--repeats``). Prints the ratios last (target: A's efficiency >=
0.90; launch -> first training step <= 15 s).

Run: python bench/orchestration.py [--repeats 1] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C  # noqa: I001  (puts the repo root on sys.path)

PY = sys.executable
DEFAULTS = [
    "search.algorithm=random",
    "search.num_trials=8",
    "train.epochs=3",
    "search.max_concurrent=2",
    "resources.cpu=1",
    "search.scheduler=none",
]


# ------------------------------------------------------------------ B: the plain loop (child mode)


def _run_one(cfg, values: dict) -> dict:
    import torch

    from trainables import params as P
    from trainables.trial import run_trial

    torch.set_num_threads(max(1, cfg.threads))
    result = run_trial(cfg, P.resolve(values))
    return {
        "status": result["status"],
        "best_metric": result["best_metric"],
        "epochs": len(result["history"]),
        "params": {k: values[k] for k in sorted(values)},
    }


def plain_loop(spec_path: str, overrides: list[str], out: str) -> None:
    """Optuna ask/tell + a process pool running run_trial: the hand-written baseline."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    import optuna

    from search.searcher import make_sampler
    from search.spec import load_spec

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_spec(spec_path, overrides)
    s = spec.search
    sampler = make_sampler(s.algorithm, s.seed, s.num_trials, s.n_startup_trials)
    study = optuna.create_study(
        direction="maximize" if spec.objective.mode == "max" else "minimize", sampler=sampler
    )
    threads = max(1, int(spec.resources.cpu))
    results = []
    with ProcessPoolExecutor(max_workers=s.max_concurrent, mp_context=mp.get_context("spawn")) as pool:
        running: dict = {}
        started = 0
        while started < s.num_trials or running:
            while started < s.num_trials and len(running) < s.max_concurrent:
                trial = study.ask()
                values = spec.search_space.sample(trial)
                cfg = spec.trial_config(out_dir=Path(out) / f"trial_{trial.number}", threads=threads)
                # the same shared base evaluation as the launcher's trials (trainables.base_eval)
                cfg = dataclasses.replace(cfg, base_eval_dir=Path(out) / "base_eval")
                running[pool.submit(_run_one, cfg, values)] = trial
                started += 1
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                trial = running.pop(fut)
                try:
                    r = fut.result()
                except Exception as exc:  # noqa: BLE001 - a failed trial is FAIL, the loop goes on
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    results.append({"number": trial.number, "error": str(exc)})
                    continue
                ok = r["status"] == "ok" and r["best_metric"] is not None
                study.tell(
                    trial,
                    r["best_metric"] if ok else None,
                    state=optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL,
                )
                results.append({"number": trial.number, **r})
    print(json.dumps({"trials": results}))


# ------------------------------------------------------------------ the driver


def timings(folder: Path) -> list[dict]:
    rows = []
    for f in folder.glob("*.jsonl"):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["start"])


def run_arm(arm: str, args: argparse.Namespace, work: Path, k: int) -> dict:
    tdir = work / f"{arm}-{k}-timing"
    tdir.mkdir(parents=True)
    out = work / f"{arm}-{k}-out"
    sets = DEFAULTS + [f"output_dir={out}"] + args.set
    env = dict(
        os.environ,
        BENCH_TIMING_DIR=str(tdir),
        RAY_AUTH_MODE="disabled",
        PYTHONPATH=os.pathsep.join(
            [str(C.ROOT / "bench/_timing"), str(C.ROOT), os.environ.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep),
    )
    if arm == "ray":
        cmd = [PY, "-m", "search", "launch", args.spec, "--name", f"bench-orch-{k}"]
    else:
        env["OMP_NUM_THREADS"] = "1"  # what Ray sets in its trial workers
        cmd = [PY, str(C.ROOT / "bench/orchestration.py"), "--plain-loop", args.spec, "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    log = work / f"{arm}-{k}.log"
    t0 = time.time()
    first_line = None  # the launcher prints its header after imports, validation and ray.init
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, cwd=C.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for line in proc.stdout:
            if first_line is None and line.startswith("launching study"):
                first_line = time.time() - t0
            f.write(f"[{time.time() - t0:7.1f}s] {line}")
        rc = proc.wait()
    t1 = time.time()
    rows = timings(tdir)
    conc = int(
        next((s.split("=", 1)[1] for s in reversed(sets) if s.startswith("search.max_concurrent=")), 2)
    )
    busy = sum(r["end"] - r["start"] for r in rows)
    train = [r for r in rows if r["fn"] == "train_one_epoch"]
    res = {
        "arm": arm,
        "repeat": k,
        "rc": rc,
        "wall_s": t1 - t0,
        "concurrency": conc,
        "busy_s": busy,
        "efficiency": busy / ((t1 - t0) * conc),
        "efficiency_window": busy / ((max(r["end"] for r in rows) - rows[0]["start"]) * conc)
        if rows
        else None,
        "train_epochs": len(train),
        "evals": len(rows) - len(train),
        "train_s": sum(r["end"] - r["start"] for r in train),
        "first_loop_s": rows[0]["start"] - t0 if rows else None,
        "first_train_s": train[0]["start"] - t0 if train else None,
        "driver_ready_s": first_line,
        "processes": len({r["pid"] for r in rows}),
        "log": str(log),
        "command": " ".join(cmd),
    }
    tail = log.read_text(errors="replace").splitlines()[-3:]
    print(
        f"  {arm} #{k}: rc {rc}, wall {res['wall_s']:.0f}s, loops {busy:.0f}s over "
        f"{res['train_epochs']} train epochs + {res['evals']} evals in {res['processes']} processes "
        f"-> efficiency {res['efficiency']:.3f}; "
        f"first loop {res['first_loop_s'] or float('nan'):.1f}s, first train epoch "
        f"{res['first_train_s'] or float('nan'):.1f}s",
        flush=True,
    )
    if rc != 0:
        print("    " + "\n    ".join(tail), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(C.ROOT / "spaces/det.yaml"))
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra spec overrides for both arms (after the defaults)",
    )
    ap.add_argument("--repeats", type=int, default=1, help="A/B pairs, alternating order")
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, experiment folders)")
    ap.add_argument("--plain-loop", metavar="SPEC", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_loop:
        plain_loop(args.plain_loop, args.set, args.out)
        return

    work = Path(tempfile.mkdtemp(prefix="bench-orch-"))
    print(f"machine: {C.machine()}", flush=True)
    print(f"spec {args.spec} with {' '.join(DEFAULTS + args.set)}; work folder {work}", flush=True)
    rows = []
    for k in range(args.repeats):
        for arm in ("ray", "plain") if k % 2 == 0 else ("plain", "ray"):
            rows.append(run_arm(arm, args, work, k))
    C.dump(
        args.json,
        {
            "command": C.command_line(),
            "machine": C.machine(),
            "defaults": DEFAULTS,
            "set": args.set,
            "rows": rows,
        },
    )
    if not args.keep:
        import shutil

        for p in work.glob("*-out"):
            shutil.rmtree(p, ignore_errors=True)
    ray = [r for r in rows if r["arm"] == "ray" and r["rc"] == 0]
    plain = [r for r in rows if r["arm"] == "plain" and r["rc"] == 0]
    pairs = [(a, b) for a in ray for b in plain if a["repeat"] == b["repeat"]]
    print(f"machine at end: loadavg {C.machine()['loadavg']}; logs in {work}")

    def secs(key: str, arm: list[dict]) -> str:
        return C.fmt(C.spread([r[key] for r in arm if r.get(key) is not None]), 1)

    print(
        f"launcher: launch -> header printed (imports, validation, ray.init) s: {secs('driver_ready_s', ray)}"
    )
    print(f"launcher: launch -> first loop entry (train or eval) s: {secs('first_loop_s', ray)}")
    print(
        f"launcher: launch -> first training epoch (first step) s: {secs('first_train_s', ray)}  target <= 15"
    )
    print(f"plain loop: launch -> first training epoch s: {secs('first_train_s', plain)}")
    print(
        "RATIO launcher efficiency sum(loop time)/(wall x concurrency): "
        f"{C.fmt(C.spread([r['efficiency'] for r in ray]))}  target >= 0.90"
    )
    print(f"RATIO plain-loop efficiency: {C.fmt(C.spread([r['efficiency'] for r in plain]))}")
    print(
        "RATIO launcher/plain efficiency: "
        f"{C.fmt(C.spread([a['efficiency'] / b['efficiency'] for a, b in pairs]))}"
    )
    print(
        "RATIO launcher/plain launch -> first training epoch: "
        f"{C.fmt(C.spread([a['first_train_s'] / b['first_train_s'] for a, b in pairs]), 2)}"
    )


if __name__ == "__main__":
    main()
