"""What trains: freeze presets, custom glob sets, and train mode that keeps frozen norms frozen.

Presets (the table :data:`PRESETS`, name → selection and doc; a family offers ``Family.presets``):
``all``, ``heads``, ``heads+neck``, ``backbone_last_k`` (heads + neck + the last ``k`` backbone
stages, see :func:`backbone_stages`) and ``predictors`` (only the class-dependent layers).
Custom sets (``model.trainable_sets``) are lists of fnmatch globs over parameter names
(``model.named_parameters()``), matched case-sensitively.

``requires_grad=False`` alone does not freeze BatchNorm running statistics: train with
:func:`train_mode` (model.train(), then every BatchNorm without trainable parameters back to
eval). torchvision's ``FrozenBatchNorm2d`` (pretrained R-CNN/RetinaNet/FCOS backbones) has no
parameters and no train-mode behaviour, so it stays frozen whatever the preset;
:class:`AffineBatchNorm2d` keeps its statistics frozen while its affine parameters train.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from trainables.families import Family


class AffineBatchNorm2d(nn.BatchNorm2d):
    """A ``BatchNorm2d`` that always normalises with its running statistics (eval mode, even
    under ``model.train()``) while its affine parameters can train (``norm: affine``, see
    :mod:`trainables.norms`)."""

    def train(self, mode: bool = True) -> AffineBatchNorm2d:  # noqa: D102
        return super().train(False)


@dataclass(frozen=True)
class FreezeReport:
    """Outcome of :func:`apply_trainable`: element counts, tensor counts and trainable names."""

    preset: str
    trainable: int
    frozen: int
    trainable_tensors: int
    frozen_tensors: int
    trainable_names: tuple[str, ...]


def frozen_norm_tensors(model: nn.Module, every_norm: bool = False) -> list[str]:
    """The state-dict names of the norm layers that never train: each FrozenBatchNorm2d's weight,
    bias and statistics (buffers, not parameters); with ``every_norm`` each BatchNorm2d's too, as
    ``norm: frozen`` makes them."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    kinds = (FrozenBatchNorm2d, nn.BatchNorm2d) if every_norm else (FrozenBatchNorm2d,)
    return [
        f"{path}.{b}" if path else b
        for path, m in model.named_modules()
        if isinstance(m, kinds)
        for b in ("weight", "bias", "running_mean", "running_var")
    ]


def match(names: Sequence[str], globs: Iterable[str], fixed: Sequence[str] = ()) -> list[str]:
    """Names matched by any glob, in ``names`` order.

    Raises ValueError naming the first glob that matches nothing, with a hint of similar names;
    a glob that matches only ``fixed`` names (tensors that can never train) is no error.
    """
    names = list(names)
    hit: set[str] = set()
    for glob in globs:
        found = [n for n in names if fnmatch.fnmatchcase(n, glob)]
        if not found and not any(fnmatch.fnmatchcase(n, glob) for n in fixed):
            raise ValueError(f"pattern {glob!r} matches no parameter name{_hint(glob, names)}")
        hit.update(found)
    return [n for n in names if n in hit]


def _hint(glob: str, names: list[str]) -> str:
    if any(n.startswith(glob + ".") for n in names):
        return f"; did you mean {glob + '.*'!r}?"
    modules = sorted({n.rsplit(".", 1)[0] for n in names})
    literal = re.split(r"[*?\[]", glob, maxsplit=1)[0]
    close = difflib.get_close_matches(glob, names, n=3, cutoff=0.6)
    close += [m + ".*" for m in difflib.get_close_matches(literal.rstrip("."), modules, n=3, cutoff=0.6)]
    if not close:
        # the longest leading run of dotted components that some name shares
        parts = literal.split(".")
        for i in range(len(parts), 0, -1):
            stem = ".".join(parts[:i]) + "."
            near = [n for n in names if n.startswith(stem)]
            if near:
                close = near[:3]
                break
    if not close:
        close = names[:3]
    return "; similar names: " + ", ".join(dict.fromkeys(close))


def backbone_stages(model: nn.Module, family: Family) -> list[tuple[str, ...]]:
    """The backbone's stages, early to late, each as module-path prefixes (with a trailing dot).

    The children of ``family.stage_roots`` (in order) are cut where a child is named ``layerN``
    (ResNet), where a MobileNet block is marked ``_is_cn`` (a strided block), or after a
    ``MaxPool2d`` (VGG). Stages without parameters are dropped.
    """
    units: list[tuple[str, nn.Module]] = []
    for root in family.stage_roots:
        module = model.get_submodule(root)
        units += [(f"{root}.{name}", child) for name, child in module.named_children()]
    stages: list[list[str]] = []
    current: list[str] = []
    prev: nn.Module | None = None
    for path, child in units:
        starts = (
            re.fullmatch(r"layer\d+", path.rsplit(".", 1)[1]) is not None
            or bool(getattr(child, "_is_cn", False))
            or isinstance(prev, nn.MaxPool2d)
        )
        if starts and current:
            stages.append(current)
            current = []
        current.append(path + ".")
        prev = child
    if current:
        stages.append(current)
    names = [n for n, _ in model.named_parameters()]
    return [tuple(s) for s in stages if any(n.startswith(tuple(s)) for n in names)]


