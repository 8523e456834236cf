"""Torch datasets, transforms and loaders over a sanitised :class:`trainables.coco.CocoIndex`.

Images come out as ``tv_tensors.Image`` float32 in [0, 1] with 3 channels, NOT normalised (the
torchvision detection models normalise inside; a semantic-segmentation caller must normalise).
Decoding: EXIF orientation applied; grayscale, RGBA (alpha dropped), palette and the other 8-bit
modes converted to RGB; 16/32-bit integer grayscale ("I;16*", "I") scaled by 1/65535 (no 8-bit
truncation); float ("F") clipped to [0, 1].

Size policy: the JSON's width/height (after EXIF) must equal the decoded image's size, otherwise
:class:`DatasetError` names the file and both sizes. Boxes are not rescaled silently, because a
mismatch is as often a rotation (EXIF applied by one tool and not the other) as a rescale.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from trainables.coco import (
    CocoIndex,
    DatasetError,
    ImageRecord,
    check_pixels,
    image_size_from_file,
    segmentation_to_rle,
)
from trainables.loss_table import IGNORE_INDEX  # semantic masks: pixels that count for nothing

_SEMANTIC = "semantic_segmentation"
_CONVERTED: dict[str, set[str]] = {}  # decoded mode other than RGB -> image paths (this process)


def read_image(path: Path) -> tv_tensors.Image:
    """Decode ``path`` to a float32 RGB (3, H, W) image in [0, 1]; DatasetError names a bad file.
    Images of another mode than RGB are counted (:func:`converted_images`)."""
    try:
        with Image.open(path) as img:
            check_pixels(*img.size, str(path))  # from the header, before decoding
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode != "RGB":
                _CONVERTED.setdefault(img.mode, set()).add(str(path))
            arr = _to_rgb_float(img)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: cannot decode image: {e}") from e
    return tv_tensors.Image(torch.from_numpy(arr).permute(2, 0, 1).contiguous())


def converted_images() -> dict[str, int]:
    """How many distinct images of each non-RGB mode (L, RGBA, P, I;16, ...) this process decoded to
    RGB so far (DataLoader worker processes count their own)."""
    return {mode: len(paths) for mode, paths in sorted(_CONVERTED.items())}


def _to_rgb_float(img: Image.Image) -> np.ndarray:
    if img.mode.startswith("I"):  # I;16, I;16B, I;16L, I (16-bit data in a 32-bit container)
        gray = np.clip(np.asarray(img, dtype=np.float32) / 65535.0, 0.0, 1.0)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "F":
        gray = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "PA") else img.convert("RGB")
    return np.asarray(img, dtype=np.float32) / 255.0


def _check_size(rec: ImageRecord, image: torch.Tensor) -> None:
    h, w = image.shape[-2:]
    if (h, w) != (rec.height, rec.width):
        raise DatasetError(
            f"{rec.path}: decoded size {w}x{h} (after EXIF orientation) differs from the annotations' "
            f"width x height {rec.width}x{rec.height} (image id {rec.id}).",
            "fix the JSON's width and height or the image.",
        )


def check_image_files(records: list[ImageRecord], threads: int = 8) -> None:
    """Read every record's image header (not its pixels): a file that is no image, or whose size
    (after EXIF orientation) is not the annotations' width x height, raises :class:`DatasetError`
    naming it, as the first epoch's load would have, hours into a study."""
    from concurrent.futures import ThreadPoolExecutor

    def one(rec: ImageRecord) -> None:
        w, h = image_size_from_file(rec.path)
        if (w, h) != (rec.width, rec.height):
            raise DatasetError(
                f"{rec.path}: its header says {w}x{h} (after EXIF orientation), but the annotations' "
                f"width x height is {rec.width}x{rec.height} (image id {rec.id}).",
                "fix the JSON's width and height or the image.",
            )

    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(one, records):
            pass


class _IndexDataset(Dataset):
    def __init__(self, index: CocoIndex, transforms: Callable | None, limit: int | None) -> None:
        self.index = index
        self.records = index.images[:limit] if limit is not None else list(index.images)
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, i: int) -> tuple[ImageRecord, tv_tensors.Image]:
        rec = self.records[i]
        image = read_image(rec.path)
        _check_size(rec, image)
        return rec, image


