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
Nothing here ever downloads.

Composed archs (``families.COMPOSED``: ``fasterrcnn``, ``retinanet``, ... with
``model_kwargs["compose"]``, see :mod:`trainables.compose`): ``weights_backbone`` is an enum member
of the backbone classifier's own enum (``get_model_weights(backbone)``, same hub-cache rules) or a
classifier state_dict file (every trunk tensor the composition uses must be there, by name and
shape; the classifier's head may differ); ``weights`` is a file only (a composed model's state or
our checkpoint); the other ``model_kwargs`` go to the head class (FasterRCNN, ...).
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import pickle
import re
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, get_args
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import get_model, get_model_builder, get_model_weights
from torchvision.models._api import WeightsEnum
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.misc import FrozenBatchNorm2d

from trainables import compose
from trainables.activations import swap_activations
from trainables.config import TrialConfig
from trainables.families import SEMANTIC, Family, composed_archs, family_of
from trainables.files import sha256_file
from trainables.losses import apply_losses
from trainables.norms import apply_norm

ENUM_NAME = re.compile(r"^(?:[A-Za-z0-9_]+_Weights\.)?[A-Z][A-Z0-9_]*$")
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")
_RESERVED_KWARGS = ("weights", "weights_backbone", "num_classes", "progress")
MIN_MATCH_FRACTION = 0.5


class WeightsError(Exception):
    """Base weights that cannot be used: not cached, unreadable, unsafe or not fitting the model."""


# ---------------------------------------------------------------- weights helpers


def is_enum_name(value: str) -> bool:
    """Whether a weights value names an enum member (else it is a file path)."""
    return bool(ENUM_NAME.fullmatch(value))


def backbone_weights_enum(arch: str) -> type[WeightsEnum] | None:
    """The enum class of a builder's ``weights_backbone`` argument (None: it takes none)."""
    param = inspect.signature(get_model_builder(arch)).parameters.get("weights_backbone")
    if param is None:
        return None
    ann = param.annotation
    for t in (ann, *get_args(ann)):
        if isinstance(t, type) and issubclass(t, WeightsEnum):
            return t
    return None


def resolve_enum(enum_cls: type[WeightsEnum], name: str) -> WeightsEnum:
    """The member of ``enum_cls`` called ``name`` (``DEFAULT`` included; ``<Enum>.`` prefix ok)."""
    key = name.split(".", 1)[1] if "." in name else name
    if "." in name and name.split(".", 1)[0] != enum_cls.__name__:
        raise WeightsError(f"{name!r} is not a member of {enum_cls.__name__}")
    try:
        return enum_cls[key]
    except KeyError:
        known = ["DEFAULT", *(m.name for m in enum_cls)]
        raise WeightsError(f"{enum_cls.__name__} has no weights {key!r}; known: {known}") from None


