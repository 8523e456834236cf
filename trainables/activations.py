"""Activation swaps: one table of activation factories and a module-replacing walker.

:data:`ACTIVATIONS` is the one table of choices; ``params.ACTIVATION_NAMES`` (the names
validation accepts) is read from it, plus ``keep`` (no change). No torch import at module level
(validation imports the table through :mod:`trainables.params`): the factories and
:data:`SWAPPABLE` import ``torch.nn`` when first used.

Only activation MODULES are replaced (those of :data:`SWAPPABLE`, matched by exact type);
gates such as ``nn.Hardsigmoid``/``nn.Sigmoid`` (squeeze-excitation scales) are left alone.
torchvision applies some activations functionally, which no swap can reach:
- Faster/Mask R-CNN v1 ``TwoMLPHead`` (``roi_heads.box_head``) uses ``F.relu``; the RPN head has
  one ``nn.ReLU`` module (v2: two), v2's box head has modules.
- the v1 FPN (``backbone.fpn``) and its ``LastLevelP6P7`` have no activation modules (F.relu);
  so scope ``neck`` replaces nothing on fasterrcnn/maskrcnn/retinanet/fcos.
- fcn and lraspp have no neck; deeplabv3's neck is its ASPP (``classifier.0``).
Replacements are not in-place (``inplace=False``) so that any activation is safe after any layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trainables.families import Family

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class Activation:
    """One activation choice: ``factory()`` makes a fresh module."""

    name: str
    factory: Callable[[], nn.Module]
    doc: str


def _nn(cls_name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    """A factory of ``torch.nn.<cls_name>(**kwargs)`` (torch imported on the first call)."""

    def factory() -> nn.Module:
        from torch import nn

        return getattr(nn, cls_name)(**kwargs)

    factory.__name__ = factory.__qualname__ = cls_name
    return factory


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("relu", _nn("ReLU"), "max(0, x)"),
        Activation("leaky_relu", _nn("LeakyReLU", negative_slope=0.01), "leaky ReLU, slope 0.01"),
        Activation("silu", _nn("SiLU"), "x * sigmoid(x) (swish)"),
        Activation("gelu", _nn("GELU"), "Gaussian error linear unit (exact)"),
        Activation("hardswish", _nn("Hardswish"), "MobileNetV3's hard swish"),
        Activation("mish", _nn("Mish"), "x * tanh(softplus(x))"),
        Activation("elu", _nn("ELU"), "exponential linear unit, alpha 1"),
    )
}

# Module types that count as activations (exact type, so subclasses and gates are not caught), by
# their torch.nn names; :data:`SWAPPABLE` is the tuple of the types themselves.
_SWAPPABLE_NAMES = ("ReLU", "ReLU6", "Hardswish", "SiLU", "GELU", "LeakyReLU", "Mish", "ELU")


@functools.cache
def _swappable() -> tuple[type[nn.Module], ...]:
    from torch import nn

    return tuple(getattr(nn, n) for n in _SWAPPABLE_NAMES)


def __getattr__(name: str) -> Any:  # SWAPPABLE without importing torch at module level
    if name == "SWAPPABLE":
        return _swappable()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def swap_activations(model: nn.Module, family: Family | None, name: str, scope: str) -> int:
    """Replace the activation modules inside ``scope`` (heads|neck|backbone|all) by ``name``.

    Returns how many modules changed type (a module that already is the target type is left as
    it is and not counted). ``keep`` returns 0. ``family`` None allows only scope ``all``.
    """
    if name == "keep":
        return 0
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {['keep', *ACTIVATIONS]}")
    if family is None and scope != "all":
        raise ValueError(f"scope {scope!r} needs an architecture family; only 'all' works without one")
    target = ACTIVATIONS[name]
    replaced = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) not in _swappable():
                continue
            path = f"{parent_name}.{child_name}" if parent_name else child_name
            if family is not None and not family.in_scope(path + ".", scope):
                continue
            new = target.factory()
            if type(new) is type(child):
                continue
            setattr(parent, child_name, new)
            replaced += 1
    return replaced


def count_activations(model: nn.Module, family: Family, scope: str) -> dict[str, int]:
    """Activation modules per type name inside ``scope`` (what a swap there could replace)."""
    counts: dict[str, int] = {}
    for path, module in model.named_modules():
        if type(module) in _swappable() and family.in_scope(path + ".", scope):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts
