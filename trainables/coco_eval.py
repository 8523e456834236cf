"""Metrics of record: COCO mAP (pycocotools COCOeval, float64 IoU thresholds) and a confusion-matrix
meter for semantic segmentation.

Predictions (one dict per evaluated image, also for an image with no detection) carry
``image_id``, ``boxes`` (N x 4 XYXY in network-input coordinates), ``scores``, ``labels``
(contiguous 1..K), optional ``masks`` (N x 1 x h x w probabilities) and ``input_size`` (h, w).
Boxes are rescaled to the record's width/height; masks are resized (bilinear, as probabilities) to
the original size, thresholded at 0.5 and RLE-encoded. Only the images present in ``predictions``
are evaluated (so ``limit_val`` subsets are scored fairly).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from trainables.coco import CocoIndex, ImageRecord

BOX_METRICS = {"map": 0, "map50": 1, "map75": 2, "map_small": 3, "map_medium": 4, "map_large": 5, "mar100": 8}


def evaluate_detections(
    index: CocoIndex, predictions: Sequence[dict[str, Any]], iou_type: str = "bbox"
) -> dict[str, Any]:
    """COCO metrics: ``map`` (AP@[.5:.95]), ``map50``, ``map75``, ``map_small/medium/large``,
    ``mar100`` and ``ap_per_class`` {class name: AP}. -1 means undefined (no ground truth of that
    kind in the evaluated images), as in COCOeval. No prediction at all gives 0 everywhere (-1 for a
    class without ground truth)."""
    evaluator = build_cocoeval(index, predictions, iou_type)
    if evaluator is None:
        return _empty_metrics(index, predictions)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    out: dict[str, Any] = {k: float(evaluator.stats[i]) for k, i in BOX_METRICS.items()}
    out["ap_per_class"] = _ap_per_class(index, evaluator)
    return out


def build_cocoeval(
    index: CocoIndex, predictions: Sequence[dict[str, Any]], iou_type: str = "bbox"
) -> COCOeval | None:
    """A ready COCOeval over the predicted images, or None when no image was predicted."""
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    if iou_type == "segm" and any("segmentation" not in a for a in index.coco.dataset["annotations"]):
        raise ValueError(
            f"{index.annotations_path}: iou_type 'segm' needs a segmentation on every "
            "annotation (load the split with task='instance_segmentation')"
        )
    results: list[dict[str, Any]] = []
    img_ids: set[int] = set()
    for pred in predictions:
        rec = _record(index, pred)
        img_ids.add(rec.id)
        results += _to_coco_results(index, rec, pred, iou_type)
    if not img_ids:
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        dt = index.coco.loadRes(results) if results else _empty_results(index)
        evaluator = COCOeval(index.coco, dt, iouType=iou_type)
    evaluator.params.imgIds = sorted(img_ids)
    return evaluator


def _empty_results(index: CocoIndex) -> Any:
    from pycocotools.coco import COCO

    dt = COCO()
    dt.dataset = {
        "images": list(index.coco.dataset["images"]),
        "annotations": [],
        "categories": list(index.coco.dataset["categories"]),
    }
    dt.createIndex()
    return dt


def _without_background(pred: dict[str, Any]) -> dict[str, Any]:
    """``pred`` without label 0: a sigmoid head's background column (RetinaNet, FCOS) can score
    above the threshold, and it is no class to evaluate."""
    keep = torch.as_tensor(pred["labels"]).reshape(-1) != 0
    if bool(keep.all()):
        return pred
    per_box = ("boxes", "scores", "labels", "masks")
    out = {k: (torch.as_tensor(v)[keep] if k in per_box else v) for k, v in pred.items()}
    if "rles" in pred:
        out["rles"] = [r for r, k in zip(pred["rles"], keep.tolist(), strict=True) if k]
    return out


def _to_coco_results(index: CocoIndex, rec: ImageRecord, pred: dict[str, Any], iou_type: str) -> list[dict]:
    pred = _without_background(pred)
    scores = torch.as_tensor(pred["scores"]).detach().float().cpu().reshape(-1)
    labels = torch.as_tensor(pred["labels"]).detach().cpu().reshape(-1).tolist()
    cats = []
    for label in labels:
        if int(label) not in index.label_to_cat:
            raise ValueError(f"image id {rec.id}: predicted label {label} not in 1..{len(index.class_names)}")
        cats.append(index.label_to_cat[int(label)])
    in_h, in_w = (int(v) for v in pred["input_size"])
    pairs = zip(cats, scores.tolist(), strict=True)
    base = [{"image_id": rec.id, "category_id": c, "score": float(s)} for c, s in pairs]
    if iou_type == "bbox":
        boxes = _rescale_boxes(pred["boxes"], rec, in_h, in_w)
        return [dict(b, bbox=box) for b, box in zip(base, boxes, strict=True)]
    return [dict(b, segmentation=rle) for b, rle in zip(base, _encode_masks(pred, rec), strict=True)]


def _rescale_boxes(boxes: Any, rec: ImageRecord, in_h: int, in_w: int) -> list[list[float]]:
    b = torch.as_tensor(boxes).detach().double().cpu().reshape(-1, 4).clone()
    b[:, 0::2] *= rec.width / in_w
    b[:, 1::2] *= rec.height / in_h
    b[:, 2:] -= b[:, :2]
    return b.tolist()


MASK_CHUNK = 8  # masks resized at once: bounds the float copy at the original resolution


def compact_prediction(index: CocoIndex, pred: dict[str, Any]) -> dict[str, Any]:
    """``pred`` with its soft masks replaced by their RLEs at the original image size (``rles``):
    what evaluation keeps per image instead of N float masks at the input size."""
    if "masks" not in pred:
        return pred
    out = {k: v for k, v in pred.items() if k != "masks"}
    out["rles"] = _encode_masks(pred, _record(index, pred))
    return out


def _record(index: CocoIndex, pred: dict[str, Any]) -> ImageRecord:
    rec = index.by_id.get(int(pred["image_id"]))
    if rec is None:
        raise ValueError(f"prediction for image id {pred['image_id']} not in {index.annotations_path}")
    return rec


def _encode_masks(pred: dict[str, Any], rec: ImageRecord) -> list[dict[str, Any]]:
    if "rles" in pred:
        return list(pred["rles"])
    if "masks" not in pred:
        raise ValueError(f"image id {rec.id}: iou_type 'segm' needs 'masks' in the predictions")
    probs = torch.as_tensor(pred["masks"]).detach().cpu()
    if probs.numel() == 0:
        return []
    probs = probs.reshape(probs.shape[0], 1, *probs.shape[-2:])
    out: list[dict[str, Any]] = []
    for start in range(0, probs.shape[0], MASK_CHUNK):
        chunk = probs[start : start + MASK_CHUNK].float()
        if tuple(chunk.shape[-2:]) != (rec.height, rec.width):
            chunk = torch.nn.functional.interpolate(
                chunk, size=(rec.height, rec.width), mode="bilinear", align_corners=False
            )
        binary = (chunk[:, 0] > 0.5).numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        out += [dict(r, counts=r["counts"].decode("ascii")) for r in rles]
    return out


def _ap_per_class(index: CocoIndex, evaluator: COCOeval) -> dict[str, float]:
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]; area "all", maxDets 100 = last
    out = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        name = index.class_names[index.cat_to_label[cat_id] - 1]
        out[name] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
    return out


def _empty_metrics(index: CocoIndex, predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: 0.0 for k in BOX_METRICS}
    ids = {int(p["image_id"]) for p in predictions} or {r.id for r in index.images}
    present = {a.label for r in index.images if r.id in ids for a in r.anns if not a.iscrowd}
    names = index.class_names
    out["ap_per_class"] = {name: (0.0 if i + 1 in present else -1.0) for i, name in enumerate(names)}
    return out


class SegmentationMeter:
    """Confusion matrix over (target, prediction) pixels -> mIoU, pixel accuracy, Dice.

    Policy: pixels whose target is ``ignore_index`` are skipped. A class absent from both the
    ground truth and the predictions (TP + FP + FN = 0) has no IoU/Dice: it is reported as -1 in
    ``iou_per_class`` and excluded from ``miou`` and ``dice`` (means over the other classes).
    Background (class 0) counts as a class in ``miou``; ``fg_miou`` is the mean over the present
    foreground classes alone (0 for a model that predicts background only; -1 when no foreground
    class is present at all). With no counted pixel every metric is 0.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self.confusion = torch.zeros((self.num_classes, self.num_classes), dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` and ``target`` are integer class maps of the same shape."""
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} differs from target {tuple(target.shape)}")
        pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        c = self.num_classes
        if pred.numel() and (min(pred.min(), target.min()) < 0 or max(pred.max(), target.max()) >= c):
            raise ValueError(f"class ids must be in 0..{c - 1} (or {self.ignore_index} in the target)")
        counts = torch.bincount(target * c + pred, minlength=c * c)
        self.confusion += counts.reshape(c, c).cpu()

    def compute(self) -> dict[str, Any]:
        """``miou``, ``fg_miou``, ``pixel_acc``, ``dice`` (floats) and ``iou_per_class`` (list,
        -1 = absent)."""
        cm = self.confusion.double()
        tp = cm.diag()
        fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
        total = cm.sum()
        present = (tp + fp + fn) > 0
        iou = torch.where(present, tp / (tp + fp + fn).clamp(min=1), torch.full_like(tp, -1.0))
        dice = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
        if total == 0 or not present.any():
            return {"miou": 0.0, "fg_miou": 0.0, "pixel_acc": 0.0, "dice": 0.0, "iou_per_class": iou.tolist()}
        fg = present[1:]
        return {
            "miou": float(iou[present].mean()),
            "fg_miou": float(iou[1:][fg].mean()) if fg.any() else -1.0,
            "pixel_acc": float(tp.sum() / total),
            "dice": float(dice[present].mean()),
            "iou_per_class": iou.tolist(),
        }