def _parts(*parts: str) -> Callable[[nn.Module, Family, list[str], int], list[str]]:
    """A preset selecting the parameters of the family's ``parts`` (heads, neck)."""

    def select(model: nn.Module, family: Family, names: list[str], k: int) -> list[str]:
        return [n for n in names if family.part(n) in parts]

    return select


def _all(model: nn.Module, family: Family, names: list[str], k: int) -> list[str]:
    return names


def _predictors(model: nn.Module, family: Family, names: list[str], k: int) -> list[str]:
    # a glob may match nothing (deeplabv3/fcn built without aux_classifier)
    return [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in family.predictors)]


def _backbone_last_k(model: nn.Module, family: Family, names: list[str], k: int) -> list[str]:
    if k < 0:
        raise ValueError(f"trainable_k must be >= 0, got {k}")
    stages = backbone_stages(model, family)
    chosen = stages[max(0, len(stages) - k) :] if k else []  # k above the count: every stage
    last = tuple(p for stage in chosen for p in stage)
    return [n for n in names if family.part(n) in ("heads", "neck") or (last and n.startswith(last))]


@dataclass(frozen=True)
class Preset:
    """One freeze preset: ``select(model, family, names, k)`` → the parameter names that train
    (in ``names`` order); ``doc`` says what trains."""

    select: Callable[[nn.Module, Family, list[str], int], list[str]]
    doc: str


# The freeze presets (parameter ``trainable``); which a family offers is ``Family.presets``.
PRESETS: dict[str, Preset] = {
    "all": Preset(_all, "every parameter trains"),
    "heads": Preset(_parts("heads"), "only the heads train (backbone and neck frozen)"),
    "heads+neck": Preset(_parts("heads", "neck"), "heads and neck train, the backbone is frozen"),
    "backbone_last_k": Preset(_backbone_last_k, "heads, neck and the last trainable_k backbone stages train"),
    "predictors": Preset(_predictors, "only the class-dependent predictor layers train (linear probe)"),
}


def preset_names(model: nn.Module, family: Family, preset: str, k: int = 1) -> list[str]:
    """Parameter names a preset trains (model order). Raises ValueError for an unknown preset."""
    names = [n for n, _ in model.named_parameters()]
    if preset not in family.presets:
        raise ValueError(f"{family.name} has no freeze preset {preset!r}; presets: {list(family.presets)}")
    return PRESETS[preset].select(model, family, names, k)


def apply_trainable(
    model: nn.Module,
    family: Family | None,
    name: str,
    k: int = 1,
    custom_sets: dict[str, Sequence[str]] | None = None,
) -> FreezeReport:
    """Set ``requires_grad`` on every parameter: True exactly for the preset/custom set ``name``.

    A custom set of that name wins over a preset. Raises ValueError for an unknown name, a glob
    that matches nothing, or a selection that trains nothing.
    """
    custom_sets = custom_sets or {}
    params = dict(model.named_parameters())
    if name in custom_sets:
        # a set written for BatchNorm parameters that norm: frozen (or the base) made buffers
        fixed = [n for n in frozen_norm_tensors(model) if n.endswith((".weight", ".bias"))]
        chosen = match(list(params), custom_sets[name], fixed)
    elif family is None:
        if name != "all":
            raise ValueError(f"freeze preset {name!r} needs an architecture family; without one use 'all'")
        chosen = list(params)
    else:
        if name not in family.presets:
            raise ValueError(
                f"unknown trainable set {name!r} for {family.name}: presets {list(family.presets)}, "
                f"custom sets {sorted(custom_sets)}"
            )
        chosen = preset_names(model, family, name, k)
    if not chosen:
        raise ValueError(f"trainable set {name!r} selects no parameter")
    keep = set(chosen)
    for pname, p in params.items():
        p.requires_grad_(pname in keep)
    trainable = sum(p.numel() for n, p in params.items() if n in keep)
    total = sum(p.numel() for p in params.values())
    return FreezeReport(
        preset=name,
        trainable=trainable,
        frozen=total - trainable,
        trainable_tensors=len(keep),
        frozen_tensors=len(params) - len(keep),
        trainable_names=tuple(chosen),
    )


def _all_frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def train_mode(model: nn.Module) -> nn.Module:
    """``model.train()``, then every BatchNorm whose parameters are all frozen back to eval.

    A BatchNorm without affine parameters follows its parent module (frozen when every parameter
    there is frozen). Returns the model. Call it instead of ``model.train()`` for training.
    """
    model.train()
    modules = dict(model.named_modules())
    for path, module in modules.items():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if any(True for _ in module.parameters(recurse=False)):
            frozen = _all_frozen(module)
        else:
            parent = modules.get(path.rsplit(".", 1)[0] if "." in path else "", model)
            frozen = _all_frozen(parent)
        if frozen:
            module.eval()
    return model
