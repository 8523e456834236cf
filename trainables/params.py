"""The flat trial parameters: the one contract between the search space and a trial.

A trial is configured by a flat mapping of dotted names (``lr``, ``loss.box``, ...) to values.
Every name a spec's ``space`` may search or fix is a row of :data:`PARAMS`; a name that is not
given takes the row's default. Per-term loss weights are the open family ``loss.weight.<term>``
(terms depend on the architecture family, see :mod:`trainables.families`).

This module and the tables it reads import no torch, so that spec validation stays fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from trainables import activations, loss_table, norms, optim
from trainables.families import SCOPES, family_of
from trainables.recipes import LOSS_WEIGHT_PREFIX  # the one definition (recipes imports no torch)


@dataclass(frozen=True)
class Param:
    """One trial parameter: its type, default, and the values it may take.

    ``kind`` is one of ``float``, ``int``, ``bool``, ``str``. For numbers, ``low``/``high`` bound
    the legal values (``low_open``/``high_open`` make a bound exclusive). For strings, ``choices``
    lists the legal values (``None``: any string, checked elsewhere).
    """

    name: str
    kind: str
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    tasks: tuple[str, ...] = ("detection", "instance_segmentation", "semantic_segmentation")

    def check(self, value: Any) -> str | None:
        """Return why ``value`` is illegal for this parameter, or None when it is legal."""
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
        if self.kind == "str":
            if not isinstance(value, str):
                return f"must be a string, got {value!r}"
            if self.choices is not None and value not in self.choices:
                return f"must be one of {list(self.choices)}, got {value!r}"
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {value!r}"
        if self.kind == "int" and not float(value).is_integer():
            return f"must be an integer, got {value!r}"
        if not math.isfinite(float(value)):
            return f"must be finite, got {value!r}"
        if self.low is not None:
            if self.low_open and not value > self.low:
                return f"must be > {self.low}, got {value!r}"
            if not self.low_open and not value >= self.low:
                return f"must be >= {self.low}, got {value!r}"
        if self.high is not None:
            if self.high_open and not value < self.high:
                return f"must be < {self.high}, got {value!r}"
            if not self.high_open and not value <= self.high:
                return f"must be <= {self.high}, got {value!r}"
        return None


DET = ("detection", "instance_segmentation")
SEM = ("semantic_segmentation",)

# The choices of the plug-in families, read from their tables (one home per name; the table
# modules import no torch at module level).
OPTIMIZERS = tuple(optim.OPTIMIZERS)
SCHEDULES = tuple(optim.SCHEDULES)
ACTIVATION_SCOPES = SCOPES
NORM_MODES = tuple(norms.NORMS)
ACTIVATION_NAMES = ("keep", *activations.ACTIVATIONS)  # keep = no swap
# ``default`` keeps the architecture's own loss. Which others an architecture accepts is in
# trainables/families.py.
BOX_LOSSES = ("default", *loss_table.BOX_TABLE)
CLS_LOSSES = ("default", *loss_table.CLS_TABLE)
SEG_LOSSES = tuple(loss_table.SEG_TABLE)

_ROWS = (
    Param("optimizer", "str", "sgd", "optimizer", choices=OPTIMIZERS),
    Param("lr", "float", 0.01, "base learning rate", low=0.0, low_open=True),
    Param("weight_decay", "float", 1e-4, "decoupled/L2 weight decay (not on norms/biases)", low=0.0),
    Param("momentum", "float", 0.9, "SGD momentum", low=0.0, high=1.0),
    Param("nesterov", "bool", False, "SGD Nesterov momentum"),
    Param("beta1", "float", 0.9, "AdamW beta1", low=0.0, high=1.0, high_open=True),  # torch: < 1
    Param("beta2", "float", 0.999, "AdamW beta2", low=0.0, high=1.0, high_open=True),
    Param("schedule", "str", "cosine", "learning-rate schedule after warmup", choices=SCHEDULES),
    Param("warmup_epochs", "float", 0.0, "linear warmup length in epochs", low=0.0),
    Param("step_epochs", "int", 1, "epochs between lr drops (schedule: step)", low=1),
    Param(
        "step_gamma",
        "float",
        0.1,
        "lr factor at each drop (schedule: step)",
        low=0.0,
        low_open=True,
        high=1.0,
    ),
    Param("grad_clip", "float", 0.0, "max gradient norm, 0 = off", low=0.0),
    Param("backbone_lr_mult", "float", 1.0, "lr multiplier for backbone parameters", low=0.0, low_open=True),
    Param("trainable", "str", "all", "freeze preset or a name from model.trainable_sets"),
    Param("trainable_k", "int", 1, "stages trained by preset backbone_last_k", low=0),
    Param("norm", "str", "keep", "normalisation layers: keep|frozen|affine|train", choices=NORM_MODES),
    Param("activation", "str", "keep", "activation swapped in activation_scope", choices=ACTIVATION_NAMES),
    Param("activation_scope", "str", "heads", "where activation swaps apply", choices=ACTIVATION_SCOPES),
    Param("loss.box", "str", "default", "box regression loss", choices=BOX_LOSSES, tasks=DET),
    Param("loss.cls", "str", "default", "classification loss", choices=CLS_LOSSES, tasks=DET),
    Param("loss.focal_gamma", "float", 2.0, "focal loss gamma", low=0.0),
    Param("loss.focal_alpha", "float", 0.25, "focal loss alpha (negative: no weighting)", low=-1.0, high=1.0),
    Param("loss.seg", "str", "ce", "semantic segmentation loss", choices=SEG_LOSSES, tasks=SEM),
    Param("loss.dice_weight", "float", 1.0, "dice term weight in ce+dice", low=0.0, tasks=SEM),
    Param(
        "loss.label_smoothing", "float", 0.0, "cross-entropy label smoothing", low=0.0, high=1.0, tasks=SEM
    ),
    Param(
        "loss.aux_weight",
        "float",
        0.5,
        "auxiliary head loss weight (when the model has one)",
        low=0.0,
        tasks=SEM,
    ),
    Param("aug.hflip", "float", 0.5, "horizontal flip probability (training)", low=0.0, high=1.0),
    Param("aug.vflip", "float", 0.0, "vertical flip probability (training)", low=0.0, high=1.0),
    Param(
        "aug.color",
        "float",
        0.0,
        "colour jitter strength (brightness/contrast/saturation)",
        low=0.0,
        high=1.0,
    ),
    Param("aug.scale", "float", 0.0, "random rescale jitter: size * U(1-s, 1+s)", low=0.0, high=0.9),
)

PARAMS: dict[str, Param] = {p.name: p for p in _ROWS}


def loss_weight_param(name: str) -> Param:
    """The row for an open ``loss.weight.<term>`` name (term checked against the family)."""
    return Param(name, "float", 1.0, "weight of one loss term", low=0.0)


def lookup(name: str) -> Param | None:
    """The row for ``name``, or None when no such trial parameter exists."""
    if name.startswith(LOSS_WEIGHT_PREFIX) and len(name) > len(LOSS_WEIGHT_PREFIX):
        return loss_weight_param(name)
    return PARAMS.get(name)


def resolve(values: dict[str, Any]) -> dict[str, Any]:
    """Defaults for every known parameter, overridden by ``values`` (assumed already validated).

    Integer-valued floats are kept as given; ints are coerced for ``int`` rows.
    """
    out = {name: p.default for name, p in PARAMS.items()}
    for name, value in values.items():
        row = lookup(name)
        if row is not None and row.kind == "int":
            value = int(value)
        elif row is not None and row.kind == "float":
            value = float(value)
        out[name] = value
    return out


STEP_ONLY = ("step_epochs", "step_gamma")  # read by the ``step`` schedule alone

FOCAL = ("loss.focal_gamma", "loss.focal_alpha")  # act only where a focal loss computes

_ACTS_WHEN = {  # parameters that act only beside another's value: (that parameter, when it acts)
    "trainable_k": ("trainable", lambda v: v.get("trainable", "all") == "backbone_last_k"),
    "activation_scope": ("activation", lambda v: v.get("activation", "keep") != "keep"),
    "loss.dice_weight": ("loss.seg", lambda v: v.get("loss.seg", "ce") == "ce+dice"),
    "loss.label_smoothing": ("loss.seg", lambda v: v.get("loss.seg", "ce") in ("ce", "ce+dice")),
}


def controller(name: str, task: str | None = None) -> str | None:
    """The parameter whose value decides whether ``name`` acts at all (:func:`in_effect`):
    ``optimizer`` for an optimizer's own settings, ``schedule`` for the step schedule's,
    ``trainable`` for ``trainable_k``, ``activation`` for ``activation_scope``, ``loss.seg`` for
    ``loss.dice_weight`` and ``loss.label_smoothing``, ``loss.cls`` (``loss.seg`` on a semantic
    ``task``) for ``loss.focal_*``; else None."""
    if name in {n for o in optim.OPTIMIZERS.values() for n in o.uses}:
        return "optimizer"
    if name in STEP_ONLY:
        return "schedule"
    if name in FOCAL:
        return "loss.seg" if task == "semantic_segmentation" else "loss.cls"
    return _ACTS_WHEN[name][0] if name in _ACTS_WHEN else None


def focal_acts(values: dict[str, Any], task: str | None = None, default_cls: str | None = None) -> bool:
    """Whether ``loss.focal_*`` act on a trial: under ``loss.seg: focal`` (semantic), under
    ``loss.cls: focal``, or under ``loss.cls: default`` on a model whose own classification loss is
    focal (``default_cls``, :attr:`trainables.families.Family.default_cls`: RetinaNet, FCOS) or
    not known (None). So not on an R-CNN or SSD trial that keeps its own cross-entropy."""
    seg = values.get("loss.seg", "ce") == "focal"
    cls = values.get("loss.cls", "default")
    det = cls == "focal" or (cls == "default" and default_cls in (None, "focal"))
    if task is None:
        return seg or det
    return seg if task == "semantic_segmentation" else det


def in_effect(values: dict[str, Any], task: str | None = None, arch: str | None = None) -> dict[str, Any]:
    """``values`` without the parameters that cannot act on a trial of ``task`` (any task: None),
    e.g. for a record of what a model was trained with: rows for other tasks, another optimizer's
    own settings, the step schedule's under another schedule, ``trainable_k`` unless
    ``backbone_last_k`` trains, ``activation_scope`` when no activation is swapped, the dice weight
    unless ``loss.seg`` is ``ce+dice``, label smoothing unless it has a cross-entropy term, the
    focal loss's settings unless a focal loss computes (:func:`focal_acts`, with the own
    classification loss of ``arch``'s family; not known without ``arch``)."""
    family = family_of(arch) if arch else None
    default_cls = family.default_cls if family else None
    chosen = optim.OPTIMIZERS.get(values.get("optimizer"))
    others = {n for o in optim.OPTIMIZERS.values() for n in o.uses} - set(chosen.uses if chosen else ())
    out = {}
    for name, value in values.items():
        row = lookup(name)
        if (row is not None and task is not None and task not in row.tasks) or name in others:
            continue
        if name in STEP_ONLY and values.get("schedule") != "step":
            continue
        if name in _ACTS_WHEN and not _ACTS_WHEN[name][1](values):
            continue
        if name in FOCAL and not focal_acts(values, task, default_cls):
            continue
        out[name] = value
    return out