def hub_cache_path(member: WeightsEnum) -> Path:
    """Where torch hub keeps (and looks for) this member's file: ``<hub dir>/checkpoints/<name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(member.url).path)


def _safe_load(path: Path, what: str, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)``; any refusal becomes a WeightsError naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, AttributeError, ModuleNotFoundError) as exc:
        raise WeightsError(
            f"{what} {path} was refused by torch.load(weights_only=True) (it holds more than "
            f"tensors and plain containers; never load it unchecked): {str(exc).splitlines()[0]}"
        ) from None
    except RuntimeError as exc:
        if mmap and "mmap" in str(exc):
            return _safe_load(path, what, mmap=False)
        first = str(exc).splitlines()[0]
        raise WeightsError(f"{what} {path} is not a readable torch file: {first}") from None
    except (OSError, EOFError, ValueError) as exc:
        raise WeightsError(f"{what} {path} cannot be read: {exc}") from None


def cached_weights(member: WeightsEnum, what: str = "weights") -> tuple[Path, str]:
    """The cache file of an enum member (must exist, load with weights_only, match its hash)."""
    path = hub_cache_path(member)
    if not path.is_file():
        raise WeightsError(
            f"{what} {member!r} is not in the torch hub cache: expected the file {path} "
            f"(this machine never downloads; fetch {member.url} elsewhere and copy it to that path, "
            f"or set TORCH_HOME / torch.hub.set_dir to a cache that has it)"
        )
    sha = sha256_file(path)
    m = _HASH_IN_NAME.search(path.name)
    if m and not sha.startswith(m.group(1)):
        raise WeightsError(
            f"{what} {path} is damaged or a different file: its sha256 {sha[:12]}... does not start with "
            f"the {m.group(1)!r} in its name; replace it with {member.url}"
        )
    _safe_load(path, what, mmap=True)
    return path, sha


def load_state_file(path: str | Path, what: str = "weights file") -> dict[str, torch.Tensor]:
    """A state_dict from a file: plain, or the ``model`` entry of our checkpoint dict.

    Raises WeightsError when the file is missing, refused by ``weights_only`` or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what} {path} does not exist")
    obj = _safe_load(path, what)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise WeightsError(
            f"{what} {path} is neither a state_dict (a dict of tensors) nor a checkpoint with a 'model' entry"
        )
    return obj


# ---------------------------------------------------------------- building


def _family(arch: str) -> Family:
    fam = family_of(arch)
    if fam is None:
        raise ValueError(f"{arch!r} is not a supported architecture (no family in trainables.families)")
    return fam


def _kwargs(model_kwargs: dict[str, Any] | None, family: Family | None = None) -> dict[str, Any]:
    kwargs = dict(model_kwargs or {})
    bad = [k for k in _RESERVED_KWARGS if k in kwargs]
    if bad:
        raise ValueError(f"model kwargs must not set {bad}: they come from the spec's weights and the data")
    if family is not None and not family.composed and compose.COMPOSE_KEY in kwargs:
        raise ValueError(
            f"model kwargs {compose.COMPOSE_KEY!r} (model.backbone, ...) only apply to composed archs "
            f"({', '.join(composed_archs())}), not to the builder family {family.name}"
        )
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
        _load_trunk(p, clf, state, path)
    frozen = settings.frozen_batchnorm if settings.frozen_batchnorm is not None else wb is not None
    info["frozen_batchnorm"] = len(compose.freeze_batchnorm(clf)) if frozen else 0
    info["compose"] = p.describe()
    if meta:
        with torch.device("meta"):
            return compose.assemble(p, clf, num_classes, rest)
    return compose.assemble(p, clf, num_classes, rest)


