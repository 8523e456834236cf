"""Issue 8 §5 — GPU: fractional trials per GPU, AMP vs fp32 step time, GPU memory after each trial.

One prepared script for a GPU machine (about 5-8 minutes on one H200 with the defaults); it needs
only torch, torchvision, PIL, numpy and pycocotools (``trainables`` alone: no Ray, Optuna, MLflow
or pydantic, which the lent GPU machines lack) and the bundled data (``spaces/data/bccd``).

A. Trials/hour, 4 trials sharing one GPU vs 1 trial on it: the same trial list (ssdlite320 from
   the bundled base on BCCD, ``--epochs`` epochs, params cycling through a fixed list) run as
   separate processes (``python bench/gpu.py --one-trial``, each calling ``run_trial`` with
   device cuda and AMP auto), 4 at a time vs 1 at a time: what Ray does with
   ``resources.gpu=0.25`` vs ``1`` (it only schedules processes onto the GPU). Arms alternate
   (whole, fractional, fractional, whole with ``--repeats 2``). Ratio = trials/hour fractional /
   trials/hour whole.
B. AMP (bf16 autocast, as ``run_trial`` does on CUDA) vs fp32 training-step time, ssdlite320 and
   fasterrcnn_mobilenet_v3_large_320_fpn, batches pre-loaded on the GPU, channels_last, blocks of
   steps interleaved (fp32, amp, amp, fp32, ...) with synchronisation. Ratio = fp32 / amp.
C. GPU memory returned after each trial: ``nvidia-smi`` memory.used sampled every 0.5 s during A
   (baseline before, after each trial process exits, after each arm); and in-process, two
   ``run_trial`` calls one after the other with ``torch.cuda.memory_allocated``/``reserved``
   after each (after ``gc.collect`` and ``torch.cuda.empty_cache``, as the launcher's trial does).

Run on the GPU machine (pycocotools carried as a wheel, see BENCHMARKS.md):
    PYTHONUNBUFFERED=1 python3 bench/gpu.py [--quick] [--json $OUT/gpu.json]
Prints the ratios last.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _common as C  # noqa: I001  (puts the repo root on sys.path)

DATA = C.ROOT / "spaces/data/bccd"
BASE = C.ROOT / "spaces/base/det-base.pt"
PARAM_LIST = [
    {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9},
    {"optimizer": "adamw", "lr": 0.001},
    {"optimizer": "sgd", "lr": 0.003, "momentum": 0.85, "trainable": "heads"},
    {"optimizer": "adamw", "lr": 0.0003, "activation": "silu"},
]


def trial_config(
    out_dir: Path, epochs: int, threads: int, workers: int, limit: int | None = None, device: str = "cuda"
):
    from trainables.config import DataSplit, TrialConfig

    return TrialConfig(
        task="detection", arch="ssdlite320_mobilenet_v3_large",
        train=DataSplit(DATA / "images", DATA / "annotations/instances_train.json"),
        val=DataSplit(DATA / "images", DATA / "annotations/instances_val.json"),
        out_dir=out_dir, weights=str(BASE), image_size=320, epochs=epochs, batch_size=8, workers=workers,
        metric="map50", device=device, amp="auto", threads=threads, limit_train=limit, limit_val=limit,
    )  # fmt: skip


def one_trial(spec: str) -> None:
    """Child mode: one run_trial from a JSON spec; prints one JSON line."""
    import torch

    from trainables.trial import run_trial

    s = json.loads(spec)
    torch.set_num_threads(s["threads"])
    cfg = trial_config(Path(s["out"]), s["epochs"], s["threads"], s["workers"], s["limit"], s["device"])
    r = run_trial(cfg, s["params"])
    print(json.dumps({"status": r["status"], "best": r["best_metric"], "epochs": len(r["history"]) - 1}))


class MemSampler:
    """nvidia-smi memory.used (MiB) every ``period`` seconds in a thread."""

    def __init__(self, period: float = 0.5):
        self.period, self.samples, self._stop = period, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> float | None:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
            return float(out.split()[0])
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), self.read()))
            self._stop.wait(self.period)

    def __enter__(self) -> MemSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()


def trials_arm(n: int, conc: int, args: argparse.Namespace, work: Path) -> dict:
    """Run ``n`` trials, ``conc`` at a time, as child processes; trials/hour and memory."""
    base_mem = MemSampler.read()
    after = []
    t0 = time.time()
    with MemSampler() as mem:
        pending = list(range(n))
        running: dict = {}
        results = []
        while pending or running:
            while pending and len(running) < conc:
                i = pending.pop(0)
                spec = {
                    "out": str(work / f"c{conc}-{i}-{time.time_ns()}"),
                    "epochs": args.epochs,
                    "threads": args.threads,
                    "workers": args.workers,
                    "limit": args.limit,
                    "device": args.device,
                    "params": PARAM_LIST[i % len(PARAM_LIST)],
                }
                cmd = [sys.executable, str(Path(__file__).resolve()), "--one-trial", json.dumps(spec)]
                running[i] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(0.2)
            for i, p in list(running.items()):
                if p.poll() is None:
                    continue
                out, err = p.communicate()
                del running[i]
                line = out.strip().splitlines()[-1] if out.strip() else ""
                results.append(json.loads(line) if line.startswith("{") else {"error": err.strip()[-300:]})
                after.append(MemSampler.read())
        wall = time.time() - t0
    used = [m for _, m in mem.samples if m is not None]
    for r in results:
        if "error" in r:
            print(f"  trial error: {r['error'][-300:]}", flush=True)
            break
    return {
        "trials": n,
        "concurrent": conc,
        "wall_s": wall,
        "trials_per_hour": n * 3600 / wall,
        "results": results,
        "errors": sum(1 for r in results if "error" in r),
        "mem_baseline_mib": base_mem,
        "mem_peak_mib": max(used) if used else None,
        "mem_after_each_trial_mib": after,
        "mem_after_arm_mib": MemSampler.read(),
    }


def amp_bench(arch: str, batch: int, rounds: int, steps: int, device: str = "cuda") -> dict:
    import torch
    from torchvision.models import get_model

    from trainables import coco, data, freeze, losses
    from trainables import params as P

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    index = coco.load_coco(DATA / "annotations/instances_train.json", DATA / "images", task="detection")
    params = P.resolve({"lr": 0.001})
    ds = data.CocoDetection(index, data.build_transforms("detection", True, 320, params), limit=batch * 2)
    batches = []
    for images, targets in data.make_loader(ds, batch, shuffle=False, workers=0, seed=0):
        batches.append(
            (
                [im.to(dev) for im in images],
                [{k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets],
            )
        )
    model = get_model(arch, weights=None, weights_backbone=None, num_classes=len(index.class_names) + 1).to(
        dev
    )
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.001, momentum=0.9)
    amp_dtype = torch.bfloat16 if dev.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    def block(amp: bool) -> float:
        freeze.train_mode(model)
        sync()
        t0 = time.perf_counter()
        for i in range(steps):
            images, targets = batches[i % len(batches)]
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp):
                loss = losses.weighted_total(model(images, targets), params)
            opt.zero_grad(set_to_none=True)
            if amp and scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
        sync()
        return (time.perf_counter() - t0) / steps

    block(False), block(True)  # warm-up (cuDNN/kernels for both precisions)
    rows = []
    for r in range(rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        t = {amp: block(amp) for amp in order}
        rows.append({"fp32_s": t[False], "amp_s": t[True], "speedup": t[False] / t[True]})
    return {
        "arch": arch,
        "batch": batch,
        "amp_dtype": str(amp_dtype),
        "rows": rows,
        "speedup": C.spread([x["speedup"] for x in rows]),
    }


def _cuda_memory(device: str, when: str, peak: bool = False) -> dict:
    """CUDA's allocated/reserved bytes now (None off CUDA: the cpu smoke run)."""
    import torch

    on = device == "cuda"
    if on:
        torch.cuda.synchronize()
    out = {
        "when": when,
        "allocated": torch.cuda.memory_allocated() if on else None,
        "reserved": torch.cuda.memory_reserved() if on else None,
    }
    if peak:
        out["peak_allocated"] = torch.cuda.max_memory_allocated() if on else None
    return out


