"""Loss choices applied to torchvision models, and the semantic-segmentation loss terms.

The rows (name → loss function) are the tables of :mod:`trainables.loss_table`; which a family
accepts is in :mod:`trainables.families`. ``default`` always means "the model's own loss, untouched".

How a choice reaches each family (:func:`apply_losses`):
- Faster/Mask R-CNN: ``roi_heads`` becomes :class:`RoIHeadsWithLosses` (same state, class
  swapped in place) which recomputes ``loss_classifier``/``loss_box_reg`` of the second stage from
  the sampled proposals; the RPN keeps its own losses.
- RetinaNet: box losses via the regression head's native ``_loss_type``; classification via
  :class:`RetinaNetClsHeadWithLosses` (sigmoid rows).
- FCOS: ``head`` becomes :class:`FCOSHeadWithLosses`; SSD/SSDlite: the model becomes
  :class:`SSDWithLosses` (softmax rows, before hard negative mining).
Swapping ``__class__`` keeps every parameter, buffer and state-dict key as it was.
Box offsets are decoded in float32 (bf16/fp16 autocast would round the decoded coordinates).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetClassificationHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.ssd import SSD

from trainables.families import Family
from trainables.loss_table import BOX_TABLE, CLS_TABLE, IGNORE_INDEX, SEG_TABLE
from trainables.params import LOSS_WEIGHT_PREFIX, focal_acts


@dataclass(frozen=True)
class LossChoice:
    """The loss parameters one model computes with (``default`` = the model's own)."""

    box: str = "default"
    cls: str = "default"
    gamma: float = 2.0
    alpha: float = 0.25

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> LossChoice:
        return cls(
            box=params.get("loss.box", "default"),
            cls=params.get("loss.cls", "default"),
            gamma=float(params.get("loss.focal_gamma", 2.0)),
            alpha=float(params.get("loss.focal_alpha", 0.25)),
        )


# ---------------------------------------------------------------- per-family heads


class RoIHeadsWithLosses(RoIHeads):
    """R-CNN second stage computing the chosen ``loss_classifier`` / ``loss_box_reg``.

    It runs torchvision's forward unchanged, keeps what it sampled, and recomputes only the
    terms whose choice is not ``default`` (same normalisers: mean over sampled RoIs for the
    classifier, sum over positives / number of sampled RoIs for boxes).
    """

    loss_choice: LossChoice
    _samples: Any

    def select_training_samples(self, proposals, targets):  # noqa: ANN001, ANN201 (torchvision's)
        proposals, matched_idxs, labels, regression_targets = super().select_training_samples(
            proposals, targets
        )
        gt = []
        for t, idx in zip(targets, matched_idxs, strict=True):
            boxes = t["boxes"].to(proposals[0].dtype)
            if boxes.numel() == 0:
                boxes = boxes.new_zeros((1, 4))
            gt.append(boxes[idx])
        self._samples = (proposals, labels, regression_targets, gt)
        return proposals, matched_idxs, labels, regression_targets

    def forward(self, features, proposals, image_shapes, targets=None):  # noqa: ANN001, ANN201
        choice = self.loss_choice
        if not self.training or (choice.box == "default" and choice.cls == "default"):
            return super().forward(features, proposals, image_shapes, targets)
        captured: dict[str, Any] = {}
        handle = self.box_predictor.register_forward_hook(lambda m, i, o: captured.__setitem__("out", o))
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
        finally:
            handle.remove()
        class_logits, box_regression = captured["out"]
        props, labels, reg_targets, gt = (torch.cat(x, dim=0) for x in self._samples)
        self._samples = None
        if choice.cls != "default":
            row = CLS_TABLE[choice.cls]
            losses["loss_classifier"] = row.softmax(class_logits, labels, choice.gamma, choice.alpha).mean()
        if choice.box != "default":
            pos = torch.where(labels > 0)[0]
            deltas = box_regression.reshape(labels.numel(), -1, 4)[pos, labels[pos]].float()
            row = BOX_TABLE[choice.box]
            if row.on_boxes:
                value = row.fn(self.box_coder.decode_single(deltas, props[pos]), gt[pos])
            else:
                value = row.fn(deltas, reg_targets[pos])
            losses["loss_box_reg"] = value / labels.numel()
        return result, losses


class RetinaNetClsHeadWithLosses(RetinaNetClassificationHead):
    """RetinaNet classification head with a chosen sigmoid loss (sum over valid anchors /
    foreground count, as torchvision's)."""

    loss_choice: LossChoice

    def compute_loss(self, targets, head_outputs, matched_idxs):  # noqa: ANN001, ANN201
        choice = self.loss_choice
        row = CLS_TABLE[choice.cls]
        losses = []
        for tgt, logits, idx in zip(targets, head_outputs["cls_logits"], matched_idxs, strict=True):
            fg = idx >= 0
            onehot = torch.zeros_like(logits)
            onehot[fg, tgt["labels"][idx[fg]]] = 1.0
            valid = idx != self.BETWEEN_THRESHOLDS
            value = row.sigmoid(logits[valid], onehot[valid], choice.gamma, choice.alpha).sum()
            losses.append(value / max(1, int(fg.sum())))
        return sum(losses) / len(targets)


class FCOSHeadWithLosses(FCOSHead):
    """FCOS head with chosen classification/box losses (torchvision's compute_loss otherwise)."""

    loss_choice: LossChoice

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):  # noqa: ANN001, ANN201
        choice = self.loss_choice
        out = super().compute_loss(targets, head_outputs, anchors, matched_idxs)
        cls_t, box_t = [], []
        for tgt, idx in zip(targets, matched_idxs, strict=True):
            if len(tgt["labels"]) == 0:
                c = tgt["labels"].new_zeros((len(idx),))
                b = tgt["boxes"].new_zeros((len(idx), 4))
            else:
                c = tgt["labels"][idx.clip(min=0)]
                b = tgt["boxes"][idx.clip(min=0)]
            c = c.clone()
            c[idx < 0] = -1
            cls_t.append(c)
            box_t.append(b)
        cls_t, box_t, anchors_t = torch.stack(cls_t), torch.stack(box_t), torch.stack(anchors)
        fg = cls_t >= 0
        n_fg = max(1, int(fg.sum()))
        if choice.cls != "default":
            logits = head_outputs["cls_logits"]
            onehot = torch.zeros_like(logits)
            onehot[fg, cls_t[fg]] = 1.0
            row = CLS_TABLE[choice.cls]
            out["classification"] = row.sigmoid(logits, onehot, choice.gamma, choice.alpha).sum() / n_fg
        if choice.box != "default":
            row = BOX_TABLE[choice.box]
            reg = head_outputs["bbox_regression"].float()  # decode in float32 (AMP), as torchvision does
            if row.on_boxes:
                value = row.fn(self.box_coder.decode(reg, anchors_t)[fg], box_t[fg])
            else:
                value = row.fn(reg[fg], self.box_coder.encode(anchors_t, box_t)[fg])
            out["bbox_regression"] = value / n_fg
        return out


