"""Building a model for a trial: torchvision builder, base weights, predictors, losses, activations.

Order (DESIGN.md): the base weights are loaded FIRST at the class count they were trained with,
THEN only the class-dependent predictor layers are replaced for ``num_classes`` (kept when the
counts are equal, e.g. a checkpoint of our own), then the loss choices and the activation swap.

Weights (``cfg.weights`` and ``cfg.weights_backbone``):
- ``None``: random init (the builders' own backbone default is overridden: nothing downloads);
- an enum member name (``DEFAULT``, ``COCO_V1``, also ``<Enum>.<NAME>``): the file must already
  be in the torch hub cache (``torch.hub.get_dir()/checkpoints/<file name of the URL>``), else
  :class:`WeightsError` gives that path and the URL. The file is checked with
  ``torch.load(weights_only=True)`` and against the hash prefix in its name, then the builder
  loads it (so torchvision's own conventions apply: FrozenBatchNorm, eps, aux classifiers);
- a file path: ``torch.load(weights_only=True)``; a plain state_dict or our checkpoint dict
  (``{"model": state_dict, ...}``). For ``weights`` at least half of the model's state keys must
  match by name and shape; BatchNorms that the file stores without ``num_batches_tracked`` (saved
  from FrozenBatchNorm2d) become FrozenBatchNorm2d. A ``weights_backbone`` file must fit the
  builder's backbone enum architecture exactly (it is handed to the builder via a temporary hub
  cache). ``weights`` given makes ``weights_backbone`` ignored, as in torchvision.
Nothing here ever downloads. The weights themselves (enum, file, hub cache) are handled by
:mod:`trainables.weights`, the class-dependent layers by :mod:`trainables.predictors`, the check of
``model_kwargs`` by :mod:`trainables.builder_kwargs`.

Composed archs (``families.COMPOSED``: ``fasterrcnn``, ``retinanet``, ... with
``model_kwargs["compose"]``, see :mod:`trainables.compose`): ``weights_backbone`` is an enum member
of the backbone classifier's own enum (``get_model_weights(backbone)``, same hub-cache rules) or a
classifier state_dict file (every trunk tensor the composition uses must be there, by name and
shape; the classifier's head may differ); ``weights`` is a file only (a composed model's state or
our checkpoint); the other ``model_kwargs`` go to the head class (FasterRCNN, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import get_model, get_model_weights

from trainables import compose, compose_build
from trainables.activations import swap_activations
from trainables.builder_kwargs import RESERVED_KWARGS
from trainables.config import TrialConfig
from trainables.families import SEMANTIC, Family, composed_archs, family_of
from trainables.files import sha256_file
from trainables.losses import apply_losses
from trainables.norms import apply_norm
from trainables.predictors import replace_predictors
from trainables.weights import (
    WeightsError,
    backbone_from_file,
    backbone_weights_enum,
    cached_weights,
    frozen_bn_like_file,
    is_enum_name,
    load_matching,
    load_state_file,
    load_trunk,
    resolve_enum,
)


def _family(arch: str) -> Family:
    fam = family_of(arch)
    if fam is None:
        raise ValueError(f"{arch!r} is not a supported architecture (no family in trainables.families)")
    return fam


def _kwargs(model_kwargs: dict[str, Any] | None, family: Family | None = None) -> dict[str, Any]:
    kwargs = dict(model_kwargs or {})
    bad = [k for k in RESERVED_KWARGS if k in kwargs]
    if bad:
        raise ValueError(f"model kwargs must not set {bad}: they come from the spec's weights and the data")
    if family is not None and not family.composed and compose.COMPOSE_KEY in kwargs:
        raise ValueError(
            f"model kwargs {compose.COMPOSE_KEY!r} (model.backbone, ...) only apply to composed archs "
            f"({', '.join(composed_archs())}), not to the builder family {family.name}"
        )
    return kwargs


RESIZING_FAMILIES = ("fasterrcnn", "maskrcnn", "retinanet", "fcos")  # GeneralizedRCNNTransform


def _builder_kwargs(cfg: TrialConfig, family: Family) -> dict[str, Any]:
    """The spec's ``model.kwargs`` for the builder, sized. R-CNN, RetinaNet and FCOS resize every
    image again (short side 800, long side at most 1333 by default): unless the kwargs size them,
    the network input is what the data made of it (long side ``data.image_size``; training keeps
    the scale jitter) and inference sizes an image the same way."""
    kwargs = _kwargs(cfg.model_kwargs, family)
    if family.name in RESIZING_FAMILIES and not {"min_size", "max_size"} & set(kwargs):
        size = cfg.image_size
        return kwargs | {"min_size": size, "max_size": size, "_skip_resize": True}
    return kwargs


def inference_kwargs(cfg: TrialConfig) -> dict[str, Any]:
    """The builder keyword arguments that give a trial's model in inference: the spec's, with the
    input size that :func:`build_model` adds (what a bundle records)."""
    kwargs = _builder_kwargs(cfg, _family(cfg.arch))
    kwargs.pop("_skip_resize", None)  # training only
    return kwargs


def _composed(
    arch: str,
    family: Family,
    kwargs: dict[str, Any],
    num_classes: int,
    weights_backbone: str | None,
    info: dict[str, Any],
    meta: bool = False,
) -> nn.Module:
    """A composed model: the backbone classifier (random, enum or file weights), FrozenBatchNorm2d
    when asked (default: when backbone weights are given), then torchvision's head class over it."""
    rest = dict(kwargs)
    settings = compose.Settings.from_dict(rest.pop(compose.COMPOSE_KEY, None))
    p = compose.plan(arch, family, settings, aux=bool(rest.get("aux_loss")))
    name, task = settings.backbone, family.task
    wb = weights_backbone
    if meta:
        clf = compose.classifier(name, task, meta=True)
    elif wb is None:
        clf = compose.classifier(name, task)
    elif is_enum_name(wb):
        member = resolve_enum(compose.backbone_weights_enum(name), wb)
        _, info["backbone_sha256"] = cached_weights(member, "backbone weights")
        info["weights_backbone"] = f"enum:{member!r}"
        clf = compose.classifier(name, task, weights=member)
    else:
        path = Path(wb)
        state = load_state_file(path, "backbone weights file")
        info["backbone_sha256"] = sha256_file(path)
        info["weights_backbone"] = f"file:{wb}"
        clf = compose.classifier(name, task)
        load_trunk(p, clf, state, path)
    frozen = settings.frozen_batchnorm if settings.frozen_batchnorm is not None else wb is not None
    info["frozen_batchnorm"] = len(compose_build.freeze_batchnorm(clf)) if frozen else 0
    info["compose"] = p.describe()
    if meta:
        with torch.device("meta"):
            return compose_build.assemble(p, clf, num_classes, rest)
    return compose_build.assemble(p, clf, num_classes, rest)


