"""Optimizers and learning-rate schedules of a trial, from the flat params.

Assumes ``params`` went through :func:`trainables.params.resolve` (every name present). The tables
:data:`OPTIMIZERS` and :data:`SCHEDULES` (name → factory) are the one list of what a trial can use;
``params.OPTIMIZERS`` / ``params.SCHEDULES`` (the names validation accepts) are read from them.
No torch import at module level: validation imports this module through :mod:`trainables.params`.

Parameter groups: only parameters with ``requires_grad``; "backbone" parameters (names under the
family's backbone part: ``Family.part(name) == "backbone"``, else
:func:`backbone_prefixes`) get ``lr * backbone_lr_mult``; norm
weights and biases (``ndim <= 1``) get no weight decay. Empty groups are dropped. Each group
carries a ``name`` key (``backbone``, ``backbone.no_decay``, ``head``, ``head.no_decay``; ``head``
is everything outside the backbone: neck and heads).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trainables.families import FAMILIES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Optimizer:
    """One optimizer choice: ``make(groups, lr, params)`` builds it over the parameter groups
    (reading its own params besides lr/weight_decay, named in ``uses``); ``logged``: its group
    keys in the log rows."""

    make: Callable[[list[dict[str, Any]], float, dict[str, Any]], Any]
    logged: tuple[str, ...]
    uses: tuple[str, ...] = ()


def _sgd(groups: list[dict[str, Any]], lr: float, params: dict[str, Any]) -> Any:
    import torch

    momentum = float(params["momentum"])  # Nesterov at momentum 0 is plain SGD (torch refuses it)
    nesterov = bool(params["nesterov"]) and momentum > 0
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)


def _adamw(groups: list[dict[str, Any]], lr: float, params: dict[str, Any]) -> Any:
    import torch

    return torch.optim.AdamW(groups, lr=lr, betas=(float(params["beta1"]), float(params["beta2"])))


# The optimizers a trial can use (``params.OPTIMIZERS`` is read from here).
OPTIMIZERS: dict[str, Optimizer] = {
    "sgd": Optimizer(_sgd, logged=("momentum", "nesterov"), uses=("momentum", "nesterov")),
    "adamw": Optimizer(_adamw, logged=("betas",), uses=("beta1", "beta2")),
}


def _cosine(t: int, remaining: int, drop_every: int, gamma: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * t / remaining))


def _step(t: int, remaining: int, drop_every: int, gamma: float) -> float:
    return gamma ** (t // drop_every)


def _constant(t: int, remaining: int, drop_every: int, gamma: float) -> float:
    return 1.0


# The lr schedules after warmup (``params.SCHEDULES`` is read from here): ``factor(t, remaining,
# drop_every, gamma)`` at step ``t`` after warmup of the ``remaining`` steps.
SCHEDULES: dict[str, Callable[[int, int, int, float], float]] = {
    "cosine": _cosine,
    "step": _step,
    "constant": _constant,
}
# Schedules whose lr still drops in steps ahead: a curve before a drop says little about after it.
DROPS_AHEAD = frozenset({"step"})


def backbone_prefixes(family: Any) -> tuple[str, ...]:
    """Parameter-name prefixes of the backbone: the family's own ``backbone_prefixes``, else those
    of the family row of that name in :data:`trainables.families.FAMILIES`, else ``backbone.``
    (also when ``family`` is None)."""
    value = getattr(family, "backbone_prefixes", None) if family is not None else None
    if not value:
        row = FAMILIES.get(getattr(family, "name", None))
        value = row.backbone_prefixes if row is not None else ("backbone.",)
    return (value,) if isinstance(value, str) else tuple(value)


def build_optimizer(model: Any, params: dict[str, Any], family: Any) -> tuple[Any, list[dict[str, Any]]]:
    """The optimizer over the trainable parameters, and one log row per parameter group.

    Rows hold ``name, lr, weight_decay, n_params, n_tensors`` and ``momentum, nesterov`` (sgd) or
    ``betas`` (adamw): exactly the values the optimizer's ``param_groups`` hold.
    """
    kind = params["optimizer"]
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {kind!r}; known: {sorted(OPTIMIZERS)}")
    lr, wd, mult = float(params["lr"]), float(params["weight_decay"]), float(params["backbone_lr_mult"])
    prefixes = backbone_prefixes(family)
    part = getattr(family, "part", None)  # families.Family: the longest matching prefix wins
    buckets: dict[str, list[Any]] = {"backbone": [], "backbone.no_decay": [], "head": [], "head.no_decay": []}
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_backbone = part(pname) == "backbone" if part is not None else pname.startswith(prefixes)
        buckets[("backbone" if is_backbone else "head") + (".no_decay" if p.ndim <= 1 else "")].append(p)
    groups = [
        {
            "name": name,
            "params": ps,
            "lr": lr * (mult if name.startswith("backbone") else 1.0),
            "weight_decay": 0.0 if name.endswith("no_decay") else wd,
        }
        for name, ps in buckets.items()
        if ps
    ]
    if not groups:
        raise ValueError("no trainable parameters: the freeze preset left nothing to train")
    opt = OPTIMIZERS[kind].make(groups, lr, params)
    keys = OPTIMIZERS[kind].logged
    rows = [
        {
            "name": g["name"],
            "lr": g["lr"],
            "weight_decay": g["weight_decay"],
            **{k: (list(g[k]) if k == "betas" else g[k]) for k in keys},
            "n_tensors": len(g["params"]),
            "n_params": sum(p.numel() for p in g["params"]),
        }
        for g in opt.param_groups
    ]
    for row in rows:
        log.info("param group %s", row)
    return opt, rows


def lr_factor(
    schedule: str,
    *,
    total_steps: int,
    warmup_steps: int,
    steps_per_epoch: int,
    step_epochs: int = 1,
    step_gamma: float = 0.1,
) -> Callable[[int], float]:
    """The lr multiplier as a function of the optimizer step (0-based).

    Warmup: ``(s + 1) / warmup_steps`` for ``s < warmup_steps``. After it, with ``t = s -
    warmup_steps`` over the ``total_steps - warmup_steps`` remaining steps: ``cosine`` =
    ``0.5 (1 + cos(pi t / remaining))``; ``step`` = ``gamma ** floor(t / (step_epochs *
    steps_per_epoch))``; ``constant`` = 1.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {list(SCHEDULES)}")
    after = SCHEDULES[schedule]
    remaining = max(1, total_steps - warmup_steps)
    drop_every = max(1, step_epochs * steps_per_epoch)

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        return after(min(s - warmup_steps, remaining), remaining, drop_every, step_gamma)

    return factor


def build_scheduler(optimizer: Any, params: dict[str, Any], epochs: int, steps_per_epoch: int) -> Any:
    """A per-iteration ``LambdaLR`` (call ``step()`` after every optimizer step).

    ``warmup_epochs`` may be fractional; it is rounded to whole steps. Every group gets the same
    factor on top of its own base lr, so the backbone multiplier is kept throughout.
    """
    import torch

    steps_per_epoch = max(1, int(steps_per_epoch))
    total = max(1, int(epochs) * steps_per_epoch)
    warmup = min(total, round(float(params["warmup_epochs"]) * steps_per_epoch))
    fn = lr_factor(
        params["schedule"],
        total_steps=total,
        warmup_steps=warmup,
        steps_per_epoch=steps_per_epoch,
        step_epochs=int(params["step_epochs"]),
        step_gamma=float(params["step_gamma"]),
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