class SSDWithLosses(SSD):
    """SSD/SSDlite with chosen losses; hard negative mining (``neg_to_pos_ratio``) unchanged."""

    loss_choice: LossChoice

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):  # noqa: ANN001, ANN201
        choice = self.loss_choice
        if choice.box == "default" and choice.cls == "default":
            return super().compute_loss(targets, head_outputs, anchors, matched_idxs)
        box_row = BOX_TABLE.get(choice.box)
        reg_all, logits = head_outputs["bbox_regression"], head_outputs["cls_logits"]
        num_fg, box_losses, cls_targets = 0, [], []
        for tgt, reg, anc, idx in zip(targets, reg_all, anchors, matched_idxs, strict=True):
            fg = torch.where(idx >= 0)[0]
            fg_idx = idx[fg]
            num_fg += fg_idx.numel()
            gt_boxes, reg, anc = tgt["boxes"][fg_idx], reg[fg, :].float(), anc[fg, :]
            if box_row is not None and box_row.on_boxes:
                box_losses.append(box_row.fn(self.box_coder.decode_single(reg, anc), gt_boxes))
            else:  # default is torchvision's smooth L1 (beta 1) on offsets, the same as the row
                fn = BOX_TABLE["smooth_l1"].fn if box_row is None else box_row.fn
                box_losses.append(fn(reg, self.box_coder.encode_single(gt_boxes, anc)))
            c = torch.zeros((logits.size(1),), dtype=tgt["labels"].dtype, device=tgt["labels"].device)
            c[fg] = tgt["labels"][fg_idx]
            cls_targets.append(c)
        cls_targets = torch.stack(cls_targets)
        n_cls = logits.size(-1)
        cls_row = CLS_TABLE["ce" if choice.cls == "default" else choice.cls]
        flat = cls_row.softmax(logits.reshape(-1, n_cls), cls_targets.reshape(-1), choice.gamma, choice.alpha)
        cls_loss = flat.reshape(cls_targets.size())
        foreground = cls_targets > 0
        num_negative = self.neg_to_pos_ratio * foreground.sum(1, keepdim=True)
        negative_loss = cls_loss.clone()
        negative_loss[foreground] = -float("inf")
        _, order = negative_loss.sort(1, descending=True)
        background = order.sort(1)[1] < num_negative
        n = max(1, num_fg)
        return {
            "bbox_regression": torch.stack(box_losses).sum() / n,
            "classification": (cls_loss[foreground].sum() + cls_loss[background].sum()) / n,
        }


