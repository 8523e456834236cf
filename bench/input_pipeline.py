"""Issue 8 §2 — input pipeline: images/s of the trainer's loop ÷ images/s of the bare model step.

A = ``trainables.engine.train_one_epoch`` over the real DataLoader (``data.CocoDetection`` over the
bundled BCCD split, PIL decode + transforms.v2, ``data.make_loader``), exactly as ``run_trial``
builds it; B = the same model, optimizer and scheduler stepped on batches pre-loaded into memory
(forward, ``losses.weighted_total``, zero_grad, backward, optimizer and scheduler step: no loader,
no per-step bookkeeping). Same model object, same batch size and image size; A and B alternate
(A B, B A, ...) after one warm-up round of each, and each round's ratio A/B is recorded.
C (side information): the loader alone (decode + transforms + collate, no model).

Run: python bench/input_pipeline.py [--rounds 20] [--images 16] [--workers 0] [--threads 1]
Prints the ratio last (target >= 0.90).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import _common as C  # noqa: I001  (puts the repo root on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="ssdlite320_mobilenet_v3_large")
    ap.add_argument("--weights", default=str(C.ROOT / "spaces/base/det-base.pt"))
    ap.add_argument("--data", default=str(C.ROOT / "spaces/data/bccd"))
    ap.add_argument("--image-size", type=int, default=320)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--images", type=int, default=16, help="training images per round (first N of the split)")
    ap.add_argument("--rounds", type=int, default=20, help="measured rounds (each: one A and one B)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers (the spec default is 0)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a trial gets its CPU count)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()

    import torch

    from trainables import coco, data, engine, families, freeze, losses, models, optim
    from trainables import params as P
    from trainables.config import DataSplit, TrialConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    root = Path(args.data)
    split = DataSplit(root / "images", root / "annotations/instances_train.json")
    cfg = TrialConfig(
        task="detection",
        arch=args.arch,
        train=split,
        val=split,
        out_dir=Path(tempfile.gettempdir()) / "bench-input-unused",
        weights=args.weights,
        image_size=args.image_size,
        batch_size=args.batch,
        workers=args.workers,
        threads=args.threads,
    )
    params = P.resolve({"lr": 0.002})  # defaults otherwise: sgd, momentum 0.9, hflip 0.5, trainable all
    index = coco.load_coco(split.annotations, split.images, task="detection")
    ds = data.CocoDetection(
        index, data.build_transforms("detection", True, args.image_size, params), limit=args.images
    )
    loader = data.make_loader(ds, args.batch, shuffle=True, workers=args.workers, seed=0)
    family = families.family_of(args.arch)
    model, _ = models.build_model(cfg, params, len(index.class_names) + 1)
    freeze.apply_trainable(model, family, "all")
    optimizer, _ = optim.build_optimizer(model, params, family)
    scheduler = optim.build_scheduler(optimizer, params, 4 * (args.rounds + 2), len(loader))
    device = torch.device("cpu")
    batches = list(loader)  # the pre-loaded tensors for B (same images, same transforms)
    n_img = sum(len(b[0]) for b in batches)

    def trainer() -> tuple[float, float]:
        t0 = time.perf_counter()
        stats = engine.train_one_epoch(model, loader, optimizer, scheduler, device=device, params=params)
        return n_img / (time.perf_counter() - t0), stats["images_per_s"]

    def bare() -> float:
        freeze.train_mode(model)
        t0 = time.perf_counter()
        for images, targets in batches:
            loss = losses.weighted_total(model(images, targets), params)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        return n_img / (time.perf_counter() - t0)

    def loader_only() -> float:
        t0 = time.perf_counter()
        for _ in loader:
            pass
        return n_img / (time.perf_counter() - t0)

    print(f"machine: {C.machine()}", flush=True)
    print(
        f"{args.arch}, {n_img} images/round at {args.image_size}px, batch {args.batch}, "
        f"workers {args.workers}, threads {args.threads}; warm-up round, then {args.rounds} rounds",
        flush=True,
    )
    trainer(), bare()  # warm-up (allocator, first-call paths, persistent workers)
    rows = []
    for r in range(args.rounds):
        if r % 2 == 0:
            (a, a_engine), b = trainer(), bare()
        else:
            b = bare()
            a, a_engine = trainer()
        c = loader_only()
        rows.append(
            {
                "round": r,
                "trainer_ips": a,
                "trainer_ips_engine": a_engine,
                "bare_ips": b,
                "loader_ips": c,
                "ratio": a / b,
                "ratio_engine": a_engine / b,
                "loader_share": b / c,
            }
        )
        print(
            f"round {r}: trainer {a:.2f} img/s (engine's own count {a_engine:.2f}), bare {b:.2f} img/s, "
            f"loader alone {c:.1f} img/s -> ratio {a / b:.3f}",
            flush=True,
        )
    ratio = C.spread([x["ratio"] for x in rows])
    ratio_engine = C.spread([x["ratio_engine"] for x in rows])
    share = C.spread([x["loader_share"] for x in rows])
    C.dump(
        args.json,
        {
            "command": C.command_line(),
            "machine": C.machine(),
            "rows": rows,
            "ratio": ratio,
            "ratio_engine": ratio_engine,
            "loader_share": share,
        },
    )
    print(f"machine at end: loadavg {C.machine()['loadavg']}")
    print(f"loader time / bare step time (side info): {C.fmt(share)}")
    print(f"RATIO trainer/bare images/s (timed around train_one_epoch): {C.fmt(ratio)}  target >= 0.90")
    print(f"RATIO trainer/bare images/s (train_one_epoch's own images_per_s): {C.fmt(ratio_engine)}")


if __name__ == "__main__":
    main()
