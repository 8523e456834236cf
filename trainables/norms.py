"""Normalisation layers as a trial parameter (``norm``): which BatchNorm statistics and affine
parameters may move during fine-tuning. :data:`NORMS` is the one table of modes (``params.NORM_MODES``,
the names validation accepts, is read from it):

- ``keep``: as built. torchvision's pretrained R-CNN/RetinaNet/FCOS backbones (and a weights file
  saved from them) use ``FrozenBatchNorm2d``, which never moves; ``BatchNorm2d`` trains with the
  part it belongs to (:func:`trainables.freeze.train_mode` keeps frozen parts in eval mode).
- ``frozen``: every BatchNorm becomes ``FrozenBatchNorm2d``: statistics and affine fixed.
- ``affine``: statistics fixed (always normalised with the running statistics), the affine
  weight and bias train with their part (:class:`trainables.freeze.AffineBatchNorm2d`).
- ``train``: every BatchNorm is a ``BatchNorm2d``, statistics and affine train with their part
  (``FrozenBatchNorm2d`` converted back, its statistics kept): the torchvision tutorial's setting.

Module paths and state-dict names stay the same, so freeze patterns and checkpoints keep working.
No torch import at module level (validation imports the table through :mod:`trainables.params`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class Norm:
    """One ``norm`` mode: ``layer()`` gives the class every 2-d BatchNorm becomes (None: keep)."""

    layer: Callable[[], type] | None
    doc: str


def _frozen() -> type:
    from torchvision.ops.misc import FrozenBatchNorm2d

    return FrozenBatchNorm2d


def _affine() -> type:
    from trainables.freeze import AffineBatchNorm2d

    return AffineBatchNorm2d


def _train() -> type:
    from torch import nn

    return nn.BatchNorm2d


NORMS: dict[str, Norm] = {
    "keep": Norm(None, "as built: FrozenBatchNorm2d stays frozen, BatchNorm2d trains with its part"),
    "frozen": Norm(_frozen, "statistics and affine fixed everywhere"),
    "affine": Norm(_affine, "statistics fixed, affine trains with its part"),
    "train": Norm(_train, "every BatchNorm trains with its part"),
}


def _convert(module: nn.Module, target: type) -> nn.Module | None:
    """The replacement of one norm layer by a ``target`` layer (None: it already is one)."""
    import torch
    from torchvision.ops.misc import FrozenBatchNorm2d

    if type(module) is target:
        return None
    weight, bias = module.weight.detach(), module.bias.detach()
    mean, var = module.running_mean, module.running_var
    eps, features = float(module.eps), int(weight.shape[0])
    if target is FrozenBatchNorm2d:
        new = FrozenBatchNorm2d(features, eps=eps)
        for name, value in (("weight", weight), ("bias", bias), ("running_mean", mean), ("running_var", var)):
            getattr(new, name).copy_(value)
        return new
    momentum = getattr(module, "momentum", 0.1)
    new = target(features, eps=eps, momentum=momentum)
    with torch.no_grad():
        new.weight.copy_(weight)
        new.bias.copy_(bias)
        new.running_mean.copy_(mean)
        new.running_var.copy_(var)
    return new.to(weight.device)


def apply_norm(model: nn.Module, mode: str) -> int:
    """Convert the model's 2-d BatchNorm layers for ``mode``; returns how many were replaced.
    Layers without affine parameters or running statistics are left as they are."""
    from torch import nn
    from torchvision.ops.misc import FrozenBatchNorm2d

    if mode not in NORMS:
        raise ValueError(f"norm must be one of {list(NORMS)}, but got {mode!r}")
    if NORMS[mode].layer is None:
        return 0
    target = NORMS[mode].layer()
    changed = 0
    for path, module in list(model.named_modules()):
        if not isinstance(module, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            continue
        if getattr(module, "weight", None) is None or getattr(module, "running_mean", None) is None:
            continue
        new = _convert(module, target)
        if new is None:
            continue
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, new)
        changed += 1
    return changed


@contextmanager
def one_value_guard(model: nn.Module) -> Iterator[None]:
    """While active, a training BatchNorm that gets one value per channel (a batch of one image
    reaching a 1x1 map: SSDlite's last extra layers, DeepLabV3's image pooling) normalises that
    input with its running statistics, as in eval mode, instead of raising "Expected more than 1
    value per channel when training"; its affine parameters still get their gradient."""
    from torch import nn

    def before(module: nn.Module, args: tuple) -> None:
        x = args[0]
        if module.training and x.dim() > 1 and x.numel() == x.shape[1]:
            module.training = False
            module._one_value = True

    def after(module: nn.Module, args: tuple, out: object) -> None:
        if getattr(module, "_one_value", False):
            module.training = True
            del module._one_value

    handles = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            handles += [m.register_forward_pre_hook(before), m.register_forward_hook(after)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m in model.modules():  # a forward that raised between the two hooks
            if getattr(m, "_one_value", False):
                after(m, (), None)
