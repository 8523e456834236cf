"""What a first run prints, through the real CLI: each dataset file's summary line (its
sanitisation counts) appears once, although the spec's checks and the trial both read the file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.tinydata import make_tiny_coco

ROOT = Path(__file__).resolve().parents[1]


def test_trial_prints_each_dataset_summary_once(tmp_path):
    train_images, train_ann = make_tiny_coco(tmp_path / "train", n_images=4, size=64, seed=1)
    val_images, val_ann = make_tiny_coco(tmp_path / "val", n_images=3, size=64, seed=2)
    spec = tmp_path / "spec.yaml"
    raw = {
        "name": "first-run",
        "task": "detection",
        "model": {"arch": "ssdlite320_mobilenet_v3_large", "weights": "none"},
        "data": {
            "train": {"images": str(train_images), "annotations": str(train_ann)},
            "val": {"images": str(val_images), "annotations": str(val_ann)},
            "image_size": 64,
        },
        "train": {"epochs": 1, "batch_size": 2},
        "objective": {"metric": "map", "mode": "max"},
        "space": {"lr": 0.001},
        "output_dir": str(tmp_path / "runs"),
    }
    spec.write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [sys.executable, "-m", "search", "trial", str(spec), "--out", str(tmp_path / "out")],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    for ann in (train_ann, val_ann):
        summaries = [ln for ln in lines if f"{ann.resolve()}: images=" in ln]
        assert len(summaries) == 1, (ann, summaries)


def test_the_readme_spec_reference_validates(tmp_path):
    """The spec in README's "Spec reference" (the first a user copies) passes ``validate``, with its
    relative paths beside it as in ``spaces/``. Its trainable set once matched no parameter."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Spec reference", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    for folder in ("base", "data"):
        (tmp_path / folder).symlink_to(ROOT / "spaces" / folder)
    (tmp_path / "spec.yaml").write_text(block)
    proc = subprocess.run(
        [sys.executable, "-m", "search", "validate", str(tmp_path / "spec.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