def skeleton(
    arch: str, num_classes: int, model_kwargs: dict[str, Any] | None = None, weights: str | None = None
) -> nn.Module:
    """The model on the meta device (no memory, no weights): parameter names and shapes.

    ``weights`` (optional) only matters for semantic families, whose pretrained enum builds add
    the auxiliary classifier (``aux_loss``) as torchvision does. Pretrained R-CNN/RetinaNet/FCOS
    backbones use FrozenBatchNorm2d (buffers, not parameters); the skeleton has BatchNorm2d.
    """
    fam = _family(arch)
    kwargs = _kwargs(model_kwargs, fam)
    if fam.composed:
        return _composed(arch, fam, kwargs, num_classes, None, {}, meta=True)
    if fam.task == SEMANTIC and weights is not None and is_enum_name(weights):
        kwargs.setdefault("aux_loss", True)
    with torch.device("meta"):
        return get_model(arch, weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)


def pretrained_num_classes(
    arch: str, family: Family, state: dict[str, torch.Tensor], kwargs: dict[str, Any]
) -> int | None:
    """The class count a state_dict was trained with, read from ``family.num_classes_key``."""
    tensor = state.get(family.num_classes_key)
    if tensor is None:
        return None
    per_class = skeleton(arch, 1, kwargs).state_dict()[family.num_classes_key].shape[0]
    if tensor.shape[0] % per_class:
        return None
    return tensor.shape[0] // per_class


def _from_file(
    arch: str, family: Family, path: Path, kwargs: dict[str, Any], num_classes: int, info: dict
) -> tuple[nn.Module, int | None]:
    state = load_state_file(path)
    info["sha256"] = sha256_file(path)
    pre_nc = pretrained_num_classes(arch, family, state, kwargs)
    if family.task == SEMANTIC and any(k.startswith("aux_classifier.") for k in state):
        kwargs.setdefault("aux_loss", True)
    if family.composed:
        model = _composed(arch, family, kwargs, pre_nc or num_classes, None, info)
    else:
        nc = pre_nc or num_classes
        model = get_model(arch, weights=None, weights_backbone=None, num_classes=nc, **kwargs)
    info["frozen_batchnorm"] = len(frozen_bn_like_file(model, state))
    info.update(load_matching(model, state, path, family.predictors))
    return model, pre_nc


