"""Issue 8 §4 — frozen subsets: training-step time heads-only vs all-trainable, and checkpoint bytes.

For each architecture: a random-init model of the BCCD class count is saved to a temporary file
and used as the base weights (``cfg.weights``), so trainable-only checkpoints apply. Two models
are built from it with ``trainables.models.build_model``; ``trainables.freeze.apply_trainable``
makes one ``heads`` (the family preset) and the other ``all``. Both step on the same pre-loaded
BCCD batches (forward, ``losses.weighted_total``, backward, SGD step, in ``freeze.train_mode``),
alternating blocks (A B, B A, ...) after a warm-up step each; each round's ratio is
step_time(all) / step_time(heads). Backward through frozen parts is checked to be skipped: the
backbone's output does not require grad and every frozen parameter's ``.grad`` stays None.

Checkpoint bytes: ``trainables.checkpoint.save`` as ``run_trial`` calls it (optimizer, scheduler
and RNG state included): heads-only trainable-only file ÷ all-trainable full-state file (what a
trial stores with vs without the frozen subset), plus heads-only trainable-only ÷ heads-only
``keep_full_checkpoint`` (the trainable-only format alone). The heads-only file is reloaded with
``checkpoint.load_trained`` and compared tensor by tensor with the trained model.

Run: python bench/frozen.py [--rounds 6] [--archs A,B]
Prints the ratios last (targets: step speed-up >= 1.5x, checkpoint bytes <= 0.25x).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import _common as C  # noqa: I001  (puts the repo root on sys.path)

ARCHS = "ssdlite320_mobilenet_v3_large,fasterrcnn_mobilenet_v3_large_320_fpn"
# steps per block: Faster R-CNN steps are ~7x slower, so fewer per block
STEPS = {"ssdlite320_mobilenet_v3_large": 4, "fasterrcnn_mobilenet_v3_large_320_fpn": 1}


def _setup(arch: str, args: argparse.Namespace, tmp: Path) -> dict:
    """A randomly initialised base file, the trial config, params and a few pre-loaded batches."""
    import torch
    from torchvision.models import get_model

    from trainables import coco, data, families
    from trainables import params as P
    from trainables.config import DataSplit, TrialConfig

    root = Path(args.data)
    split = DataSplit(root / "images", root / "annotations/instances_train.json")
    index = coco.load_coco(split.annotations, split.images, task="detection")
    num_classes = len(index.class_names) + 1
    torch.manual_seed(0)
    base = tmp / f"{arch}-random.pt"
    torch.save(
        get_model(arch, weights=None, weights_backbone=None, num_classes=num_classes).state_dict(), base
    )
    cfg = TrialConfig(
        task="detection",
        arch=arch,
        train=split,
        val=split,
        out_dir=tmp,
        weights=str(base),
        image_size=args.image_size,
        batch_size=args.batch,
        threads=args.threads,
    )
    params = P.resolve({"lr": 0.002})
    ds = data.CocoDetection(
        index, data.build_transforms("detection", True, args.image_size, params), limit=args.batch * 4
    )
    batches = list(data.make_loader(ds, args.batch, shuffle=False, workers=0, seed=0))
    family = families.family_of(arch)
    return {
        "cfg": cfg,
        "params": params,
        "family": family,
        "batches": batches,
        "base": base,
        "nc": num_classes,
    }


def _build_runs(s: dict) -> dict:
    """One model, optimizer and scheduler per preset (heads, all), with a hook that records
    whether the backbone's output needs a gradient."""
    from trainables import freeze, models, optim

    runs = {}
    for preset in ("heads", "all"):
        model, _ = models.build_model(s["cfg"], s["params"], s["nc"])
        rep = freeze.apply_trainable(model, s["family"], preset)
        opt, _ = optim.build_optimizer(model, s["params"], s["family"])
        sched = optim.build_scheduler(opt, s["params"], 100, len(s["batches"]))
        seen = {}
        model.backbone.register_forward_hook(
            lambda _m, _i, out, seen=seen: seen.__setitem__(
                "backbone_out_requires_grad",
                any(t.requires_grad for t in (out.values() if isinstance(out, dict) else [out])),
            )
        )
        runs[preset] = {"model": model, "opt": opt, "sched": sched, "report": rep, "seen": seen, "i": 0}
    return runs


def _step(s: dict, run: dict, n: int) -> float:
    """Mean seconds of n training steps of one run (its next n batches, cycling)."""
    batches = [s["batches"][(run["i"] + k) % len(s["batches"])] for k in range(n)]
    run["i"] += n
    return C.bare_steps(run["model"], run["opt"], run["sched"], batches, s["params"]) / n


def _time_rounds(arch: str, s: dict, runs: dict, n: int, rounds: int) -> list[dict]:
    rows = []
    for r in range(rounds):
        order = ("heads", "all") if r % 2 == 0 else ("all", "heads")
        t = {name: _step(s, runs[name], n) for name in order}
        rows.append({"round": r, "heads_s": t["heads"], "all_s": t["all"], "speedup": t["all"] / t["heads"]})
        print(
            f"  {arch} round {r}: step heads {t['heads']:.3f}s, all {t['all']:.3f}s -> "
            f"{t['all'] / t['heads']:.2f}x",
            flush=True,
        )
    return rows


