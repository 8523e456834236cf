"""Building a composed model from its :class:`trainables.compose.Plan`: the trunk, the neck (FPN or
one map), torchvision's head class; where a backbone weights file's tensors land; FrozenBatchNorm2d.

The layout and settings are described in :mod:`trainables.compose`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.segmentation import DeepLabV3
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCN, FCNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from trainables.compose import RCNN_FAMILIES, RESERVED, ComposeError, Plan, trunk_units, units
from trainables.families import SEMANTIC, Family


class BackboneNoFPN(nn.Module):
    """One feature map from the trunk (``body`` returns ``{"0": map}``); ``out_channels`` for the
    heads. The tutorial's ``backbone = mobilenet_v2().features`` in the layout the families know."""

    def __init__(self, trunk: nn.Module, layer: str, channels: int):
        super().__init__()
        self.body = IntermediateLayerGetter(trunk, {layer: "0"})
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.body(x)


def trunk(name: str, model: nn.Module) -> nn.Sequential:
    """The classifier's units as one Sequential (the modules are shared, not copied); units that
    raise the stride are marked ``_is_cn`` (freeze stages)."""
    info = units(name)
    seq = nn.Sequential(OrderedDict((u, m) for u, _, m in trunk_units(name, model)))
    prev = None
    for u in info:
        if prev is not None and u.stride > prev * 1.01:
            seq.get_submodule(u.name)._is_cn = True
        prev = u.stride
    return seq


def freeze_batchnorm(module: nn.Module) -> list[str]:
    """Replace every BatchNorm2d (exact type, with running statistics) by a FrozenBatchNorm2d holding
    the same affine parameters, statistics and eps. Returns the replaced module paths."""
    done = []
    for path, bn in list(module.named_modules()):
        if type(bn) is not nn.BatchNorm2d or bn.running_mean is None:
            continue
        frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
        with torch.no_grad():
            frozen.weight = bn.weight.detach().clone() if bn.affine else torch.ones_like(bn.running_mean)
            frozen.bias = bn.bias.detach().clone() if bn.affine else torch.zeros_like(bn.running_mean)
            frozen.running_mean = bn.running_mean.detach().clone()
            frozen.running_var = bn.running_var.detach().clone()
        parent_path, _, child = path.rpartition(".")
        setattr(module.get_submodule(parent_path) if parent_path else module, child, frozen)
        done.append(path)
    return done


def check_kwargs(family: Family, kwargs: dict[str, Any]) -> None:
    """model.kwargs a composition refuses: its own arguments; segmentation takes only aux_loss."""
    bad = [k for k in RESERVED if k in kwargs]
    if bad:
        raise ComposeError("model.kwargs", f"must not set {bad}: the composition sets them from the spec")
    if family.task == SEMANTIC:
        extra = sorted(set(kwargs) - {"aux_loss"})
        if extra:
            raise ComposeError(
                "model.kwargs", f"a {family.name} composition takes only aux_loss, but got {extra}"
            )


def assemble(p: Plan, clf: nn.Module, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """The composed model over the classifier ``clf`` (its trunk modules are used in place).
    ``kwargs``: the head class's keyword arguments (min_size, box_score_thresh, ...)."""
    check_kwargs(p.family, kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k != "aux_loss"}
    body = trunk(p.settings.backbone, clf)
    name = p.family.name
    if p.family.task == SEMANTIC:
        out_layer = p.layers[-1]
        ret = {out_layer: "out"} | ({p.layers[0]: "aux"} if p.aux else {})
        backbone = IntermediateLayerGetter(body, ret)
        aux = FCNHead(p.channels[0], num_classes) if p.aux else None
        if name == "deeplabv3":
            return DeepLabV3(backbone, DeepLabHead(p.channels[-1], num_classes), aux)
        return FCN(backbone, FCNHead(p.channels[-1], num_classes), aux)
    names = [str(i) for i in range(len(p.layers))]
    if p.fpn:
        c = p.settings.fpn_channels
        extra = LastLevelMaxPool() if name in RCNN_FAMILIES else LastLevelP6P7(c, c)
        ret = dict(zip(p.layers, names, strict=True))
        backbone: nn.Module = BackboneWithFPN(body, ret, list(p.channels), c, extra_blocks=extra)
    else:
        backbone = BackboneNoFPN(body, p.layers[0], p.channels[0])
    anchors = AnchorGenerator(p.anchor_sizes, p.aspect_ratios)
    s = p.settings
    if name in RCNN_FAMILIES:
        roi = MultiScaleRoIAlign(names, s.roi_output_size, s.roi_sampling_ratio)
        if name == "maskrcnn":
            mask_roi = MultiScaleRoIAlign(names, s.mask_roi_output_size, s.roi_sampling_ratio)
            return MaskRCNN(
                backbone,
                num_classes,
                rpn_anchor_generator=anchors,
                box_roi_pool=roi,
                mask_roi_pool=mask_roi,
                **kwargs,
            )
        return FasterRCNN(backbone, num_classes, rpn_anchor_generator=anchors, box_roi_pool=roi, **kwargs)
    cls = RetinaNet if name == "retinanet" else FCOS
    return cls(backbone, num_classes, anchor_generator=anchors, **kwargs)


def key_prefixes(p: Plan) -> list[tuple[str, str]]:
    """``(classifier state-key prefix, composed-model prefix)`` of every trunk unit in use (units up
    to the last feature layer): where a backbone weights file's tensors land."""
    used = [u for u in units(p.settings.backbone)]
    last = max(i for i, u in enumerate(used) if u.name in p.layers)
    root = "backbone." if p.family.task == SEMANTIC else "backbone.body."
    return [(u.path + ".", f"{root}{u.name}.") for u in used[: last + 1]]


def trunk_state_keys(p: Plan, clf: nn.Module) -> list[str]:
    """The classifier's state keys that the composition uses (num_batches_tracked excluded)."""
    prefixes = tuple(src for src, _ in key_prefixes(p))
    return [k for k in clf.state_dict() if k.startswith(prefixes) and not k.endswith("num_batches_tracked")]
