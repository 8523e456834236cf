"""A tiny COCO dataset written with PIL, for fast CPU tests (no conftest: import it explicitly).

Images are ``size`` px squares with coloured rectangles (category 3 "red" = red rectangles,
category 7 "blue" = blue ones: non-contiguous ids on purpose). The last image has no objects.
Every annotation has a polygon ``segmentation`` (the rectangle) besides its ``bbox``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

CATEGORIES = [{"id": 3, "name": "red"}, {"id": 7, "name": "blue"}]
COLOURS = {3: (220, 30, 30), 7: (30, 30, 220)}


def make_tiny_coco(
    tmp_path: Path, n_images: int = 6, size: int = 100, masks: bool = False, seed: int = 0
) -> tuple[Path, Path]:
    """Write ``tmp_path/images/*.png`` and ``tmp_path/annotations.json``; return both paths.

    ``masks`` also writes one ``iscrowd=0`` polygon per object (always written; kept for API
    symmetry: polygons are the rectangles themselves).
    """
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    images_dir = Path(tmp_path) / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n_images):
        img = Image.new("RGB", (size, size), (rng.randint(90, 160),) * 3)
        draw = ImageDraw.Draw(img)
        n_obj = 0 if i == n_images - 1 else 1 + i % 2
        for _ in range(n_obj):
            cat = rng.choice(CATEGORIES)["id"]
            w, h = rng.randint(size // 5, size // 2), rng.randint(size // 5, size // 2)
            x, y = rng.randint(0, size - w - 1), rng.randint(0, size - h - 1)
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=COLOURS[cat])
            ann = {
                "id": len(anns) + 1,
                "image_id": i + 1,
                "category_id": cat,
                "bbox": [x, y, w, h],
                "area": float(w * h),
                "iscrowd": 0,
                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
            }
            anns.append(ann)
        name = f"img_{i:03d}.png"
        img.save(images_dir / name)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
    ann_path = Path(tmp_path) / "annotations.json"
    ann_path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    return images_dir, ann_path


def tiny_split(root: Path, n_images: int = 6, size: int = 100):
    """``make_tiny_coco`` under ``root`` as a ``DataSplit`` (train and val may share it)."""
    from trainables.config import DataSplit

    images, ann = make_tiny_coco(root, n_images=n_images, size=size)
    return DataSplit(images=images, annotations=ann)


def trial_config(split, out: Path, **changes):
    """A CPU ``TrialConfig`` of ssdlite320 on ``split`` at 128 px, 2 epochs of batch 2, metric map."""
    from trainables.config import TrialConfig

    base = dict(
        task="detection",
        arch="ssdlite320_mobilenet_v3_large",
        train=split,
        val=split,
        out_dir=out,
        image_size=128,
        epochs=2,
        batch_size=2,
        workers=0,
        seed=0,
        metric="map",
        mode="max",
        device="cpu",
        threads=1,
    )
    return TrialConfig(**(base | changes))


def without_timing(history: list[dict]) -> list[dict]:
    """A trial's history without its wall-clock keys (what two equal runs share)."""
    from trainables.trial import TIMING_KEYS

    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in history]


def write_tiny_spec(
    folder: Path,
    name: str,
    *,
    space: dict,
    search: dict,
    epochs: int,
    weights: str = "none",
    metric: str = "map50",
    **extra: Any,
) -> Path:
    """Write ``folder/<name>.yaml``: ssdlite320 detection on the tiny set in ``folder/data`` (train =
    val, 96 px, batch 2, seed 0, CPU, 1 CPU per trial, outputs in ``folder/runs``); ``search`` and
    ``extra`` (top-level keys) are given as they are."""
    import yaml

    raw = {
        "name": name,
        "task": "detection",
        "model": {"arch": "ssdlite320_mobilenet_v3_large", "weights": weights},
        "data": {
            "train": {"images": "data/images", "annotations": "data/annotations.json"},
            "val": {"images": "data/images", "annotations": "data/annotations.json"},
            "image_size": 96,
        },
        "train": {"epochs": epochs, "batch_size": 2, "seed": 0, "device": "cpu"},
        "objective": {"metric": metric, "mode": "max"},
        "space": space,
        "search": search,
        "resources": {"cpu": 1},
        "output_dir": "runs",
        **extra,
    }
    path = Path(folder) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def edited_study_copy(exp_dir: Path, dest: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of a finished study's spec and runs files in ``dest``, its study.json written as the
    launcher writes it after ``edit(state)`` changed it (a study that would take epochs to reach)."""
    import shutil

    from search import run_map
    from search import study as S

    dest.mkdir(parents=True)
    for name in (S.SPEC_FILE, run_map.RUNS_FILE):
        shutil.copy(Path(exp_dir) / name, dest / name)
    state = S.read_study(exp_dir)
    edit(state)
    S.write_study(dest, state)
    return dest