class CocoDetection(_IndexDataset):
    """(image, target) for detection / instance segmentation; crowd annotations are left out.

    target: ``boxes`` (XYXY BoundingBoxes, float32, (N, 4) also for N = 0, in the transformed
    image), ``labels`` int64 (1..K), ``image_id`` int, ``orig_size`` and ``input_size`` (h, w),
    and ``masks`` (uint8 N x H x W Mask) when ``with_masks``. Boxes that transforms made smaller
    than 1 px are dropped with their labels and masks (SanitizeBoundingBoxes).
    """

    def __init__(
        self,
        index: CocoIndex,
        transforms: Callable | None,
        with_masks: bool = False,
        limit: int | None = None,
    ) -> None:
        super().__init__(index, transforms, limit)
        self.with_masks = with_masks
        self.sanitize = v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter="default")

    def __getitem__(self, i: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        rec, image = self._load(i)
        anns = [a for a in rec.anns if not a.iscrowd]
        h, w = rec.height, rec.width
        boxes = torch.tensor([a.box for a in anns], dtype=torch.float32).reshape(-1, 4)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "labels": torch.tensor([a.label for a in anns], dtype=torch.int64),
            "image_id": rec.id,
            "orig_size": (h, w),
        }
        if self.with_masks:
            target["masks"] = tv_tensors.Mask(_instance_masks(rec, anns))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        image, target = self.sanitize(image, target)
        target["input_size"] = tuple(image.shape[-2:])
        return image, target


def _instance_masks(rec: ImageRecord, anns: Sequence) -> torch.Tensor:
    if any(a.segmentation is None for a in anns):
        raise DatasetError(
            f"{rec.path}: image id {rec.id} has a box without segmentation; load the split with "
            "task='instance_segmentation' (drops such annotations) to train masks"
        )
    if not anns:
        return torch.zeros((0, rec.height, rec.width), dtype=torch.uint8)
    rles = [segmentation_to_rle(a.segmentation, rec.height, rec.width) for a in anns]
    masks = mask_utils.decode(rles)  # (H, W, N), Fortran order
    return torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1)))


