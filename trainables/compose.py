"""Composed models: any torchvision classification backbone under torchvision's own head classes.

``model.arch`` ``fasterrcnn`` / ``maskrcnn`` / ``retinanet`` / ``fcos`` (detection) or
``deeplabv3`` / ``fcn`` (semantic segmentation) with ``model.backbone: NAME`` (a model of
``torchvision.models.list_models(module=torchvision.models)``) builds, as torchvision's fine-tuning
tutorial does, the classifier's feature trunk under ``FasterRCNN``/``MaskRCNN``/``RetinaNet``/
``FCOS``/``DeepLabV3``/``FCN``, so losses, predictor replacement and exports treat it as they
treat the builders' models.

The trunk is the classifier's feature extractor flattened into *units*, its children in forward
order (module objects shared with the classifier, so its weights come along):
- ResNet/ResNeXt/Wide-ResNet, ShuffleNetV2: the model's children before ``avgpool``/``fc``;
- RegNet: ``stem`` and the blocks of ``trunk_output`` (``block1`` ...); MNASNet: ``layers.<i>``;
- the rest (MobileNetV2/V3, EfficientNet, ConvNeXt, VGG, DenseNet, AlexNet, SqueezeNet):
  ``features.<i>`` (DenseNet gets its functional final ReLU as a unit ``relu``).
Transformers (ViT, Swin, MaxViT: token or channels-last outputs) and GoogLeNet/Inception-v3 (input
transform, auxiliary branches) do not compose. The units' output strides and channels are read by
one forward of a meta tensor through them (:func:`units`); each unit that raises the stride is
marked ``_is_cn`` so :func:`trainables.freeze.backbone_stages` cuts the backbone at strides.
This module resolves and checks a composition (:func:`plan`); :mod:`trainables.compose_build`
builds the model from the plan.

Layout (the builders' one, so the family rows' prefixes apply): detection ``backbone.body.<unit>``
(``torchvision.models._utils.IntermediateLayerGetter``), ``backbone.fpn.`` (``BackboneWithFPN``
when ``fpn``), ``rpn.``/``roi_heads.`` or ``head.``; segmentation ``backbone.<unit>``,
``classifier.`` and ``aux_classifier.``.

Settings (``TrialConfig.model_kwargs["compose"]``, from the spec's ``model.*`` keys; see
:class:`Settings`) and their defaults (:func:`plan`):
- ``feature_layers``: unit names; detection with FPN: the last unit of each of the last 4 stride
  groups (R-CNN: strides 4-32, plus a max-pooled level) or 3 (RetinaNet/FCOS: strides 8-32, plus
  P6/P7); without FPN: the last unit (one map). Segmentation: ``[out]`` or ``[aux, out]``; default
  out = the last unit, aux (when ``aux_loss``) = the last unit of the stride group before out's.
- anchors per feature map of stride ``s`` (powers of two): R-CNN with FPN ``(8s,)``, RetinaNet with
  FPN ``(4s, 4s*2^(1/3), 4s*2^(2/3))``, FCOS ``(s,)``; without FPN (R-CNN/RetinaNet) the tutorial's
  ``(32, 64, 128, 256, 512)`` on the one map; aspect ratios ``(0.5, 1, 2)`` (FCOS ``(1,)``).
- RoI pooling (``MultiScaleRoIAlign`` over the feature maps, not the extra levels): box
  ``roi_output_size`` 7, ``roi_sampling_ratio`` 2; mask ``mask_roi_output_size`` 14.
- ``frozen_batchnorm``: the trunk's BatchNorm2d become FrozenBatchNorm2d (statistics copied), as
  torchvision does for pretrained backbones; None = when backbone weights are given.
- segmentation: bottleneck ResNets get torchvision's dilation (stride 8 at layer3/layer4).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights
from torchvision.models._api import WeightsEnum

from trainables.families import (
    SEMANTIC,
    Family,
    anchor_problem,
    default_feature_layer_count,
    feature_map_count,
)

COMPOSE_KEY = "compose"  # the key of TrialConfig.model_kwargs that holds the settings
PROBE = 256  # side of the meta tensor that measures the units' strides
UNSUPPORTED = {
    "vit_": "ViT outputs tokens, not feature maps",
    "swin_": "Swin's stages output channels-last maps",
    "maxvit": "MaxViT's blocks are not a plain feature trunk",
    "googlenet": "GoogLeNet transforms its input and has auxiliary branches",
    "inception": "Inception-v3 transforms its input and has auxiliary branches",
}
# Constructor arguments that the composition sets itself (never from model.kwargs).
RESERVED = (
    "backbone",
    "num_classes",
    "rpn_anchor_generator",
    "anchor_generator",
    "box_roi_pool",
    "mask_roi_pool",
    "weights",
    "weights_backbone",
    "progress",
)
RCNN_FAMILIES = ("fasterrcnn", "maskrcnn")
_BASIC = ("resnet18", "resnet34")


class ComposeError(ValueError):
    """A composition that cannot be built; ``key`` is the spec key path at fault."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


