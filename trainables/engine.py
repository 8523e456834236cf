"""One training epoch and one evaluation pass (after torchvision's references/detection/engine.py).

Batches are ``(images, targets)`` tuples of lists (``data.make_loader``'s collate): detection
targets are dicts, semantic targets are ``H x W`` int64 masks (255 = ignore); semantic images are
stacked and ImageNet-normalised here (``data`` yields [0, 1] images). AMP autocast and
channels_last are used only on CUDA; a ``GradScaler`` is used only with fp16.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from typing import Any

import torch

from trainables import coco_eval, freeze, losses, norms
from trainables.testhooks import pause_point

log = logging.getLogger(__name__)
# Semantic models take ImageNet-normalised input (detection models normalise inside themselves).
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class Diverged(RuntimeError):
    """A non-finite training loss; raised before backward, so the weights are not touched."""

    def __init__(self, step: int, losses: dict[str, float]):
        self.step, self.losses = step, losses
        super().__init__(f"non-finite loss at step {step}: {losses}")


def _to(device: torch.device, images: list, targets: list) -> tuple[Any, Any]:
    if targets and isinstance(targets[0], dict):
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        return images, targets
    return _semantic_batch(device, images), torch.stack([t.to(device) for t in targets])


def _semantic_batch(device: torch.device, images: list) -> torch.Tensor:
    batch = torch.stack([im.to(device, non_blocking=True) for im in images])
    batch = (batch - _MEAN.to(device)) / _STD.to(device)
    return batch.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else batch


def _score_semantic(meter: Any, logits: torch.Tensor, masks: list) -> None:
    """Each image's class map at its mask's size (the image's own, from an evaluation loader): its
    logits upsampled bilinearly, then the top class, as ``predict`` makes the masks it delivers."""
    for one, mask in zip(logits, masks, strict=True):
        if one.shape[-2:] != mask.shape[-2:]:
            one = torch.nn.functional.interpolate(
                one[None], size=tuple(mask.shape[-2:]), mode="bilinear", align_corners=False
            )[0]
        meter.update(one.argmax(0).cpu(), mask.cpu())


def _loss_dict(model: Any, images: Any, targets: Any, params: dict[str, Any]) -> dict[str, torch.Tensor]:
    if isinstance(targets, list):  # detection / instance: torchvision returns the loss dict
        return model(images, targets)
    return losses.semantic_losses(model(images), targets, params)


def train_one_epoch(
    model: Any,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    device: torch.device,
    params: dict[str, Any],
    amp_dtype: torch.dtype | None = None,
    scaler: Any = None,
    log_every: int = 50,
) -> dict[str, float]:
    """Train one pass over ``loader``; the scheduler steps once per iteration.

    Returns the mean of every loss term and of the weighted ``loss``, ``lr`` (first group, that of
    the epoch's last step: not the next step's, which the scheduler has set by then),
    ``epoch_seconds`` and ``images_per_s``. Raises :class:`Diverged` on a non-finite loss.
    """
    freeze.train_mode(model)
    sums: dict[str, float] = defaultdict(float)
    n_steps = n_images = 0
    lr = optimizer.param_groups[0]["lr"]
    t0 = time.perf_counter()
    for step, (images, targets) in enumerate(loader):
        images, targets = _to(device, images, targets)
        autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
        with autocast, norms.one_value_guard(model):  # a batch of one image: see one_value_guard
            loss_dict = _loss_dict(model, images, targets, params)
            loss = losses.weighted_total(loss_dict, params)
        values = {k: float(v.detach()) for k, v in loss_dict.items()} | {"loss": float(loss.detach())}
        if not all(math.isfinite(v) for v in values.values()):
            raise Diverged(step, values)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if params["grad_clip"] > 0:
            trainable = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(trainable, params["grad_clip"])
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr = optimizer.param_groups[0]["lr"]  # the lr this step used
        scheduler.step()
        for k, v in values.items():
            sums[k] += v
        n_steps += 1
        n_images += len(images)
        if n_steps == 1:
            pause_point("mid_epoch")  # test hook (trainables/testhooks.py)
        if log_every and step % log_every == 0:
            log.info("step %d loss %.4f lr %.3g", step, values["loss"], lr)
    seconds = time.perf_counter() - t0
    out = {k: v / max(1, n_steps) for k, v in sums.items()}
    out |= {"lr": lr, "epoch_seconds": seconds}
    out["images_per_s"] = n_images / seconds if seconds > 0 else 0.0
    return out


SEMANTIC_METRICS = ("miou", "fg_miou", "pixel_acc", "dice")


@torch.inference_mode()
def evaluate(model: Any, loader: Any, index: Any, *, device: torch.device, task: str) -> dict[str, Any]:
    """Metrics on ``loader``: ``map, map50, map75, map_small, map_medium, map_large, mar100``
    (boxes; plus ``mask_map, mask_map50, mask_map75`` for instance segmentation) via COCOeval,
    or ``miou, fg_miou, pixel_acc, dice`` for semantic segmentation, over the pixels of the masks
    as the loader gives them (a trial's: each image's own size, see :func:`_score_semantic`)."""
    model.eval()
    semantic = task == "semantic_segmentation"
    meter = coco_eval.SegmentationMeter(len(index.class_names) + 1) if semantic else None
    predictions: list[dict[str, Any]] = []
    pause_point("evaluate")  # test hook: the first evaluation of a trial is its epoch 0
    for images, targets in loader:
        if semantic:
            _score_semantic(meter, model(_semantic_batch(device, images))["out"], targets)
            continue
        outputs = model([im.to(device) for im in images])
        for image, target, pred in zip(images, targets, outputs, strict=True):
            row = {k: v.cpu() for k, v in pred.items()}
            row |= {"image_id": int(target["image_id"]), "input_size": tuple(image.shape[-2:])}
            predictions.append(coco_eval.compact_prediction(index, row))  # masks: RLEs now
    if semantic:
        return {k: v for k, v in meter.compute().items() if k in SEMANTIC_METRICS}
    box = coco_eval.evaluate_detections(index, predictions, iou_type="bbox")
    metrics = {k: box[k] for k in coco_eval.BOX_METRICS}
    if task == "instance_segmentation":
        segm = coco_eval.evaluate_detections(index, predictions, iou_type="segm")
        metrics |= {f"mask_{k}": segm[k] for k in ("map", "map50", "map75")}
    return metrics
