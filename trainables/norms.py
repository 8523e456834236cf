"""Normalisation layers as a trial parameter (``norm``): which BatchNorm statistics and affine
parameters may move during fine-tuning.

- ``keep``: as built. torchvision's pretrained R-CNN/RetinaNet/FCOS backbones (and a weights file
  saved from them) use ``FrozenBatchNorm2d``, which never moves; ``BatchNorm2d`` trains with the
  part it belongs to (:func:`trainables.freeze.train_mode` keeps frozen parts in eval mode).
- ``frozen``: every BatchNorm becomes ``FrozenBatchNorm2d``: statistics and affine fixed.
- ``affine``: statistics fixed (always normalised with the running statistics), the affine
  weight and bias train with their part (:class:`AffineBatchNorm2d`).
- ``train``: every BatchNorm is a ``BatchNorm2d``, statistics and affine train with their part
  (``FrozenBatchNorm2d`` converted back, its statistics kept): the torchvision tutorial's setting.

Module paths and state-dict names stay the same, so freeze patterns and checkpoints keep working.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from trainables.params import NORM_MODES


class AffineBatchNorm2d(nn.BatchNorm2d):
    """A ``BatchNorm2d`` that always normalises with its running statistics (eval mode, even
    under ``model.train()``) while its affine parameters can train."""

    def train(self, mode: bool = True) -> AffineBatchNorm2d:  # noqa: D102
        return super().train(False)


def _stats(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return module.weight.detach(), module.bias.detach(), module.running_mean, module.running_var


def _convert(module: nn.Module, mode: str) -> nn.Module | None:
    """The replacement of one norm layer for ``mode`` (None: it is already of that kind)."""
    target = {"frozen": FrozenBatchNorm2d, "affine": AffineBatchNorm2d, "train": nn.BatchNorm2d}[mode]
    if type(module) is target:
        return None
    weight, bias, mean, var = _stats(module)
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
    if mode not in NORM_MODES:
        raise ValueError(f"norm must be one of {list(NORM_MODES)}, but got {mode!r}")
    if mode == "keep":
        return 0
    changed = 0
    for path, module in list(model.named_modules()):
        if not isinstance(module, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            continue
        if getattr(module, "weight", None) is None or getattr(module, "running_mean", None) is None:
            continue
        new = _convert(module, mode)
        if new is None:
            continue
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, new)
        changed += 1
    return changed