@dataclass(frozen=True)
class Unit:
    """One unit of a trunk: its name in the body, its module path in the classifier, the output
    stride (input side / output side at :data:`PROBE` px) and output channels."""

    name: str
    path: str
    stride: float
    channels: int


@dataclass(frozen=True)
class Settings:
    """The composition settings (None: the default of :func:`plan`)."""

    backbone: str
    fpn: bool | None = None
    feature_layers: tuple[str, ...] | None = None
    fpn_channels: int = 256
    anchor_sizes: tuple[tuple[float, ...], ...] | None = None
    aspect_ratios: tuple[Any, ...] | None = None  # flat (every map) or one tuple per map
    roi_output_size: int = 7
    roi_sampling_ratio: int = 2
    mask_roi_output_size: int = 14
    frozen_batchnorm: bool | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Settings:
        """Settings from the plain dict in ``model_kwargs["compose"]`` (lists become tuples)."""
        if not isinstance(d, dict) or "backbone" not in d:
            raise ComposeError("model.backbone", "a composed arch needs model.backbone (a classifier name)")
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ComposeError(
                f"model_kwargs.{COMPOSE_KEY}", f"unknown settings {bad}; known: {sorted(known)}"
            )
        kw = dict(d)
        if kw.get("feature_layers") is not None:
            kw["feature_layers"] = tuple(str(x) for x in kw["feature_layers"])
        if kw.get("anchor_sizes") is not None:
            kw["anchor_sizes"] = tuple(tuple(g) for g in kw["anchor_sizes"])
        if kw.get("aspect_ratios") is not None:
            kw["aspect_ratios"] = tuple(
                tuple(g) if isinstance(g, (list, tuple)) else g for g in kw["aspect_ratios"]
            )
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """Plain (YAML/JSON-friendly) form, the inverse of :meth:`from_dict`."""
        return _plain(asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------- backbones and their units


def backbones() -> list[str]:
    """Classification models that compose (``list_models(module=torchvision.models)`` less
    :data:`UNSUPPORTED`)."""
    names = torchvision.models.list_models(module=torchvision.models)
    return [n for n in names if not n.startswith(tuple(UNSUPPORTED))]


def _check_backbone(name: str) -> None:
    for prefix, why in UNSUPPORTED.items():
        if name.startswith(prefix):
            raise ComposeError("model.backbone", f"{name!r} does not compose: {why}")
    if name not in backbones():
        raise ComposeError(
            "model.backbone", f"unknown classification backbone {name!r}; known: {', '.join(backbones())}"
        )


def backbone_weights_enum(name: str) -> type[WeightsEnum]:
    """The weights enum of a classification backbone (``get_model_weights``)."""
    _check_backbone(name)
    return get_model_weights(name)


def _builder_kwargs(name: str, task: str) -> dict[str, Any]:
    """Segmentation over a bottleneck ResNet: torchvision's dilated layer3/layer4 (stride 8);
    resnet18/34's BasicBlock cannot dilate."""
    if task == SEMANTIC and name.startswith(("resnet", "resnext", "wide_resnet")) and name not in _BASIC:
        return {"replace_stride_with_dilation": [False, True, True]}
    return {}


def classifier(name: str, task: str, weights: WeightsEnum | None = None, meta: bool = False) -> nn.Module:
    """The classification model (eval mode not set). ``meta``: on the meta device (no memory);
    builders that compute with tensors while building (RegNet) are built on the CPU, then moved."""
    _check_backbone(name)
    kwargs = _builder_kwargs(name, task)
    if not meta:
        return get_model(name, weights=weights, **kwargs)
    try:
        with torch.device("meta"):
            return get_model(name, weights=None, **kwargs)
    except (NotImplementedError, RuntimeError):
        return get_model(name, weights=None, **kwargs).to("meta")


def trunk_units(name: str, model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """``(unit name, path in the classifier, module)`` in forward order."""
    if hasattr(model, "trunk_output"):  # RegNet
        return [("stem", "stem", model.stem)] + [
            (n, f"trunk_output.{n}", c) for n, c in model.trunk_output.named_children()
        ]
    if hasattr(model, "layer1") or name.startswith("shufflenet"):
        return [(n, n, c) for n, c in model.named_children() if n not in ("avgpool", "fc")]
    if name.startswith("mnasnet"):
        return [(n, f"layers.{n}", c) for n, c in model.layers.named_children()]
    units = [(n, f"features.{n}", c) for n, c in model.features.named_children()]
    if name.startswith("densenet"):  # DenseNet.forward applies F.relu after features
        units.append(("relu", "relu", nn.ReLU(inplace=False)))
    return units


@functools.cache
def units(name: str) -> tuple[Unit, ...]:
    """The trunk's units with output strides and channels (one meta forward, cached)."""
    model = classifier(name, "detection", meta=True).eval()
    x = torch.empty(1, 3, PROBE, PROBE, device="meta")
    out = []
    for unit, path, module in trunk_units(name, model):
        x = module(x)
        if x.dim() != 4:
            raise ComposeError("model.backbone", f"{name}'s unit {path} does not output a feature map")
        out.append(Unit(unit, path, PROBE / x.shape[-1], int(x.shape[1])))
    return tuple(out)


def _groups(us: tuple[Unit, ...]) -> list[list[Unit]]:
    """Units grouped by output stride, in order (a group starts where the stride rises)."""
    groups: list[list[Unit]] = []
    for u in us:
        if groups and u.stride <= groups[-1][-1].stride * 1.01:
            groups[-1].append(u)
        else:
            groups.append([u])
    return groups


def _pow2(stride: float) -> int:
    return 2 ** round(math.log2(stride))


# ---------------------------------------------------------------- the plan (validated, defaults filled)


@dataclass(frozen=True)
class Plan:
    """A composition with every default filled in and every count checked."""

    arch: str
    family: Family
    settings: Settings
    fpn: bool
    layers: tuple[str, ...]  # detection: feature layers; segmentation: (out,) or (aux, out)
    channels: tuple[int, ...]
    strides: tuple[float, ...]
    anchor_sizes: tuple[tuple[float, ...], ...] | None
    aspect_ratios: tuple[tuple[float, ...], ...] | None
    aux: bool

    def describe(self) -> dict[str, Any]:
        """What was built, for the build info and logs."""
        s, rcnn = self.settings, self.family.name in RCNN_FAMILIES
        return _plain(
            {
                "backbone": s.backbone,
                "fpn": self.fpn,
                "feature_layers": self.layers,
                "channels": self.channels,
                "strides": [_pow2(st) for st in self.strides],
                "anchor_sizes": self.anchor_sizes,
                "aspect_ratios": self.aspect_ratios,
                "fpn_channels": s.fpn_channels if self.fpn else None,
                "roi_output_size": s.roi_output_size if rcnn else None,
                "roi_sampling_ratio": s.roi_sampling_ratio if rcnn else None,
                "mask_roi_output_size": s.mask_roi_output_size if self.family.name == "maskrcnn" else None,
                "aux": self.aux,
            }
        )


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def plan(arch: str, family: Family, settings: Settings, aux: bool = False) -> Plan:
    """Resolve the defaults of ``settings`` for ``arch`` and check them (ComposeError with the key)."""
    s = settings
    _check_backbone(s.backbone)
    us = units(s.backbone)
    by_name = {u.name: u for u in us}
    order = {u.name: i for i, u in enumerate(us)}
    semantic = family.task == SEMANTIC
    fpn = (not semantic) if s.fpn is None else bool(s.fpn)
    if semantic and fpn:
        raise ComposeError("model.fpn", f"{arch} compositions take no FPN (segmentation heads read one map)")
    if fpn and s.fpn_channels < 1:
        raise ComposeError("model.fpn_channels", f"must be >= 1, but got {s.fpn_channels}")
    groups = _groups(us)
    if s.feature_layers is not None:
        layers = tuple(s.feature_layers)
        if not layers:
            raise ComposeError("model.feature_layers", "lists no unit")
        for name in layers:
            if name not in by_name:
                raise ComposeError(
                    "model.feature_layers",
                    f"{name!r} is not a unit of {s.backbone}; its units: {', '.join(by_name)}",
                )
        if any(order[a] >= order[b] for a, b in zip(layers, layers[1:], strict=False)):
            raise ComposeError(
                "model.feature_layers", f"list the units in forward order, without repeats: {list(layers)}"
            )
    elif semantic:
        layers = (us[-1].name,)
    else:
        k = default_feature_layer_count(family, fpn)
        layers = tuple(g[-1].name for g in groups[-k:])
    if semantic:
        layers = _semantic_layers(arch, groups, layers, aux)
    chosen = [by_name[n] for n in layers]
    _check_group_norm(family, fpn, s, chosen)
    sizes = ratios = None
    if not semantic:
        problem = anchor_problem(
            family,
            fpn,
            len(layers),
            None if s.anchor_sizes is None else [list(g) for g in s.anchor_sizes],
            None if s.aspect_ratios is None else list(s.aspect_ratios),
        )
        if problem:
            raise ComposeError(*problem)
        sizes, ratios = _anchors(family, fpn, chosen, s)
    if family.name in RCNN_FAMILIES:
        for key in ("roi_output_size", "roi_sampling_ratio", "mask_roi_output_size"):
            if getattr(s, key) < (0 if key == "roi_sampling_ratio" else 1):
                raise ComposeError(f"model.{key}", f"must be positive, but got {getattr(s, key)}")
    return Plan(
        arch=arch,
        family=family,
        settings=s,
        fpn=fpn,
        layers=layers,
        channels=tuple(u.channels for u in chosen),
        strides=tuple(u.stride for u in chosen),
        anchor_sizes=sizes,
        aspect_ratios=ratios,
        aux=semantic and aux,
    )


def _semantic_layers(arch: str, groups: list[list[Unit]], layers: tuple[str, ...], aux: bool) -> tuple:
    """``[out]`` or ``[aux, out]``: the aux unit defaults to the last of the group before out's; one
    listed without ``aux_loss`` would be dropped without a word (and loss.aux_weight do nothing)."""
    if len(layers) > 2:
        raise ComposeError(
            "model.feature_layers", f"{arch} takes [out] or [aux, out], but got {list(layers)}"
        )
    if not aux and len(layers) == 2:
        raise ComposeError(
            "model.feature_layers",
            f"{list(layers)} names an aux unit, but model.kwargs.aux_loss is not true, so the aux head "
            "would not exist; set model.kwargs.aux_loss: true, or list only the out unit",
        )
    if aux and len(layers) == 1:
        out_group = next(i for i, g in enumerate(groups) if any(u.name == layers[0] for u in g))
        if out_group == 0:
            raise ComposeError("model.feature_layers", f"no unit before {layers[0]!r} to feed the aux head")
        layers = (groups[out_group - 1][-1].name, layers[0])
    return layers


def _check_group_norm(family: Family, fpn: bool, s: Settings, chosen: list[Unit]) -> None:
    """FCOS's head normalises with GroupNorm(32, C): its input channels (fpn_channels, or the one
    feature map's) must be a multiple of 32 (torch said "num_channels must be divisible by
    num_groups", which read as a model.kwargs fault)."""
    if family.name != "fcos":
        return
    channels = s.fpn_channels if fpn else chosen[-1].channels
    if channels % 32:
        key = "model.fpn_channels" if fpn else "model.feature_layers"
        where = "fpn_channels" if fpn else f"the feature map of {chosen[-1].name!r}"
        raise ComposeError(
            key,
            f"fcos's head normalises with GroupNorm(32, C), but {where} gives C = {channels}, not a "
            "multiple of 32; use fpn: true with fpn_channels a multiple of 32 (256 by default), or "
            "another feature layer",
        )


def _anchors(family: Family, fpn: bool, chosen: list[Unit], s: Settings):
    n_maps = feature_map_count(family, fpn, len(chosen))
    strides = [_pow2(u.stride) for u in chosen]
    strides += [strides[-1] * 2 ** (i + 1) for i in range(n_maps - len(strides))]
    name = family.name
    if s.anchor_sizes is not None:
        sizes = tuple(tuple(_num(x) for x in g) for g in s.anchor_sizes)
    elif name == "fcos":
        sizes = tuple((st,) for st in strides)
    elif not fpn:
        sizes = ((32, 64, 128, 256, 512),)
    elif name in RCNN_FAMILIES:
        sizes = tuple((8 * st,) for st in strides)
    else:  # retinanet: three octave scales per level, as torchvision's _default_anchorgen
        sizes = tuple((4 * st, int(4 * st * 2 ** (1 / 3)), int(4 * st * 2 ** (2 / 3))) for st in strides)
    r = s.aspect_ratios
    if r is None:
        ratios = tuple(((1.0,) if name == "fcos" else (0.5, 1.0, 2.0)) for _ in range(n_maps))
    elif all(isinstance(g, (list, tuple)) for g in r):
        ratios = tuple(tuple(float(x) for x in g) for g in r)
    else:
        ratios = tuple(tuple(float(x) for x in r) for _ in range(n_maps))
    return sizes, ratios