def _base_model(
    arch: str, family: Family, cfg: TrialConfig, kwargs: dict[str, Any], num_classes: int, info: dict
) -> tuple[nn.Module, int | None]:
    """The model with its base weights (none, enum or file; ``weights`` before ``weights_backbone``)
    and the class count those weights were trained with (None: no class-dependent weights)."""
    if cfg.weights is None and family.composed:
        return _composed(arch, family, kwargs, num_classes, cfg.weights_backbone, info), None
    if family.composed and is_enum_name(cfg.weights):
        raise WeightsError(
            f"{arch} composed over a backbone has no weight enum, but weights is {cfg.weights!r}: use "
            "weights_backbone (the backbone's enum or file) or a file of a composed model"
        )
    if cfg.weights is None:
        return _with_backbone(arch, cfg.weights_backbone, kwargs, num_classes, info), None
    if is_enum_name(cfg.weights):
        member = resolve_enum(get_model_weights(arch), cfg.weights)
        path, info["sha256"] = cached_weights(member, "weights")
        info.update(weights=f"enum:{member!r}", weights_file=str(path))
        model = get_model(arch, weights=member, weights_backbone=None, **kwargs)
        return model, len(member.meta["categories"])
    path = Path(cfg.weights)
    info.update(weights=f"file:{path}", weights_file=str(path))
    return _from_file(arch, family, path, kwargs, num_classes, info)


def _with_backbone(
    arch: str, wb: str | None, kwargs: dict[str, Any], num_classes: int, info: dict
) -> nn.Module:
    """A builder's model without ``weights``: random, or its backbone from an enum or a file."""
    if wb is None:
        return get_model(arch, weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    if not is_enum_name(wb):
        info["weights_backbone"] = f"file:{wb}"
        return backbone_from_file(arch, Path(wb), kwargs, num_classes, info)
    enum_cls = backbone_weights_enum(arch)
    if enum_cls is None:
        raise WeightsError(f"{arch} takes no backbone weights, but weights_backbone is {wb!r}")
    member = resolve_enum(enum_cls, wb)
    _, info["backbone_sha256"] = cached_weights(member, "backbone weights")
    info["weights_backbone"] = f"enum:{member!r}"
    return get_model(arch, weights=None, weights_backbone=member, num_classes=num_classes, **kwargs)


def build_model(
    cfg: TrialConfig, params: dict[str, Any], num_classes: int
) -> tuple[nn.Module, dict[str, Any]]:
    """The trial's model on the CPU, and what was done to it (``info``).

    ``num_classes`` includes the background (K + 1). ``params`` is the full resolved dict
    (``loss.*``, ``activation``, ``activation_scope`` are read). info: ``arch, family, weights``
    (none | enum:<Enum.NAME> | file:<path>), ``weights_file, sha256, weights_backbone,
    backbone_sha256, pretrained_num_classes, matched, missing, unexpected, mismatched,
    predictors_replaced, losses, activations_replaced``; composed archs also ``compose`` (the
    resolved composition: backbone, feature layers, anchors, ...) and ``frozen_batchnorm``.
    """
    arch = cfg.arch
    family = _family(arch)
    kwargs = _builder_kwargs(cfg, family)
    info: dict[str, Any] = {
        "arch": arch,
        "family": family.name,
        "weights": "none",
        "weights_file": None,
        "sha256": None,
        "weights_backbone": "none",
        "backbone_sha256": None,
        "pretrained_num_classes": None,
        "missing": [],
        "unexpected": [],
        "mismatched": [],
        "predictors_replaced": [],
    }
    if cfg.weights is not None and cfg.weights_backbone is not None:
        info["weights_backbone"] = f"ignored ({cfg.weights_backbone}): weights are given"
    model, pre_nc = _base_model(arch, family, cfg, kwargs, num_classes, info)
    info["pretrained_num_classes"] = pre_nc
    if pre_nc is not None and pre_nc != num_classes:
        info["predictors_replaced"] = replace_predictors(model, family, num_classes)
    info["losses"] = apply_losses(model, family, params)
    info["activations_replaced"] = swap_activations(
        model, family, params.get("activation", "keep"), params.get("activation_scope", "heads")
    )
    info["norm"] = params.get("norm", "keep")
    info["norms_replaced"] = apply_norm(model, info["norm"])
    return model, info
