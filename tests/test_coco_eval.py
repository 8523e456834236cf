"""Metrics: COCO mAP through trainables.coco_eval against pycocotools run directly; SegmentationMeter."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from trainables import coco_eval
from trainables.coco import load_coco
from trainables.coco_eval import SegmentationMeter, build_cocoeval, evaluate_detections

CATS = [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}]  # a -> label 1 (cat 3), b -> label 2 (cat 7)
GT = [  # (id, image_id, category_id, [x, y, w, h])
    (1, 1, 3, [10, 10, 40, 30]),
    (2, 1, 7, [60, 50, 30, 40]),
    (3, 2, 7, [6, 6, 20, 20]),
    (4, 2, 3, [0, 0, 10, 10]),
]


def _poly(b):
    x, y, w, h = b
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


@pytest.fixture
def split(tmp_path: Path):
    root = tmp_path / "images"
    root.mkdir()
    images = [
        {"id": 1, "file_name": "one.png", "width": 100, "height": 100},
        {"id": 2, "file_name": "two.png", "width": 100, "height": 80},
        {"id": 3, "file_name": "neg.png", "width": 100, "height": 100},
    ]
    for im in images:
        Image.new("RGB", (im["width"], im["height"])).save(root / im["file_name"])
    anns = [
        {
            "id": i,
            "image_id": im,
            "category_id": c,
            "bbox": b,
            "iscrowd": 0,
            "area": b[2] * b[3],
            "segmentation": _poly(b),
        }
        for i, im, c, b in GT
    ]
    path = tmp_path / "val.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    return path, root


def _pred(image_id, boxes, labels, scores, input_size, masks=None):
    out = {
        "image_id": image_id,
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "scores": torch.tensor(scores),
        "input_size": input_size,
    }
    if masks is not None:
        out["masks"] = masks
    return out


def _half_masks(boxes_xyxy, h, w):
    m = torch.zeros((len(boxes_xyxy), 1, h, w))
    for i, (x1, y1, x2, y2) in enumerate(boxes_xyxy):
        m[i, 0, int(y1) : int(y2), int(x1) : int(x2)] = 0.9
    return m


def _perfect(idx):
    """Ground truth at half resolution (network input), with half-resolution masks."""
    preds = []
    for rec in idx.images:
        h, w = rec.height // 2, rec.width // 2
        boxes = [[v / 2 for v in a.box] for a in rec.anns]
        preds.append(
            _pred(
                rec.id,
                boxes,
                [a.label for a in rec.anns],
                [0.9] * len(boxes),
                (h, w),
                _half_masks(boxes, h, w),
            )
        )
    return preds


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_perfect_predictions_score_one(split, iou_type):
    idx = load_coco(*split, task="instance_segmentation")
    m = evaluate_detections(idx, _perfect(idx), iou_type=iou_type)
    for key in ("map", "map50", "map75", "mar100"):
        assert m[key] == pytest.approx(1.0), key
    assert m["ap_per_class"] == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}
    assert set(m) >= {"map", "map50", "map75", "map_small", "map_medium", "map_large", "mar100"}


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_a_background_label_is_dropped_not_fatal(split, iou_type):
    """Label 0 (a sigmoid head's background column) is no class: left out, the rest evaluated."""
    idx = load_coco(*split, task="instance_segmentation")
    preds = []
    for p in _perfect(idx):
        h, w = p["input_size"]
        extra = {"boxes": [[1.0, 1.0, 9.0, 9.0]], "labels": [0], "scores": [0.99]}
        mask = torch.zeros(1, 1, h, w)
        mixed = _pred(p["image_id"], extra["boxes"], extra["labels"], extra["scores"], (h, w), mask)
        both = ("boxes", "labels", "scores", "masks")
        preds.append({k: torch.cat([mixed[k], p[k]]) if k in both else p[k] for k in p})
    want = evaluate_detections(idx, _perfect(idx), iou_type=iou_type)
    assert evaluate_detections(idx, preds, iou_type=iou_type) == want
    compact = [coco_eval.compact_prediction(idx, p) for p in preds]
    assert evaluate_detections(idx, compact, iou_type=iou_type) == want


def test_matches_cocoeval_run_directly(split):
    ann, root = split
    idx = load_coco(ann, root)
    # original coordinates (x, y, w, h), category ids; one IoU of exactly 0.6 (4 vs [0, 0, 10, 6])
    orig = [
        (1, 3, [12, 14, 40, 30], 0.9),
        (1, 3, [70, 5, 20, 20], 0.8),
        (1, 7, [60, 50, 30, 40], 0.7),
        (2, 7, [7, 5, 20, 20], 0.6),
        (2, 3, [0, 0, 10, 6], 0.95),
        (3, 3, [10, 10, 30, 30], 0.99),
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        dt = gt.loadRes([{"image_id": i, "category_id": c, "bbox": b, "score": s} for i, c, b, s in orig])
        ref = COCOeval(gt, dt, "bbox")
        ref.evaluate()
        ref.accumulate()
        ref.summarize()
    preds = []
    for rec in idx.images:  # network input at half size
        mine = [o for o in orig if o[0] == rec.id]
        boxes = [[b[0] / 2, b[1] / 2, (b[0] + b[2]) / 2, (b[1] + b[3]) / 2] for _, _, b, _ in mine]
        preds.append(
            _pred(
                rec.id,
                boxes,
                [idx.cat_to_label[c] for _, c, _, _ in mine],
                [s for *_, s in mine],
                (rec.height // 2, rec.width // 2),
            )
        )
    m = evaluate_detections(idx, preds)
    for key, i in {"map": 0, "map50": 1, "map75": 2, "map_small": 3, "map_medium": 4, "mar100": 8}.items():
        assert m[key] == pytest.approx(ref.stats[i], abs=1e-12), key
    assert 0.0 < m["map"] < 1.0
    for k, cat in enumerate(ref.params.catIds):
        p = ref.eval["precision"][:, :, k, 0, -1]
        assert m["ap_per_class"][{3: "a", 7: "b"}[cat]] == pytest.approx(p[p > -1].mean(), abs=1e-12)
    evaluator = build_cocoeval(idx, preds)
    assert evaluator.params.iouThrs.dtype == np.float64
    assert evaluator.params.imgIds == [1, 2, 3]


def test_empty_predictions_give_zeros(split):
    idx = load_coco(*split)
    m = evaluate_detections(idx, [])
    assert m["map"] == 0.0 and m["map50"] == 0.0 and m["mar100"] == 0.0
    assert m["ap_per_class"] == {"a": 0.0, "b": 0.0}
    nothing = [_pred(r.id, [], [], [], (r.height, r.width)) for r in idx.images]
    m = evaluate_detections(idx, nothing)
    assert m["map"] == 0.0 and m["ap_per_class"] == {"a": 0.0, "b": 0.0}


def test_only_predicted_images_are_evaluated(split):
    idx = load_coco(*split)
    rec = idx.images[0]
    boxes = [list(a.box) for a in rec.anns]
    m = evaluate_detections(idx, [_pred(rec.id, boxes, [a.label for a in rec.anns], [0.5, 0.5], (100, 100))])
    assert m["map"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="image id 99"):
        evaluate_detections(idx, [_pred(99, [], [], [], (10, 10))])
    with pytest.raises(ValueError, match="label 5"):
        evaluate_detections(idx, [_pred(1, [[0, 0, 5, 5]], [5], [0.5], (100, 100))])


def test_segmentation_meter_hand_computed():
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, 0, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0], [2, 0, 2, 1], [2, 2, 0, 0]])
    meter = SegmentationMeter(num_classes=4)  # class 3 absent from both: excluded from the means
    meter.update(pred[:2], target[:2])
    meter.update(pred[2:], target[2:])
    out = meter.compute()
    # counted pixels 14; class 0: TP 5 FP 2 FN 1; class 1: TP 3 FP 1 FN 1; class 2: TP 3 FP 0 FN 1
    assert out["iou_per_class"] == pytest.approx([5 / 8, 3 / 5, 3 / 4, -1.0])
    assert out["miou"] == pytest.approx((5 / 8 + 3 / 5 + 3 / 4) / 3)
    assert out["pixel_acc"] == pytest.approx(11 / 14)
    assert out["dice"] == pytest.approx((10 / 13 + 6 / 8 + 6 / 7) / 3)
    assert out["fg_miou"] == pytest.approx((3 / 5 + 3 / 4) / 2)  # classes 1 and 2
    meter.reset()
    meter.update(torch.zeros_like(target), target)  # background everywhere: the foreground's IoU is 0
    assert meter.compute()["fg_miou"] == 0.0 and meter.compute()["miou"] > 0
    meter.reset()
    assert meter.compute()["miou"] == 0.0
    with pytest.raises(ValueError, match="class ids"):
        meter.update(torch.tensor([4]), torch.tensor([0]))