def memory_in_process(work: Path, device: str = "cuda") -> list[dict]:
    import torch

    from trainables.trial import run_trial

    out = [_cuda_memory(device, "before")]
    for i in range(2):
        cfg = trial_config(work / f"mem-{i}", epochs=1, threads=4, workers=0, limit=16, device=device)
        run_trial(cfg, PARAM_LIST[i])
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        out.append(_cuda_memory(device, f"after trial {i + 1}", peak=True))
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
    return out


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--whole-trials", type=int, default=4, help="trials in the 1-per-GPU arm")
    ap.add_argument("--frac-trials", type=int, default=8, help="trials in the 4-per-GPU arm")
    ap.add_argument("--frac", type=int, default=4, help="trials sharing the GPU")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per trial (its CPUs)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers per trial")
    ap.add_argument("--repeats", type=int, default=1, help="pairs of A arms, alternating order")
    ap.add_argument("--amp-rounds", type=int, default=6)
    ap.add_argument("--amp-steps", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="1 epoch, 2 + 4 trials, 4 AMP rounds")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: trials,amp,memory")
    ap.add_argument("--json", default=None)
    ap.add_argument("--limit", type=int, default=None, help="train/val images per trial in A (default all)")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: smoke test of the code paths
    ap.add_argument("--one-trial", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.whole_trials, args.frac_trials, args.amp_rounds = 1, 2, 4, 4
    return args


def _amp_part(args: argparse.Namespace) -> list[dict]:
    import torch

    out = []
    for arch, batch in (
        ("ssdlite320_mobilenet_v3_large", 16),
        ("fasterrcnn_mobilenet_v3_large_320_fpn", 8),
    ):
        r = amp_bench(arch, batch, args.amp_rounds, args.amp_steps, args.device)
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        out.append(r)
        print(f"B {arch} batch {batch}: fp32/amp step time {C.fmt(r['speedup'], 2)}", flush=True)
    return out


def _trials_part(args: argparse.Namespace, work: Path) -> list[dict]:
    arms = []
    for k in range(args.repeats):
        order = ("whole", "frac") if k % 2 == 0 else ("frac", "whole")
        for arm in order:
            n, conc = (args.whole_trials, 1) if arm == "whole" else (args.frac_trials, args.frac)
            r = trials_arm(n, conc, args, work)
            r["arm"], r["repeat"] = arm, k
            arms.append(r)
            print(
                f"A {arm} #{k}: {n} trials, {conc} at a time: wall {r['wall_s']:.0f}s -> "
                f"{r['trials_per_hour']:.0f} trials/h, errors {r['errors']}; GPU MiB baseline "
                f"{r['mem_baseline_mib']}, peak {r['mem_peak_mib']}, after each trial "
                f"{r['mem_after_each_trial_mib']}, after arm {r['mem_after_arm_mib']}",
                flush=True,
            )
    return arms


def _summarise(res: dict, frac: int) -> None:
    if "trials" in res:
        whole = [a for a in res["trials"] if a["arm"] == "whole"]
        fracs = [a for a in res["trials"] if a["arm"] == "frac"]
        pairs = [(f, w) for f in fracs for w in whole if f["repeat"] == w["repeat"]]
        ratios = [f["trials_per_hour"] / w["trials_per_hour"] for f, w in pairs]
        print(f"RATIO trials/hour {frac} per GPU / 1 per GPU: {C.fmt(C.spread(ratios), 2)}")
        left = [
            a["mem_after_arm_mib"] - a["mem_baseline_mib"]
            for a in res["trials"]
            if a["mem_after_arm_mib"] is not None and a["mem_baseline_mib"] is not None
        ]
        print(f"GPU memory left after each arm (MiB over baseline): {left}")
    for r in res.get("amp", []):
        print(f"RATIO {r['arch']} fp32/AMP({r['amp_dtype']}) step time: {C.fmt(r['speedup'], 2)}")
    if "memory" in res:
        m = res["memory"]
        print(
            "GPU memory allocated/reserved after each in-process trial (bytes): "
            + ", ".join(f"{x['when']}: {x['allocated']}/{x['reserved']}" for x in m)
        )


def main() -> None:
    args = _parse()
    if args.one_trial:
        one_trial(args.one_trial)
        return
    import shutil

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (nothing measured)", file=sys.stderr)
        raise SystemExit(2)
    skip = set(filter(None, args.skip.split(",")))
    info = C.machine()
    print(f"machine: {info}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    res: dict = {"command": C.command_line(), "machine": info}
    t_all = time.time()
    if "amp" not in skip:
        res["amp"] = _amp_part(args)
    if "memory" not in skip:
        res["memory"] = memory_in_process(work, args.device)
        for m in res["memory"]:
            print(f"C in-process {m}", flush=True)
    if "trials" not in skip:
        res["trials"] = _trials_part(args, work)
    res["total_s"] = time.time() - t_all
    C.dump(args.json, res)
    shutil.rmtree(work, ignore_errors=True)
    print(f"total {res['total_s']:.0f}s")
    _summarise(res, args.frac)


if __name__ == "__main__":
    main()
