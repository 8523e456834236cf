"""Class-dependent predictor layers: :func:`replace_predictors` gives a model fresh ones for a new
class count (torchvision's own initialisation), everything else keeps its values."""

from __future__ import annotations

import math

from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

from trainables.families import Family


def _conv_like(old: nn.Conv2d, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(
        old.in_channels,
        out_channels,
        old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        bias=old.bias is not None,
    )


def _init(layer: nn.Module, kind: str, std: float = 0.01, prior: float | None = None) -> nn.Module:
    if kind == "normal":
        nn.init.normal_(layer.weight, std=std)
    elif kind == "xavier":
        nn.init.xavier_uniform_(layer.weight)
    elif kind == "kaiming":
        nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
    if layer.bias is not None:
        nn.init.constant_(layer.bias, 0.0 if prior is None else -math.log((1 - prior) / prior))
    return layer


def replace_predictors(model: nn.Module, family: Family, num_classes: int) -> list[str]:
    """Fresh class-dependent layers for ``num_classes`` (torchvision's own initialisation);
    everything else keeps its values. Returns the replaced module paths."""
    name = family.name
    done: list[str] = []
    if name in ("fasterrcnn", "maskrcnn"):
        rh = model.roi_heads
        rh.box_predictor = FastRCNNPredictor(rh.box_predictor.cls_score.in_features, num_classes)
        done.append("roi_heads.box_predictor")
        if name == "maskrcnn":
            old = rh.mask_predictor.mask_fcn_logits
            rh.mask_predictor.mask_fcn_logits = _init(_conv_like(old, num_classes), "kaiming")
            done.append("roi_heads.mask_predictor.mask_fcn_logits")
    elif name in ("retinanet", "fcos"):
        head = model.head.classification_head
        new = _conv_like(head.cls_logits, head.num_anchors * num_classes)
        head.cls_logits = _init(new, "normal", std=0.01, prior=0.01)
        head.num_classes = num_classes
        done.append("head.classification_head.cls_logits")
    elif name in ("ssd", "ssdlite"):
        head = model.head.classification_head
        old_nc = head.num_columns
        for i, block in enumerate(head.module_list):
            if name == "ssd":
                new = _conv_like(block, block.out_channels // old_nc * num_classes)
                head.module_list[i] = _init(new, "xavier")
                done.append(f"head.classification_head.module_list.{i}")
            else:
                conv = block[1]
                block[1] = _init(_conv_like(conv, conv.out_channels // old_nc * num_classes), "normal", 0.03)
                done.append(f"head.classification_head.module_list.{i}.1")
        head.num_columns = num_classes
    elif name in ("deeplabv3", "fcn"):
        for attr in ("classifier", "aux_classifier"):
            seq = getattr(model, attr, None)
            if seq is not None:
                seq[4] = _conv_like(seq[4], num_classes)
                done.append(f"{attr}.4")
    elif name == "lraspp":
        for attr in ("low_classifier", "high_classifier"):
            setattr(model.classifier, attr, _conv_like(getattr(model.classifier, attr), num_classes))
            done.append(f"classifier.{attr}")
    else:  # pragma: no cover - every family in the table is handled above
        raise ValueError(f"no predictor replacement for family {name}")
    return done