def _load_trunk(p: compose.Plan, clf: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load a classifier state_dict file into ``clf``: every trunk tensor in use must be there."""
    own = clf.state_dict()
    keys = compose.trunk_state_keys(p, clf)
    missing = [k for k in keys if k not in state]
    mismatched = [k for k in keys if k in state and state[k].shape != own[k].shape]
    if missing or mismatched:
        raise WeightsError(
            f"backbone weights file {path} does not fit {p.settings.backbone}'s feature trunk: "
            f"{len(missing)} of its {len(keys)} tensors missing (e.g. {missing[:3]}), {len(mismatched)} "
            f"shape-mismatched (e.g. {mismatched[:3]}); give a {p.settings.backbone} classifier state_dict"
        )
    subset = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    clf.load_state_dict(subset, strict=False)


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


# ---------------------------------------------------------------- builder keyword arguments

# Keys that the ssdlite builder also forwards to ``mobilenet_v3_large(**kwargs)`` (torchvision 0.29:
# ``_mobilenet_v3_conf`` then ``MobileNetV3``). ``dropout`` reaches MobileNetV3 too, but only sets the
# dropout of its classifier, which the SSD feature extractor drops: ignored silently, so not listed.
_BACKBONE_KWARGS: dict[str, tuple[str, ...]] = {
    "ssdlite320_mobilenet_v3_large": ("width_mult", "dilated", "block"),
}
# Parameters of the chain that a link passes itself (by builder name or class name), so giving them
# again is a TypeError the build reports: SSD fixes its transform's size_divisible and fixed_size,
# the ssdlite builder the backbone's reduced_tail. (Module-valued arguments that v2 builders pass,
# such as rpn_head, are not listed: YAML cannot give a module.)
_SET_BY_CHAIN: dict[str, tuple[str, ...]] = {
    "SSD": ("size_divisible", "fixed_size"),
    "ssdlite320_mobilenet_v3_large": ("reduced_tail",),
}
# Keys a builder pops from its ``**kwargs`` itself (torchvision 0.29: lraspp refuses aux_loss=True).
_POPPED_KWARGS: dict[str, tuple[str, ...]] = {"lraspp_mobilenet_v3_large": ("aux_loss",)}
# The head class of each composed detection family (trainables.compose.assemble).
_COMPOSED_HEADS: dict[str, type[nn.Module]] = {
    "fasterrcnn": FasterRCNN,
    "maskrcnn": MaskRCNN,
    "retinanet": RetinaNet,
    "fcos": FCOS,
}


def _named(fn: Any, with_default_only: bool = False) -> set[str]:
    """The named parameters of ``fn`` (a function or a class: its ``__init__``), without ``self``,
    ``*args``/``**kwargs`` and, with ``with_default_only``, the required ones."""
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        name
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind in plain and name != "self" and not (with_default_only and p.default is p.empty)
    }


def _takes_var_kwargs(fn: Any) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


def _class_chain(cls: type) -> tuple[set[str], set[str]]:
    """``(used, reached)`` for a detection class: its ``__init__`` parameters and those of its
    bases as long as each ``__init__`` takes ``**kwargs`` (MaskRCNN passes them to FasterRCNN; a base
    without, such as GeneralizedRCNN, gets explicit arguments), then ``GeneralizedRCNNTransform``'s,
    where the last ``**kwargs`` end. *reached*: every such named parameter. *used*: those with a
    default, minus ``_SET_BY_CHAIN``: the required ones (backbone, anchor_generator, size; the
    transform's min_size, ...) are passed by the builder or the class, so only the names the class
    itself takes reach them (SSD takes image_mean, not min_size)."""
    used: set[str] = set()
    reached: set[str] = set()
    for base in cls.__mro__:
        if base is nn.Module or not issubclass(base, nn.Module):
            break
        if "__init__" not in base.__dict__:
            continue
        if not _takes_var_kwargs(base.__init__):
            if base is cls:  # nothing reaches a transform
                return _named(cls.__init__, with_default_only=True), _named(cls.__init__)
            break
        used |= _named(base.__init__, with_default_only=True)
        reached |= _named(base.__init__)
    used |= _named(GeneralizedRCNNTransform.__init__, with_default_only=True)
    reached |= _named(GeneralizedRCNNTransform.__init__)
    return used - set(_SET_BY_CHAIN.get(cls.__name__, ())), reached


@functools.cache
def _kwargs_chain(arch: str) -> tuple[frozenset[str], frozenset[str]] | None:
    """``(used, reached)`` names of ``arch``'s builder chain (see :func:`accepted_kwargs`); reached
    includes the names that the chain passes itself (a duplicate is a TypeError, not silence)."""
    fam = family_of(arch)
    if fam is None:
        return None
    if fam.composed:
        if fam.task == SEMANTIC:
            return frozenset({"aux_loss"}), frozenset({"aux_loss"})
        head = _COMPOSED_HEADS.get(fam.name)
        if head is None:
            return None
        used, reached = _class_chain(head)
        used -= set(compose.RESERVED)
    else:
        try:
            builder = get_model_builder(arch)
        except ValueError:
            return None
        used = _named(builder) | set(_POPPED_KWARGS.get(arch, ()))
        reached = set(used)
        if fam.task != SEMANTIC:
            cls = inspect.signature(builder).return_annotation
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
                return None
            cls_used, cls_reached = _class_chain(cls)
            set_here = set(_SET_BY_CHAIN.get(arch, ()))
            used |= (cls_used | set(_BACKBONE_KWARGS.get(arch, ()))) - set_here
            reached |= cls_reached | used | set_here
    reserved = {*_RESERVED_KWARGS, compose.COMPOSE_KEY}
    if not used - reserved:
        return None
    return frozenset(used - reserved), frozenset(reached - reserved)


def accepted_kwargs(arch: str) -> frozenset[str] | None:
    """The ``model_kwargs`` names that ``arch``'s builder chain really uses (found with
    :func:`inspect.signature` over the chain). None: the chain is unknown (not a builder of a
    family), so no check.

    Assumes torchvision 0.29's chains (read from its source):
    - detection/instance builders pass their ``**kwargs`` to the class of their return annotation
      (FasterRCNN, MaskRCNN, RetinaNet, FCOS, SSD), which passes its own to
      ``GeneralizedRCNNTransform``, where they end (unknown keys are dropped there without a word);
      ssdlite also forwards them to its MobileNetV3 backbone (``_BACKBONE_KWARGS``). Parameters that
      a link passes itself are not usable (``_SET_BY_CHAIN``; e.g. SSD fixes min_size/max_size);
    - semantic builders (deeplabv3_*, fcn_*, lraspp_*) forward nothing: their ``**kwargs`` are unused,
      so only their own named parameters count (``aux_loss``; lraspp pops ``aux_loss`` from its
      ``**kwargs`` and refuses ``True``);
    - composed archs (:mod:`trainables.compose`): the ``compose`` settings are checked there; the
      other kwargs go to the head class chain (FasterRCNN, ... as above), minus the arguments the
      composition sets itself (``compose.RESERVED``); segmentation compositions take only aux_loss.
    Reserved keys (weights, num_classes, progress, ``compose``) are never in the set. Module-valued
    parameters (rpn_head, head, ...) are listed, though YAML cannot give one, and some v2 builders
    pass them themselves (a TypeError the build reports).
    """
    chain = _kwargs_chain(arch)
    return None if chain is None else chain[0]


def ignored_kwargs(arch: str, model_kwargs: dict[str, Any] | None) -> list[str]:
    """The keys of ``model_kwargs`` that no named parameter of ``arch``'s builder chain receives, so
    a ``**kwargs`` swallows them and they are ignored silently (in the given order); [] when the
    chain is unknown. Not listed: keys that the build refuses itself, loudly (reserved keys,
    ``compose``, a composition's own arguments, and parameters the chain passes itself, such as
    SSD's min_size: a TypeError)."""
    chain = _kwargs_chain(arch)
    if chain is None:
        return []
    fam = family_of(arch)
    refused = {*_RESERVED_KWARGS, compose.COMPOSE_KEY, *(compose.RESERVED if fam.composed else ())}
    return [k for k in (model_kwargs or {}) if k not in chain[1] and k not in refused]


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


def _frozen_bn_like_file(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Replace BatchNorm2d by FrozenBatchNorm2d where the file has stats but no
    ``num_batches_tracked`` (it was saved from a FrozenBatchNorm2d). Returns the module paths."""
    changed = []
    for path, module in list(model.named_modules()):
        if type(module) is not nn.BatchNorm2d:
            continue
        if f"{path}.running_mean" in state and f"{path}.num_batches_tracked" not in state:
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, FrozenBatchNorm2d(module.num_features, eps=module.eps))
            changed.append(path)
    return changed


def _load_matching(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    own = model.state_dict()
    matched = [k for k in own if k in state and state[k].shape == own[k].shape]
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if len(matched) < MIN_MATCH_FRACTION * len(own):
        raise WeightsError(
            f"weights file {path} does not fit this model: only {len(matched)} of its {len(own)} state keys "
            f"match by name and shape (missing e.g. {missing[:3]}, unexpected e.g. {unexpected[:3]}, "
            f"shape-mismatched e.g. {mismatched[:3]}); refusing to start from a mostly random model"
        )
    subset = {k: state[k] for k in matched}
    meta = getattr(state, "_metadata", None)
    if meta is not None:
        subset = OrderedDict(subset)
        subset._metadata = meta  # type: ignore[attr-defined]
    model.load_state_dict(subset, strict=False)
    return {"matched": len(matched), "missing": missing, "unexpected": unexpected, "mismatched": mismatched}


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
    info["frozen_batchnorm"] = len(_frozen_bn_like_file(model, state))
    info.update(_load_matching(model, state, path))
    return model, pre_nc


def _backbone_from_file(
    arch: str, path: Path, kwargs: dict[str, Any], num_classes: int, info: dict
) -> nn.Module:
    """Hand a backbone state_dict file to the builder as its backbone enum's cached file."""
    enum_cls = backbone_weights_enum(arch)
    if enum_cls is None:
        raise WeightsError(f"{arch} takes no backbone weights, but weights_backbone is {str(path)!r}")
    state = load_state_file(path, "backbone weights file")
    info["backbone_sha256"] = sha256_file(path)
    member = enum_cls["DEFAULT"]
    old = torch.hub.get_dir()
    with tempfile.TemporaryDirectory(prefix="wb-") as tmp:
        target = Path(tmp) / "checkpoints" / os.path.basename(urlparse(member.url).path)
        target.parent.mkdir(parents=True)
        torch.save(state, target)
        torch.hub.set_dir(tmp)
        try:
            return get_model(arch, weights=None, weights_backbone=member, num_classes=num_classes, **kwargs)
        except RuntimeError as exc:
            raise WeightsError(
                f"backbone weights file {path} does not fit {enum_cls.__name__}'s architecture: "
                f"{str(exc).splitlines()[0]} ..."
            ) from None
        finally:
            torch.hub.set_dir(old)


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
    kwargs = _kwargs(cfg.model_kwargs, family)
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
    pre_nc = None
    if cfg.weights is not None and cfg.weights_backbone is not None:
        info["weights_backbone"] = f"ignored ({cfg.weights_backbone}): weights are given"
    if cfg.weights is None and family.composed:
        model = _composed(arch, family, kwargs, num_classes, cfg.weights_backbone, info)
    elif family.composed and is_enum_name(cfg.weights):
        raise WeightsError(
            f"{arch} composed over a backbone has no weight enum, but weights is {cfg.weights!r}: use "
            "weights_backbone (the backbone's enum or file) or a file of a composed model"
        )
    elif cfg.weights is None:
        wb = cfg.weights_backbone
        if wb is None:
            model = get_model(arch, weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
        elif is_enum_name(wb):
            enum_cls = backbone_weights_enum(arch)
            if enum_cls is None:
                raise WeightsError(f"{arch} takes no backbone weights, but weights_backbone is {wb!r}")
            member = resolve_enum(enum_cls, wb)
            path, info["backbone_sha256"] = cached_weights(member, "backbone weights")
            info["weights_backbone"] = f"enum:{member!r}"
            model = get_model(arch, weights=None, weights_backbone=member, num_classes=num_classes, **kwargs)
        else:
            info["weights_backbone"] = f"file:{wb}"
            model = _backbone_from_file(arch, Path(wb), kwargs, num_classes, info)
    elif is_enum_name(cfg.weights):
        member = resolve_enum(get_model_weights(arch), cfg.weights)
        path, info["sha256"] = cached_weights(member, "weights")
        info.update(weights=f"enum:{member!r}", weights_file=str(path))
        model = get_model(arch, weights=member, weights_backbone=None, **kwargs)
        pre_nc = len(member.meta["categories"])
    else:
        path = Path(cfg.weights)
        info.update(weights=f"file:{path}", weights_file=str(path))
        model, pre_nc = _from_file(arch, family, path, kwargs, num_classes, info)
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


# ---------------------------------------------------------------- class-dependent predictors


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
