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


def _parse() -> argparse.Namespace:
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
    return ap.parse_args()


class Pipeline:
    """One model, optimizer and scheduler as ``run_trial`` builds them, its real loader, and the
    same batches pre-loaded; the three timings share them."""

    def __init__(self, args: argparse.Namespace):
        import torch

        from trainables import coco, data, families, freeze, models, optim
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
        self.params = P.resolve({"lr": 0.002})  # defaults otherwise: sgd, momentum 0.9, hflip 0.5, all
        index = coco.load_coco(split.annotations, split.images, task="detection")
        ds = data.CocoDetection(
            index, data.build_transforms("detection", True, args.image_size, self.params), limit=args.images
        )
        self.loader = data.make_loader(ds, args.batch, shuffle=True, workers=args.workers, seed=0)
        family = families.family_of(args.arch)
        self.model, _ = models.build_model(cfg, self.params, len(index.class_names) + 1)
        freeze.apply_trainable(self.model, family, "all")
        self.optimizer, _ = optim.build_optimizer(self.model, self.params, family)
        self.scheduler = optim.build_scheduler(
            self.optimizer, self.params, 4 * (args.rounds + 2), len(self.loader)
        )
        self.device = torch.device("cpu")
        self.batches = list(self.loader)  # the pre-loaded tensors for B (same images, same transforms)
        self.n_img = sum(len(b[0]) for b in self.batches)

    def trainer(self) -> tuple[float, float]:
        """A: images/s timed around train_one_epoch, and its own count."""
        from trainables import engine

        t0 = time.perf_counter()
        stats = engine.train_one_epoch(
            self.model, self.loader, self.optimizer, self.scheduler, device=self.device, params=self.params
        )
        return self.n_img / (time.perf_counter() - t0), stats["images_per_s"]

    def bare(self) -> float:
        """B: images/s of the bare steps on the pre-loaded batches."""
        seconds = C.bare_steps(self.model, self.optimizer, self.scheduler, self.batches, self.params)
        return self.n_img / seconds

    def loader_only(self) -> float:
        """C: images/s of the loader alone."""
        t0 = time.perf_counter()
        for _ in self.loader:
            pass
        return self.n_img / (time.perf_counter() - t0)


def _round(pipe: Pipeline, r: int) -> dict:
    if r % 2 == 0:
        (a, a_engine), b = pipe.trainer(), pipe.bare()
    else:
        b = pipe.bare()
        a, a_engine = pipe.trainer()
    c = pipe.loader_only()
    print(
        f"round {r}: trainer {a:.2f} img/s (engine's own count {a_engine:.2f}), bare {b:.2f} img/s, "
        f"loader alone {c:.1f} img/s -> ratio {a / b:.3f}",
        flush=True,
    )
    return {
        "round": r,
        "trainer_ips": a,
        "trainer_ips_engine": a_engine,
        "bare_ips": b,
        "loader_ips": c,
        "ratio": a / b,
        "ratio_engine": a_engine / b,
        "loader_share": b / c,
    }


def main() -> None:
    args = _parse()
    pipe = Pipeline(args)
    print(f"machine: {C.machine()}", flush=True)
    print(
        f"{args.arch}, {pipe.n_img} images/round at {args.image_size}px, batch {args.batch}, "
        f"workers {args.workers}, threads {args.threads}; warm-up round, then {args.rounds} rounds",
        flush=True,
    )
    pipe.trainer(), pipe.bare()  # warm-up (allocator, first-call paths, persistent workers)
    rows = [_round(pipe, r) for r in range(args.rounds)]
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
