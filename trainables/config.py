"""What one trial needs to know, as a plain dataclass (no dependency on ``search``).

``search.spec.Spec.trial_config()`` builds it from a validated spec; tests and scripts may build
it directly. Paths are absolute (the spec resolves them against the spec file's folder).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DataSplit:
    """A COCO split: the image root that ``file_name`` is relative to, and the JSON file."""

    images: Path
    annotations: Path


@dataclass(frozen=True)
class TrialConfig:
    """Fixed settings of a trial; the searched ones arrive separately as flat params."""

    task: str  # detection | instance_segmentation | semantic_segmentation
    arch: str  # a torchvision builder name (see torchvision.models.list_models)
    train: DataSplit
    val: DataSplit
    out_dir: Path  # the trial's own folder: checkpoints and logs go here, nothing elsewhere
    weights: str | None = None  # None | enum name (DEFAULT, COCO_V1, ...) | absolute file path
    weights_backbone: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    trainable_sets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    image_size: int = 320
    epochs: int = 3
    batch_size: int = 2
    workers: int = 0
    seed: int = 0
    metric: str = "map"
    mode: str = "max"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16/fp16 on CUDA, off on CPU) | off | bf16 | fp16
    threads: int = 1  # torch intra-op threads (the trial's CPUs)
    limit_train: int | None = None  # use only the first N training images (tests, dry runs)
    limit_val: int | None = None
    keep_full_checkpoint: bool = False  # also save frozen tensors the base already holds
    eval_base: bool = True  # evaluate the base model before training (epoch 0)
    base_eval_dir: Path | None = None  # share epoch-0 results between trials (trainables.base_eval)
