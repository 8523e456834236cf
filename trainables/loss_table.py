"""The loss choices, one table per kind: :data:`BOX_TABLE` (``loss.box``), :data:`CLS_TABLE`
(``loss.cls``) and :data:`SEG_TABLE` (``loss.seg``), name → loss function.

``params.BOX_LOSSES`` / ``CLS_LOSSES`` / ``SEG_LOSSES`` (the names validation accepts; ``default``
added for box and cls: the model's own loss) are read from these tables, and which rows a family
accepts is in :mod:`trainables.families`. How a choice reaches each model is
:mod:`trainables.losses`. No torch import at module level (validation imports the tables through
:mod:`trainables.params`): each function imports what it computes with.

All box rows sum over boxes; each family divides by its own normaliser (as torchvision does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

IGNORE_INDEX = 255  # semantic masks: pixels that count for nothing


# ---------------------------------------------------------------- box and classification rows


def _smooth_l1(pred: Tensor, target: Tensor) -> Tensor:
    import torch.nn.functional as F

    return F.smooth_l1_loss(pred, target, beta=1.0, reduction="sum")


def _l1(pred: Tensor, target: Tensor) -> Tensor:
    import torch.nn.functional as F

    return F.l1_loss(pred, target, reduction="sum")


def _giou(pred: Tensor, target: Tensor) -> Tensor:
    from torchvision.ops import generalized_box_iou_loss

    return generalized_box_iou_loss(pred, target, reduction="sum", eps=1e-7)


def _diou(pred: Tensor, target: Tensor) -> Tensor:
    from torchvision.ops import distance_box_iou_loss

    return distance_box_iou_loss(pred, target, reduction="sum", eps=1e-7)


def _ciou(pred: Tensor, target: Tensor) -> Tensor:
    from torchvision.ops import complete_box_iou_loss

    return complete_box_iou_loss(pred, target, reduction="sum", eps=1e-7)


@dataclass(frozen=True)
class BoxLoss:
    """A box regression loss. ``on_boxes``: compare decoded XYXY boxes (IoU losses); otherwise
    compare the box coder's encoded offsets. ``fn(pred, target)`` returns the sum over boxes."""

    name: str
    on_boxes: bool
    fn: Callable[[Tensor, Tensor], Tensor]
    doc: str


def _ce_softmax(logits: Tensor, labels: Tensor, gamma: float, alpha: float) -> Tensor:
    import torch.nn.functional as F

    return F.cross_entropy(logits, labels, reduction="none")


def _ce_sigmoid(logits: Tensor, targets: Tensor, gamma: float, alpha: float) -> Tensor:
    import torch.nn.functional as F

    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none")


def softmax_focal(logits: Tensor, labels: Tensor, gamma: float, alpha: float) -> Tensor:
    """Per-sample softmax focal loss ``-a_t (1 - p_t)^gamma log p_t``.

    ``alpha`` weighs foreground samples (label > 0) and ``1 - alpha`` background (label 0), as
    the sigmoid focal loss weighs positives; a negative ``alpha`` turns weighting off.
    """
    import torch
    import torch.nn.functional as F

    logp = F.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    loss = -((1.0 - logp.exp()).clamp(min=0.0) ** gamma) * logp
    if alpha >= 0:
        loss = loss * torch.where(labels > 0, alpha, 1.0 - alpha)
    return loss


def _focal_sigmoid(logits: Tensor, targets: Tensor, gamma: float, alpha: float) -> Tensor:
    from torchvision.ops import sigmoid_focal_loss

    return sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")


@dataclass(frozen=True)
class ClsLoss:
    """A classification loss in two forms: ``softmax(logits[N,C], labels[N])`` → per-sample
    losses (R-CNN, SSD heads) and ``sigmoid(logits, one_hot)`` → element-wise losses (RetinaNet,
    FCOS heads). Both take ``(gamma, alpha)`` (ignored by ``ce``)."""

    name: str
    softmax: Callable[[Tensor, Tensor, float, float], Tensor]
    sigmoid: Callable[[Tensor, Tensor, float, float], Tensor]
    doc: str


BOX_TABLE: dict[str, BoxLoss] = {
    row.name: row
    for row in (
        BoxLoss("smooth_l1", False, _smooth_l1, "smooth L1 (beta 1) on encoded offsets"),
        BoxLoss("l1", False, _l1, "L1 on encoded offsets"),
        BoxLoss("giou", True, _giou, "generalized IoU loss on decoded boxes"),
        BoxLoss("diou", True, _diou, "distance IoU loss on decoded boxes"),
        BoxLoss("ciou", True, _ciou, "complete IoU loss on decoded boxes"),
    )
}

CLS_TABLE: dict[str, ClsLoss] = {
    row.name: row
    for row in (
        ClsLoss("ce", _ce_softmax, _ce_sigmoid, "cross-entropy (sigmoid heads: binary CE per class)"),
        ClsLoss("focal", softmax_focal, _focal_sigmoid, "focal loss with loss.focal_gamma/alpha"),
    )
}


# ---------------------------------------------------------------- semantic segmentation rows


def dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """``1 - mean_c soft-Dice(softmax(logits)_c, target == c)`` over non-ignored pixels."""
    import torch.nn.functional as F

    valid = (target != IGNORE_INDEX).unsqueeze(1)
    probs = logits.float().softmax(1) * valid
    onehot = F.one_hot(target.clamp(max=logits.size(1) - 1) * valid.squeeze(1), logits.size(1))
    onehot = onehot.permute(0, 3, 1, 2).to(probs.dtype) * valid
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return 1.0 - ((2 * inter + smooth) / (denom + smooth)).mean()


def _seg_ce(logits: Tensor, target: Tensor, params: dict[str, Any]) -> Tensor:
    import torch.nn.functional as F

    smoothing = float(params.get("loss.label_smoothing", 0.0))
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, label_smoothing=smoothing)


def _seg_ce_dice(logits: Tensor, target: Tensor, params: dict[str, Any]) -> Tensor:
    loss = _seg_ce(logits, target, params)
    return loss + float(params.get("loss.dice_weight", 1.0)) * dice_loss(logits, target)


def _seg_dice(logits: Tensor, target: Tensor, params: dict[str, Any]) -> Tensor:
    return dice_loss(logits, target)


def _seg_focal(logits: Tensor, target: Tensor, params: dict[str, Any]) -> Tensor:
    valid = (target != IGNORE_INDEX).reshape(-1)
    flat = logits.permute(0, 2, 3, 1).reshape(-1, logits.size(1))[valid]
    gamma, alpha = float(params.get("loss.focal_gamma", 2.0)), float(params.get("loss.focal_alpha", 0.25))
    return softmax_focal(flat, target.reshape(-1)[valid], gamma, alpha).mean()


# ``loss.seg``: name -> ``fn(logits, target, params)``, the mean over the non-ignored pixels
# (called only when some pixel is not ignored).
SEG_TABLE: dict[str, Callable[[Tensor, Tensor, dict[str, Any]], Tensor]] = {
    "ce": _seg_ce,
    "dice": _seg_dice,
    "focal": _seg_focal,
    "ce+dice": _seg_ce_dice,
}