class CocoSemantic(_IndexDataset):
    """(image, Mask int64 H x W): 0 background, 1..K class, 255 ignore.

    Annotations are painted in file order (a later one wins where they overlap). Crowd regions and
    the boxes of annotations without segmentation become 255 where no segmented, non-crowd
    annotation labels the pixel (a known class is kept, an unknown region is ignored).
    ``full_masks`` (evaluation): the transforms resize the image alone and the mask keeps the
    image's own size, where predictions are scored (as ``predict`` delivers them).
    """

    def __init__(
        self,
        index: CocoIndex,
        transforms: Callable | None,
        limit: int | None = None,
        full_masks: bool = False,
    ) -> None:
        super().__init__(index, transforms, limit)
        self.full_masks = full_masks
        if len(index.class_names) >= IGNORE_INDEX:
            raise DatasetError(f"{index.annotations_path}: semantic masks hold at most 254 classes")

    def __getitem__(self, i: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        rec, image = self._load(i)
        mask = tv_tensors.Mask(torch.from_numpy(semantic_mask(rec)))
        if self.transforms is not None and self.full_masks:
            image = self.transforms(image)
        elif self.transforms is not None:
            image, mask = self.transforms(image, mask)
        return image, mask


def semantic_mask(rec: ImageRecord) -> np.ndarray:
    """The int64 (H, W) class map of one record (see :class:`CocoSemantic`)."""
    out = np.zeros((rec.height, rec.width), dtype=np.int64)
    unknown = np.zeros((rec.height, rec.width), dtype=bool)
    for a in rec.anns:
        if a.segmentation is None:
            x1, y1 = (math.floor(v) for v in a.box[:2])
            x2, y2 = (math.ceil(v) for v in a.box[2:])
            unknown[y1:y2, x1:x2] = True
            continue
        region = mask_utils.decode(segmentation_to_rle(a.segmentation, rec.height, rec.width)).astype(bool)
        if a.iscrowd:
            unknown |= region
        else:
            out[region] = a.label
    out[unknown & (out == 0)] = IGNORE_INDEX
    return out


class RandomLongSide(v2.Transform):
    """Resize so the long side is ``size * U(1 - jitter, 1 + jitter)`` (aspect kept)."""

    def __init__(self, size: int, jitter: float = 0.0) -> None:
        super().__init__()
        self.size, self.jitter = size, jitter

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        if self.jitter <= 0:  # draws nothing: evaluation leaves the global RNG alone
            return {"max_size": max(8, self.size)}
        factor = 1.0 + self.jitter * (2.0 * float(torch.rand(())) - 1.0)
        return {"max_size": max(8, round(self.size * factor))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=None, max_size=params["max_size"], antialias=True)


def build_transforms(task: str, train: bool, image_size: int, params: dict[str, Any]) -> v2.Compose:
    """Resize + (training) flips, colour jitter and scale jitter from ``aug.*`` params.

    Detection / instance segmentation: long side = ``image_size`` (aspect kept; scale jitter draws
    the long side from ``image_size * U(1-s, 1+s)``). Semantic segmentation: square
    ``image_size x image_size`` so batches stack; scale jitter zooms by U(1-s, 1+s) around the
    centre keeping that size (padding: image 0, mask 255). Masks are resized nearest.
    """
    scale = float(params.get("aug.scale", 0.0)) if train else 0.0
    if task == _SEMANTIC:
        ops: list[Any] = [v2.Resize((image_size, image_size), antialias=True)]
        if scale > 0:
            ops.append(
                v2.RandomAffine(
                    degrees=0.0,
                    scale=(1.0 - scale, 1.0 + scale),
                    interpolation=v2.InterpolationMode.BILINEAR,
                    fill={tv_tensors.Image: 0.0, tv_tensors.Mask: IGNORE_INDEX},
                )
            )
    else:
        ops = [RandomLongSide(image_size, scale)]
    if train:
        ops += _train_ops(params)
    return v2.Compose(ops)


def _train_ops(params: dict[str, Any]) -> list[Any]:
    ops: list[Any] = []
    if params.get("aug.hflip", 0.0) > 0:
        ops.append(v2.RandomHorizontalFlip(p=float(params["aug.hflip"])))
    if params.get("aug.vflip", 0.0) > 0:
        ops.append(v2.RandomVerticalFlip(p=float(params["aug.vflip"])))
    color = float(params.get("aug.color", 0.0))
    if color > 0:
        ops.append(v2.ColorJitter(brightness=color, contrast=color, saturation=color))
    return ops


def collate(batch: Sequence[tuple[Any, ...]]) -> tuple[list[Any], ...]:
    """Tuple of lists: ([images], [targets])."""
    return tuple(list(items) for items in zip(*batch, strict=True))


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32  # already base_seed + worker_id, from the loader generator
    random.seed(seed)
    np.random.seed(seed)


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, workers: int, seed: int, *, pin_memory: bool = False
) -> DataLoader:
    """A DataLoader with a seeded generator (order and worker seeds repeat for the same ``seed``).

    With ``workers > 0`` decoding runs in worker processes (two batches prefetched each), started
    again each epoch for a shuffled loader: each epoch then draws its worker seeds from the
    generator, so that a trial resumed from the generator's saved state sees the same order and
    augmentations as one never interrupted (persistent workers would draw them once, at the
    first epoch, and a resumed process at its own first); with 0 it runs in the caller and
    transforms draw from the global torch RNG. Nothing is pinned unless ``pin_memory`` (only worth
    it for a CUDA device). Shuffled (training) loaders drop a last partial batch when the split
    holds more than one batch, as torchvision's detection references do: a batch of one image
    breaks BatchNorm on 1x1 feature maps.
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=shuffle and len(dataset) > batch_size,
        num_workers=workers,
        collate_fn=collate,
        generator=generator,
        worker_init_fn=_seed_worker if workers > 0 else None,
        persistent_workers=workers > 0 and not shuffle,
        prefetch_factor=2 if workers > 0 else None,
        pin_memory=pin_memory,
    )
