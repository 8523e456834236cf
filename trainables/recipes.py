"""Reference-training recipes: the hyperparameters torchvision's own references train each
architecture family with, as trial parameters (a study's first trial, ``search.reference_trial``).

Sources: torchvision ``references/detection/README.md`` and ``references/segmentation/README.md``
(the commands that produced the published weights). Their learning rates are for the total batch
in ``batch`` (GPUs x images per GPU); :func:`recipe_params` scales them to a spec's batch by one of
:data:`LR_SCALINGS`: ``linear`` (the rule the references use: "lr 0.02 for 8 GPUs x 2 images") or
``sqrt`` (the square root of the batch ratio). Scaled from 8 GPUs down to one small batch the two
rules are 3-7x apart; ``search.reference_scaling`` can run the recipe at both. Their schedules
(multi-step at 16/26 and 22/26 of the epochs, cosine, poly) are mapped to this project's
``schedule`` values: multi-step -> ``step`` at ~60 % of the epochs, poly -> ``cosine``.

Parameters a recipe does not name take the choices a careful user makes when fine-tuning by hand:
the whole network trains (``trainable: all``), the architecture's own activations, losses and
norm handling; and what the references do: one lr for every parameter, no gradient clipping,
horizontal flips at 0.5 and none of this project's other augmentations (the segmentation
references' random resize has no equal here: their ``aug.scale`` is left to the sampler). Pure Python:
spec validation imports this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

LOSS_WEIGHT_PREFIX = "loss.weight."  # trainables.params' open family (this module imports no torch)

# How a recipe's learning rate follows the batch: name -> f(spec batch / recipe batch) -> lr factor.
LR_SCALINGS: dict[str, Callable[[float], float]] = {
    "linear": lambda ratio: ratio,  # Goyal et al. 2017, the torchvision references' rule
    "sqrt": math.sqrt,  # Krizhevsky 2014, Hoffer et al. 2017: keeps the gradient noise's scale
}


@dataclass(frozen=True)
class Recipe:
    """One family's reference recipe: ``params`` at total batch ``batch``; ``lr`` scales with it."""

    family: str
    batch: int
    params: dict[str, Any]
    source: str
    step_at: float | None = None  # multi-step schedules: first drop at this fraction of the epochs
    hand: dict[str, Any] = field(default_factory=lambda: dict(_HAND))


_HAND = {  # what a careful user fine-tuning by hand keeps, and what the references do besides
    "trainable": "all",
    "activation": "keep",
    "norm": "keep",
    "loss.box": "default",
    "loss.cls": "default",
    "loss.focal_gamma": 2.0,  # torchvision's sigmoid_focal_loss defaults
    "loss.focal_alpha": 0.25,
    "loss.label_smoothing": 0.0,
    "loss.aux_weight": 0.5,  # the segmentation references' aux loss weight
    "backbone_lr_mult": 1.0,  # the references: one lr for every parameter, no clipping
    "grad_clip": 0.0,
    "aug.hflip": 0.5,  # their "hflip" augmentation, and no other of these
    "aug.vflip": 0.0,
    "aug.color": 0.0,
    "aug.scale": 0.0,  # the detection references: no scale jitter (segmentation: see _SEG_HAND)
}
# the segmentation references' random resize (0.5-2x) has no equal here: aug.scale left to the sampler
_SEG_HAND = {k: v for k, v in _HAND.items() if k != "aug.scale"}


_SGD = {"optimizer": "sgd", "momentum": 0.9, "nesterov": False}
_RCNN = {
    **_SGD,
    "lr": 0.02,
    "weight_decay": 1e-4,
    "schedule": "step",
    "step_gamma": 0.1,
    "warmup_epochs": 0.1,
}
_DET_REF = "torchvision references/detection/README.md"
_SEG_REF = "torchvision references/segmentation/README.md"

