"""Optimizer groups and lr schedules (trainables/optim.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from trainables import optim
from trainables import params as P


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(4, 2, 1), nn.GroupNorm(1, 2))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


FAMILY = SimpleNamespace(name="tiny", backbone_prefixes=("backbone.",))


def _groups(opt):
    return {g["name"]: g for g in opt.param_groups}


def test_tables_match_params():
    assert tuple(optim.OPTIMIZERS) == P.OPTIMIZERS
    assert tuple(optim.SCHEDULES) == P.SCHEDULES


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_groups_equal_sampled_values(kind):
    params = P.resolve(
        {
            "optimizer": kind,
            "lr": 0.0123,
            "weight_decay": 3e-4,
            "momentum": 0.77,
            "nesterov": True,
            "beta1": 0.81,
            "beta2": 0.95,
            "backbone_lr_mult": 0.1,
        }
    )
    model = Tiny()
    opt, rows = optim.build_optimizer(model, params, FAMILY)
    groups = _groups(opt)
    assert set(groups) == {"backbone", "backbone.no_decay", "head", "head.no_decay"}
    assert groups["backbone"]["lr"] == pytest.approx(0.00123) == groups["backbone.no_decay"]["lr"]
    assert groups["head"]["lr"] == 0.0123 == groups["head.no_decay"]["lr"]
    assert groups["backbone"]["weight_decay"] == 3e-4 == groups["head"]["weight_decay"]
    assert groups["backbone.no_decay"]["weight_decay"] == 0.0 == groups["head.no_decay"]["weight_decay"]
    for g in opt.param_groups:
        if kind == "sgd":
            assert isinstance(opt, torch.optim.SGD)
            assert g["momentum"] == 0.77 and g["nesterov"] is True
        else:
            assert isinstance(opt, torch.optim.AdamW)
            assert tuple(g["betas"]) == (0.81, 0.95)
    # the log rows are the optimizer's real values
    for row in rows:
        g = groups[row["name"]]
        assert row["lr"] == g["lr"] and row["weight_decay"] == g["weight_decay"]
        assert row["n_params"] == sum(p.numel() for p in g["params"])
        if kind == "sgd":
            assert (row["momentum"], row["nesterov"]) == (g["momentum"], g["nesterov"])
        else:
            assert row["betas"] == list(g["betas"])
    # the scheduler keeps each group's base lr (initial_lr) equal to the sampled one
    optim.build_scheduler(opt, params | {"warmup_epochs": 1.0}, epochs=3, steps_per_epoch=4)
    assert _groups(opt)["head"]["initial_lr"] == 0.0123
    assert _groups(opt)["backbone"]["initial_lr"] == pytest.approx(0.00123)


def test_only_trainable_and_no_decay_on_norm_and_bias():
    model = Tiny()
    opt, _ = optim.build_optimizer(model, P.resolve({}), FAMILY)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in in_opt) == p.requires_grad, name
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            no_decay = names[id(p)].endswith("bias") or ".1." in names[id(p)]  # norms are index 1
            assert (g["weight_decay"] == 0.0) == no_decay, names[id(p)]


def test_nesterov_at_momentum_0_is_plain_sgd():
    """Both values are legal alone; together torch refuses them. Nesterov at momentum 0 is SGD."""
    opt, _ = optim.build_optimizer(Tiny(), P.resolve({"momentum": 0.0, "nesterov": True}), FAMILY)
    assert all(g["momentum"] == 0.0 and g["nesterov"] is False for g in opt.param_groups)
    opt, _ = optim.build_optimizer(Tiny(), P.resolve({"momentum": 0.5, "nesterov": True}), FAMILY)
    assert all(g["nesterov"] is True for g in opt.param_groups)


def test_nothing_trainable_is_an_error():
    model = Tiny().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        optim.build_optimizer(model, P.resolve({}), FAMILY)


def test_default_backbone_prefix_for_fpn_families():
    assert optim.backbone_prefixes(SimpleNamespace(name="fasterrcnn")) == ("backbone.body.",)
    assert optim.backbone_prefixes(None) == ("backbone.",)


def _curve(schedule, epochs=4, spe=5, **kw):
    model = nn.Linear(2, 2)
    params = P.resolve({"lr": 0.1, "schedule": schedule, **kw})
    opt, _ = optim.build_optimizer(model, params, None)
    sched = optim.build_scheduler(opt, params, epochs, spe)
    lrs = []
    for _ in range(epochs * spe):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_warmup_then_cosine():
    lrs = _curve("cosine", warmup_epochs=1.0)
    assert lrs[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    rest = lrs[5:]
    assert rest[0] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(rest, rest[1:], strict=False))
    assert rest[-1] == pytest.approx(0.05 * (1 + math.cos(math.pi * 14 / 15)))


def test_step_schedule():
    lrs = _curve("step", epochs=4, spe=5, step_epochs=2, step_gamma=0.5)
    assert lrs == pytest.approx([0.1] * 10 + [0.05] * 10)


def test_constant_with_fractional_warmup():
    lrs = _curve("constant", epochs=2, spe=4, warmup_epochs=0.5)
    assert lrs == pytest.approx([0.05, 0.1] + [0.1] * 6)


def test_cosine_without_warmup_starts_at_lr():
    lrs = _curve("cosine", epochs=1, spe=4)
    assert lrs == pytest.approx([0.1 * 0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(4)])


@pytest.mark.parametrize(
    ("set_", "task", "gone", "kept"),
    [
        ({"optimizer": "sgd"}, "detection", {"beta1", "beta2", "loss.seg", "step_epochs"}, {"momentum"}),
        ({"optimizer": "adamw"}, "detection", {"momentum", "nesterov", "loss.aux_weight"}, {"beta2"}),
        ({"schedule": "step"}, "semantic_segmentation", {"beta1", "loss.box"}, {"step_gamma", "loss.seg"}),
        (
            {"loss.weight.loss_mask": 2.0},
            "instance_segmentation",
            {"loss.dice_weight"},
            {"loss.weight.loss_mask"},
        ),
        ({"loss.seg": "ce"}, "semantic_segmentation", {"loss.dice_weight"}, {"loss.label_smoothing"}),
        ({"loss.seg": "dice"}, "semantic_segmentation", {"loss.dice_weight", "loss.label_smoothing"}, set()),
        ({"loss.seg": "ce+dice"}, "semantic_segmentation", set(), {"loss.dice_weight", "loss.seg"}),
    ],
)
def test_in_effect_drops_what_cannot_act_on_the_trial(set_, task, gone, kept):
    """A bundle's record of what trained the model: not another task's losses, another
    optimizer's settings or the step schedule's under another schedule."""
    values = P.resolve(set_)
    got = P.in_effect(values, task)
    assert not gone & set(got) and kept <= set(got)
    assert all(got[k] == values[k] for k in got) and {"lr", "optimizer", "trainable"} <= set(got)


@pytest.mark.parametrize(
    ("set_", "task", "arch", "acts"),
    [
        ({}, "detection", "ssdlite320_mobilenet_v3_large", False),  # loss.cls default: its own CE
        ({}, "detection", "fasterrcnn_resnet50_fpn", False),
        ({"loss.cls": "ce"}, "detection", "retinanet_resnet50_fpn", False),
        ({}, "detection", "retinanet_resnet50_fpn", True),  # RetinaNet, FCOS: their own loss is focal
        ({}, "detection", "fcos", True),  # a composed arch: its family's own loss
        ({}, "detection", None, True),  # the model's own loss not known: kept
        ({"loss.cls": "focal"}, "instance_segmentation", "maskrcnn_resnet50_fpn", True),
        ({"loss.cls": "focal"}, "semantic_segmentation", None, False),
        ({"loss.seg": "focal"}, "semantic_segmentation", None, True),
        ({"loss.seg": "ce", "loss.cls": "ce"}, None, None, False),
    ],
)
def test_focal_settings_act_only_where_a_focal_loss_computes(set_, task, arch, acts):
    got = P.in_effect(P.resolve(set_), task, arch)
    assert {name in got for name in P.FOCAL} == {acts}
    decides = "loss.seg" if task == "semantic_segmentation" else "loss.cls"
    assert P.controller("loss.focal_gamma", task) == decides