# ---------------------------------------------------------------- applying and summing


def apply_losses(model: nn.Module, family: Family, params: dict[str, Any]) -> dict[str, Any]:
    """Make ``model`` compute the losses chosen in ``params``; returns what was applied.

    Assumes the model is a torchvision builder's output of ``family``. Raises ValueError for a
    choice the family does not list (validation should have rejected it earlier).
    """
    choice = LossChoice.from_params(params)
    tuned = (choice.gamma, choice.alpha) != (2.0, 0.25)  # torchvision's own focal loss is fixed there
    if choice.cls == "default" and family.default_cls == "focal" and tuned:
        choice = replace(choice, cls="focal")
    checks = (("loss.box", choice.box, family.box_losses), ("loss.cls", choice.cls, family.cls_losses))
    for key, value, allowed in checks:
        if value != "default" and value not in allowed:
            raise ValueError(f"{family.name} cannot use {key} {value!r}; it accepts {['default', *allowed]}")
    applied = {"box": choice.box, "cls": choice.cls}
    if focal_acts({"loss.cls": choice.cls}, family.task, family.default_cls):
        applied |= {"focal_gamma": choice.gamma, "focal_alpha": choice.alpha}
    if choice.box == "default" and choice.cls == "default":
        return applied
    name = family.name
    if name in ("fasterrcnn", "maskrcnn"):
        _swap_class(model.roi_heads, RoIHeadsWithLosses, choice)
    elif name == "retinanet":
        if choice.box != "default":
            model.head.regression_head._loss_type = choice.box
        if choice.cls != "default":
            _swap_class(model.head.classification_head, RetinaNetClsHeadWithLosses, choice)
    elif name == "fcos":
        _swap_class(model.head, FCOSHeadWithLosses, choice)
    elif name in ("ssd", "ssdlite"):
        _swap_class(model, SSDWithLosses, choice)
    else:  # pragma: no cover - guarded by the family's empty tables
        raise ValueError(f"{name} has no box/classification losses to choose")
    return applied


TRAINING_ONLY = (RoIHeadsWithLosses, RetinaNetClsHeadWithLosses, FCOSHeadWithLosses, SSDWithLosses)


def evaluation_repr(model: nn.Module) -> str:
    """``repr(model)`` with each of :data:`TRAINING_ONLY` named as the torchvision class it
    extends: in evaluation they run that class's forward, so a model that differs only in its
    training losses evaluates the same (what the base-evaluation cache keys on)."""
    text = repr(model)
    for cls in TRAINING_ONLY:
        text = text.replace(f"{cls.__name__}(", f"{cls.__bases__[0].__name__}(")
    return text


def _swap_class(module: nn.Module, cls: type, choice: LossChoice) -> None:
    if not isinstance(module, cls.__mro__[1]):
        raise TypeError(f"expected a {cls.__mro__[1].__name__}, got {type(module).__name__}")
    module.__class__ = cls
    module.loss_choice = choice


def weighted_total(loss_dict: dict[str, Tensor], params: dict[str, Any]) -> Tensor:
    """Sum of ``loss.weight.<term> * value`` over the loss dict (weight 1 when not given).

    ``loss_aux`` (semantic models with an auxiliary classifier) is also multiplied by
    ``loss.aux_weight``. Raises ValueError on an empty dict.
    """
    if not loss_dict:
        raise ValueError("empty loss dict: the model computed no loss")
    total = None
    for term, value in loss_dict.items():
        weight = float(params.get(LOSS_WEIGHT_PREFIX + term, 1.0))
        if term == "loss_aux":
            weight *= float(params.get("loss.aux_weight", 0.5))
        part = value * weight
        total = part if total is None else total + part
    return total


# ---------------------------------------------------------------- semantic segmentation


def _seg_loss(logits: Tensor, target: Tensor, params: dict[str, Any]) -> Tensor:
    kind = params.get("loss.seg", "ce")
    valid = target != IGNORE_INDEX
    if not bool(valid.any()):
        return logits.sum() * 0.0
    if kind not in SEG_TABLE:
        raise ValueError(f"unknown loss.seg {kind!r}")
    return SEG_TABLE[kind](logits, target, params)


def semantic_losses(outputs: dict[str, Tensor], target: Tensor, params: dict[str, Any]) -> dict[str, Tensor]:
    """Loss terms of a torchvision segmentation model's output dict (``out``, optional ``aux``)
    against ``target`` (B x H x W int64, 255 = ignore): ``loss_seg`` and, with an auxiliary
    classifier, ``loss_aux`` (unweighted; :func:`weighted_total` applies ``loss.aux_weight``)."""
    out = {"loss_seg": _seg_loss(outputs["out"], target, params)}
    if outputs.get("aux") is not None:
        out["loss_aux"] = _seg_loss(outputs["aux"], target, params)
    return out