RECIPES: dict[str, Recipe] = {
    r.family: r
    for r in (
        Recipe(
            "fasterrcnn", 16, _RCNN, f"{_DET_REF}: Faster R-CNN, lr 0.02, 26 epochs, steps 16 22", 16 / 26
        ),
        Recipe("maskrcnn", 16, _RCNN, f"{_DET_REF}: Mask R-CNN, lr 0.02, 26 epochs, steps 16 22", 16 / 26),
        Recipe(
            "retinanet",
            16,
            {**_RCNN, "lr": 0.01},
            f"{_DET_REF}: RetinaNet, lr 0.01, 26 epochs, steps 16 22",
            16 / 26,
        ),
        Recipe(
            "fcos", 16, {**_RCNN, "lr": 0.01}, f"{_DET_REF}: FCOS, lr 0.01, 26 epochs, steps 16 22", 16 / 26
        ),
        Recipe(
            "ssd",
            32,
            {**_SGD, "lr": 0.002, "weight_decay": 5e-4, "schedule": "step", "step_gamma": 0.1},
            f"{_DET_REF}: SSD300 VGG16, lr 0.002, batch 4x8, wd 5e-4, steps 80 110 of 120",
            80 / 120,
        ),
        Recipe(
            "ssdlite",
            192,
            {**_SGD, "lr": 0.15, "weight_decay": 4e-5, "schedule": "cosine", "warmup_epochs": 0.1},
            f"{_DET_REF}: SSDlite320 MobileNetV3, lr 0.15, batch 24x8, wd 4e-5, cosine",
        ),
        Recipe(
            "deeplabv3",
            32,
            {**_SGD, "lr": 0.02, "weight_decay": 1e-4, "schedule": "cosine", "loss.seg": "ce"},
            f"{_SEG_REF}: DeepLabV3, lr 0.02, batch 4x8, wd 1e-4, poly (here: cosine), aux loss",
            hand=dict(_SEG_HAND),
        ),
        Recipe(
            "fcn",
            32,
            {**_SGD, "lr": 0.02, "weight_decay": 1e-4, "schedule": "cosine", "loss.seg": "ce"},
            f"{_SEG_REF}: FCN, lr 0.02, batch 4x8, wd 1e-4, poly (here: cosine), aux loss",
            hand=dict(_SEG_HAND),
        ),
        Recipe(
            "lraspp",
            32,
            {**_SGD, "lr": 0.02, "weight_decay": 1e-6, "schedule": "cosine", "loss.seg": "ce"},
            f"{_SEG_REF}: LR-ASPP MobileNetV3, lr 0.02, batch 4x8, wd 1e-6, poly (here: cosine)",
            hand=dict(_SEG_HAND),
        ),
    )
}


def recipe_for(family: str | None) -> Recipe | None:
    """The reference recipe of an architecture family (None when it has none)."""
    return RECIPES.get(family or "")


def recipe_params(
    recipe: Recipe, batch_size: int, epochs: int, scaling: str = "linear", names: Iterable[str] = ()
) -> dict[str, Any]:
    """The recipe as trial parameters for a spec's ``batch_size`` and ``epochs`` (before it is
    projected into a search space): lr scaled to the batch by ``scaling`` (a name of
    :data:`LR_SCALINGS`), the step schedule's first drop placed at the recipe's fraction of the
    epochs, hand-made choices for everything else; each per-term loss weight among ``names``
    (the space's parameters, ``loss.weight.<term>``) at 1.0, the architecture's own weighting."""
    out = {name: 1.0 for name in names if name.startswith(LOSS_WEIGHT_PREFIX)}
    out.update({**recipe.hand, **recipe.params})
    lr = float(recipe.params["lr"]) * LR_SCALINGS[scaling](batch_size / recipe.batch)
    out["lr"] = float(f"{lr:.12g}")  # 0.025 * 2/16 is 0.0031249999999999997: no choice 0.003125 matched it
    if out.get("schedule") == "step" and recipe.step_at is not None:
        out["step_epochs"] = max(1, round(recipe.step_at * epochs))
    return out