def test_mask_map_matches_cocoeval_run_directly(split, monkeypatch):
    """Mask mAP (iou_type segm) on hand-made masks equals pycocotools' COCOeval on the same RLEs,
    also from the compact predictions evaluation keeps (RLEs, masks resized a chunk at a time)."""
    from pycocotools import mask as mask_utils

    ann, root = split
    idx = load_coco(ann, root, task="instance_segmentation")
    # (image_id, category_id, filled rectangle x1, y1, x2, y2 at the original size, score)
    made = [
        (1, 3, (12, 10, 50, 36), 0.9),
        (1, 7, (60, 58, 90, 90), 0.8),
        (1, 3, (70, 5, 90, 25), 0.4),
        (2, 7, (6, 6, 22, 26), 0.7),
        (2, 3, (0, 0, 10, 6), 0.95),
    ]
    sizes = {rec.id: (rec.height, rec.width) for rec in idx.images}
    rles, preds = [], []
    for rec in idx.images:
        h, w = sizes[rec.id]
        mine = [m for m in made if m[0] == rec.id]
        masks = torch.zeros((len(mine), 1, h, w))
        for i, (_, _, (x1, y1, x2, y2), _) in enumerate(mine):
            masks[i, 0, y1:y2, x1:x2] = 1.0
            binary = np.asfortranarray(masks[i, 0].numpy().astype(np.uint8))
            rles.append((rec.id, mine[i][1], mask_utils.encode(binary), mine[i][3]))
        boxes = [list(map(float, r)) for _, _, r, _ in mine]
        preds.append(
            _pred(
                rec.id,
                boxes,
                [idx.cat_to_label[c] for _, c, _, _ in mine],
                [s for *_, s in mine],
                (h, w),
                masks,
            )
        )
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        results = []
        for image_id, cat, rle, score in rles:
            rle = dict(rle, counts=rle["counts"].decode("ascii"))
            results.append({"image_id": image_id, "category_id": cat, "segmentation": rle, "score": score})
        ref = COCOeval(gt, gt.loadRes(results), "segm")
        ref.params.imgIds = [1, 2, 3]
        ref.evaluate()
        ref.accumulate()
        ref.summarize()
    m = evaluate_detections(idx, preds, iou_type="segm")
    assert 0.0 < m["map"] < 1.0
    for key, i in {"map": 0, "map50": 1, "map75": 2}.items():
        assert m[key] == pytest.approx(ref.stats[i], abs=1e-12), key
    monkeypatch.setattr(coco_eval, "MASK_CHUNK", 2)
    compact = [coco_eval.compact_prediction(idx, p) for p in preds]
    assert all("masks" not in p and len(p["rles"]) == len(p["scores"]) for p in compact)
    assert evaluate_detections(idx, compact, iou_type="segm") == m


@pytest.mark.parametrize("task", ["detection", "instance_segmentation"])
def test_evaluate_reports_every_objective_the_spec_accepts(split, task):
    """Each of the task's objectives (spec.TASK_METRICS) is in what a trial's evaluation returns."""
    from search.spec import TASK_METRICS
    from trainables import engine

    path, root = split
    index = load_coco(path, root, task=task)

    class Model(torch.nn.Module):
        def forward(self, images):
            out = {"boxes": torch.tensor([[10.0, 10, 50, 40]]), "labels": torch.tensor([1])}
            out |= {"scores": torch.tensor([0.9]), "masks": torch.ones(1, 1, *images[0].shape[-2:])}
            return [out for _ in images]

    loader = [([torch.zeros(3, 100, 100)], [{"image_id": 1}]), ([torch.zeros(3, 80, 100)], [{"image_id": 2}])]
    metrics = engine.evaluate(Model(), loader, index, device=torch.device("cpu"), task=task)
    assert set(TASK_METRICS[task]) <= set(metrics), set(TASK_METRICS[task]) - set(metrics)
    assert metrics["map50"] > 0 and metrics["mar100"] > 0