def _checkpoint_sizes(arch: str, s: dict, runs: dict, tmp: Path) -> dict:
    from trainables import checkpoint, files

    base_sha = files.sha256_file(s["base"])
    sizes = {}
    for label, preset, trainable_only in (
        ("heads_trainable_only", "heads", True),
        ("heads_full", "heads", False),
        ("all_full", "all", False),
    ):
        run = runs[preset]
        path = tmp / f"{arch}-{label}.pt"
        checkpoint.save(
            path,
            model=run["model"],
            optimizer=run["opt"],
            scheduler=run["sched"],
            epoch=1,
            metrics={"map50": 0.0},
            params=s["params"],
            base_sha256=base_sha,
            trainable_only=trainable_only,
            extra={"history": []},
        )
        sizes[label] = os.path.getsize(path)
    return sizes


def _state_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _preset_bytes(s: dict, probe, full_bytes: int) -> dict:
    """Side info: the share of model tensors a trainable-only checkpoint keeps, per preset."""
    from trainables import checkpoint, freeze

    out = {}
    for preset in s["family"].presets:
        try:
            freeze.apply_trainable(probe, s["family"], preset, 1)
        except ValueError:
            continue
        out[preset] = _state_bytes(checkpoint.trainable_state(probe)) / full_bytes
    freeze.apply_trainable(probe, s["family"], "all")
    return out


def bench_arch(arch: str, args: argparse.Namespace, tmp: Path) -> dict:
    import torch

    from trainables import checkpoint

    s = _setup(arch, args, tmp)
    runs = _build_runs(s)
    n = args.steps or STEPS.get(arch, 2)
    _step(s, runs["heads"], 1), _step(s, runs["all"], 1)  # warm-up
    heads = runs["heads"]
    frozen_grads = [
        nm for nm, p in heads["model"].named_parameters() if not p.requires_grad and p.grad is not None
    ]
    skipped = (not heads["seen"]["backbone_out_requires_grad"]) and not frozen_grads
    rows = _time_rounds(arch, s, runs, n, args.rounds)
    sizes = _checkpoint_sizes(arch, s, runs, tmp)
    model_bytes = {
        "heads_trainable_state": _state_bytes(checkpoint.trainable_state(heads["model"])),
        "full_state_dict": _state_bytes(heads["model"].state_dict()),
    }
    reloaded = checkpoint.load_trained(
        s["cfg"], s["params"], s["nc"], tmp / f"{arch}-heads_trainable_only.pt"
    )
    trained = heads["model"].state_dict()
    same = all(torch.equal(v, trained[k]) for k, v in reloaded.state_dict().items())
    preset_bytes = _preset_bytes(s, runs["all"]["model"], model_bytes["full_state_dict"])
    rep_h, rep_a = heads["report"], runs["all"]["report"]
    return {
        "arch": arch,
        "steps_per_block": n,
        "rows": rows,
        "speedup": C.spread([x["speedup"] for x in rows]),
        "trainable_params": {
            "heads": rep_h.trainable,
            "all": rep_a.trainable,
            "total": rep_h.trainable + rep_h.frozen,
        },
        "backward_skipped": skipped,
        "frozen_with_grad": frozen_grads[:5],
        "ckpt_bytes": sizes,
        "ckpt_ratio_vs_all_full": sizes["heads_trainable_only"] / sizes["all_full"],
        "ckpt_ratio_vs_heads_full": sizes["heads_trainable_only"] / sizes["heads_full"],
        "model_bytes": model_bytes,
        "model_bytes_ratio": model_bytes["heads_trainable_state"] / model_bytes["full_state_dict"],
        "reload_equal": same,
        "preset_model_bytes_ratio": preset_bytes,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=ARCHS)
    ap.add_argument("--data", default=str(C.ROOT / "spaces/data/bccd"))
    ap.add_argument("--image-size", type=int, default=320)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=None, help="steps per block (default per architecture)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    print(f"machine: {C.machine()}", flush=True)
    print(
        f"batch {args.batch} at {args.image_size}px (BCCD train), threads {args.threads}, "
        f"{args.rounds} rounds",
        flush=True,
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-frozen-") as tmp:
        for arch in args.archs.split(","):
            results.append(bench_arch(arch, args, Path(tmp)))
    C.dump(args.json, {"command": C.command_line(), "machine": C.machine(), "results": results})
    print(f"machine at end: loadavg {C.machine()['loadavg']}")
    for r in results:
        tp, b = r["trainable_params"], r["ckpt_bytes"]
        print(
            f"{r['arch']}: trainable params heads {tp['heads']:,} / all {tp['all']:,}; "
            f"backward through frozen "
            f"parts skipped: {r['backward_skipped']}; trainable-only checkpoint reloads exactly: "
            f"{r['reload_equal']}"
        )
        print(
            f"  checkpoint bytes: heads trainable-only {b['heads_trainable_only']:,}, heads full "
            f"{b['heads_full']:,}, all full {b['all_full']:,}; model tensors only "
            f"{r['model_bytes_ratio']:.3f}x"
        )
        print(
            "  model tensors kept per preset (trainable-only / full state_dict): "
            + ", ".join(f"{k} {v:.3f}" for k, v in r["preset_model_bytes_ratio"].items())
        )
    for r in results:
        print(f"RATIO {r['arch']} step time all/heads: {C.fmt(r['speedup'], 2)}  target >= 1.5")
        print(
            f"RATIO {r['arch']} checkpoint bytes heads-only/all-trainable full: "
            f"{r['ckpt_ratio_vs_all_full']:.3f} (vs heads full state: {r['ckpt_ratio_vs_heads_full']:.3f})  "
            f"target <= 0.25"
        )


if __name__ == "__main__":
    main()
