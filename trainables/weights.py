"""Base weights of a model: enum members in the torch hub cache, state_dict files, or none.

- an enum member name (``DEFAULT``, ``COCO_V1``, also ``<Enum>.<NAME>``): the file must already
  be in the torch hub cache (``torch.hub.get_dir()/checkpoints/<file name of the URL>``), else
  :class:`WeightsError` gives that path and the URL. The file is checked with
  ``torch.load(weights_only=True)`` and against the hash prefix in its name;
- a file path: ``torch.load(weights_only=True)``; a plain state_dict or our checkpoint dict
  (``{"model": state_dict, ...}``), see :func:`load_state_file`. BatchNorms that the file stores
  without ``num_batches_tracked`` (saved from FrozenBatchNorm2d) become FrozenBatchNorm2d
  (:func:`frozen_bn_like_file`); :func:`load_matching` needs half of the model's keys to fit.
Nothing here ever downloads. :mod:`trainables.models` decides which of these a build uses.
"""

from __future__ import annotations

import inspect
import os
import pickle
import re
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, get_args
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import get_model, get_model_builder
from torchvision.models._api import WeightsEnum
from torchvision.ops.misc import FrozenBatchNorm2d

from trainables.compose import Plan
from trainables.compose_build import trunk_state_keys
from trainables.files import sha256_file

ENUM_NAME = re.compile(r"^(?:[A-Za-z0-9_]+_Weights\.)?[A-Z][A-Z0-9_]*$")
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")
MIN_MATCH_FRACTION = 0.5


class WeightsError(Exception):
    """Base weights that cannot be used: not cached, unreadable, unsafe or not fitting the model.
    ``fix``: what to do instead, where the generic advice does not fit."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.fix = fix


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
        with warnings.catch_warnings():  # torch's warnings on a file it then refuses: the error says it
            warnings.simplefilter("ignore", UserWarning)
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
    """A state_dict from a file: plain, or the ``model`` entry of our checkpoint dict (a full one:
    a trainable-only checkpoint lacks the frozen tensors).

    Raises WeightsError when the file is missing, refused by ``weights_only`` or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what} {path} does not exist")
    obj = _safe_load(path, what)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        if obj.get("trainable_only") is True:
            raise WeightsError(
                f"{what} {path} is a trial's checkpoint that holds only its trained tensors (the frozen "
                "ones are its own base's), so the rest of a model built from it would stay random",
                "use full weights: `python -m search trial ... --weights-out FILE`, an export's weights, "
                "or a checkpoint of train.keep_full_checkpoint: true.",
            )
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise WeightsError(
            f"{what} {path} is neither a state_dict (a dict of tensors) nor a checkpoint with a 'model' entry"
        )
    return obj


def frozen_bn_like_file(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
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


def load_matching(
    model: nn.Module, state: dict[str, torch.Tensor], path: Path, predictors: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Load the tensors of ``state`` that fit ``model`` by name and shape; refuses a file where
    fewer than :data:`MIN_MATCH_FRACTION` of the model's keys fit. Returns the match counts, and as
    ``unfit`` the model's tensors the file does not give outside the class ``predictors`` (globs,
    replaced for the data's classes anyway): they stay random, so the model is not the file's."""
    import fnmatch

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
    unfit = [
        k
        for k in missing + mismatched
        if not k.endswith("num_batches_tracked") and not any(fnmatch.fnmatchcase(k, g) for g in predictors)
    ]
    return {
        "matched": len(matched),
        "missing": missing,
        "unexpected": unexpected,
        "mismatched": mismatched,
        "unfit": unfit,
    }


# torchvision.models.densenet._load_state_dict: "denselayer1.norm.1.weight" is "denselayer1.norm1.weight"
_DENSE_OLD = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def load_trunk(p: Plan, clf: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load a classifier state_dict file into ``clf``: every trunk tensor in use must be there
    (DenseNet's published files name them as before torchvision 0.3: renamed as its loader does)."""
    if p.settings.backbone.startswith("densenet"):
        state = {_DENSE_OLD.sub(r"\1\2", k): v for k, v in state.items()}
    own = clf.state_dict()
    keys = trunk_state_keys(p, clf)
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


def backbone_from_file(
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
