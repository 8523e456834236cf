"""Freeze presets and custom sets: counts, and frozen tensors AND BatchNorm statistics unchanged
bit for bit after an optimizer step (SGD, lr 0.1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from tests.test_models import CHEAP, SLOW, build, fast_kwargs, one_thread, train_step  # noqa: F401
from trainables import families, freeze, models


def _names(model):
    return [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("family", sorted(families.FAMILIES))
def test_every_preset_of_every_family_counts_and_parts(family):
    fam = families.FAMILIES[family]
    model = models.skeleton(CHEAP[family], 3, {})
    names = _names(model)
    total = sum(p.numel() for p in model.parameters())
    seen = {}
    for preset in fam.presets:
        rep = freeze.apply_trainable(model, fam, preset, k=1)
        on = {n for n, p in model.named_parameters() if p.requires_grad}
        assert on == set(rep.trainable_names) and rep.preset == preset
        assert rep.trainable + rep.frozen == total and rep.trainable > 0
        assert rep.trainable_tensors + rep.frozen_tensors == len(names)
        assert rep.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
        seen[preset] = on
    parts = {n: fam.part(n) for n in names}
    assert seen["all"] == set(names)
    assert seen["heads"] == {n for n in names if parts[n] == "heads"}
    assert seen["predictors"] < seen["heads"]
    if "heads+neck" in fam.presets:
        assert seen["heads+neck"] == {n for n in names if parts[n] in ("heads", "neck")}
        assert seen["heads"] < seen["heads+neck"] < seen["backbone_last_k"] < seen["all"]
    else:
        assert seen["heads"] < seen["backbone_last_k"] < seen["all"]
    last = freeze.backbone_stages(model, fam)[-1]
    extra = seen["backbone_last_k"] - {n for n in names if parts[n] in ("heads", "neck")}
    assert extra and all(n.startswith(last) for n in extra)


def test_backbone_stages_per_backbone_kind():
    cases = {
        "fasterrcnn_resnet50_fpn": [
            "backbone.body.conv1.",
            "backbone.body.layer1.",
            "backbone.body.layer2.",
            "backbone.body.layer3.",
            "backbone.body.layer4.",
        ],
        "deeplabv3_resnet50": [
            "backbone.conv1.",
            "backbone.layer1.",
            "backbone.layer2.",
            "backbone.layer3.",
            "backbone.layer4.",
        ],
        "fasterrcnn_mobilenet_v3_large_fpn": [
            "backbone.body.0.",
            "backbone.body.2.",
            "backbone.body.4.",
            "backbone.body.7.",
            "backbone.body.13.",
        ],
        "ssdlite320_mobilenet_v3_large": [
            "backbone.features.0.0.",
            "backbone.features.0.2.",
            "backbone.features.0.4.",
            "backbone.features.0.7.",
        ],
        "ssd300_vgg16": [
            "backbone.features.0.",
            "backbone.features.5.",
            "backbone.features.10.",
            "backbone.features.17.",
            "backbone.extra.0.1.",
        ],
    }
    for arch, firsts in cases.items():
        fam = families.family_of(arch)
        stages = freeze.backbone_stages(models.skeleton(arch, 3, {}), fam)
        assert [s[0] for s in stages] == firsts, arch
    # ssdlite's last stage runs on into the second half of the split MobileNet
    sk = models.skeleton("ssdlite320_mobilenet_v3_large", 3, {})
    stages = freeze.backbone_stages(sk, families.FAMILIES["ssdlite"])
    assert "backbone.features.1.0." in stages[-1]


def test_backbone_last_k_edges():
    fam = families.FAMILIES["retinanet"]
    model = models.skeleton("retinanet_resnet50_fpn", 3, {})
    k0 = set(freeze.apply_trainable(model, fam, "backbone_last_k", k=0).trainable_names)
    hn = set(freeze.apply_trainable(model, fam, "heads+neck").trainable_names)
    big = set(freeze.apply_trainable(model, fam, "backbone_last_k", k=99).trainable_names)
    assert k0 == hn and big == set(_names(model))
    count = len(freeze.backbone_stages(model, fam))
    for k in (count, count + 1, 2 * count - 1):  # above the count: every stage, as at it
        assert set(freeze.apply_trainable(model, fam, "backbone_last_k", k=k).trainable_names) == big, k
    k2 = freeze.apply_trainable(model, fam, "backbone_last_k", k=2).trainable_names
    assert any(n.startswith("backbone.body.layer3.") for n in k2)
    assert not any(n.startswith("backbone.body.layer2.") for n in k2)


def test_match_and_its_errors():
    names = ["backbone.body.layer4.0.conv1.weight", "backbone.body.layer4.0.bn1.weight", "head.cls.weight"]
    assert freeze.match(names, ["head.*", "*.bn1.*"]) == [names[1], names[2]]
    with pytest.raises(ValueError, match=r"'backbone\.body\.layer4'.*did you mean 'backbone\.body\.layer4\."):
        freeze.match(names, ["head.*", "backbone.body.layer4"])
    with pytest.raises(ValueError, match=r"'haed\.\*' matches no parameter name; similar names: .*head"):
        freeze.match(names, ["haed.*"])
    with pytest.raises(ValueError, match="HEAD"):
        freeze.match(names, ["HEAD.*"])  # case-sensitive


def test_custom_sets_and_unknown_names():
    fam = families.FAMILIES["ssdlite"]
    model = models.skeleton("ssdlite320_mobilenet_v3_large", 3, {})
    rep = freeze.apply_trainable(model, fam, "mine", custom_sets={"mine": ["head.regression_head.*"]})
    assert rep.trainable_names and all(n.startswith("head.regression_head.") for n in rep.trainable_names)
    with pytest.raises(ValueError, match="unknown trainable set 'nope'"):
        freeze.apply_trainable(model, fam, "nope", custom_sets={"mine": ["head.*"]})
    with pytest.raises(ValueError, match="matches no parameter"):
        freeze.apply_trainable(model, fam, "bad", custom_sets={"bad": ["neck.*"]})
    with pytest.raises(ValueError, match="no freeze preset 'heads\\+neck'"):
        freeze.preset_names(model, families.FAMILIES["fcn"], "heads+neck")


# ---------------------------------------------------------------- bit-identical after a step


def _norm_buffers(model):
    return {
        f"{path}.{b}": t.clone()
        for path, m in model.named_modules()
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d))
        for b, t in m.named_buffers(recurse=False)
    }


def _check_step(model, fam, preset, k=1):
    rep = freeze.apply_trainable(model, fam, preset, k=k)
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats_before = _norm_buffers(model)
    train_step(model, fam, lr=0.1)
    after = dict(model.named_parameters())
    for n in (n for n, p in after.items() if not p.requires_grad):
        assert torch.equal(params_before[n], after[n]), f"{preset}: {n} moved"
    assert any(not torch.equal(params_before[n], after[n]) for n in rep.trainable_names), preset
    stats_after = _norm_buffers(model)
    moved_stats = set()
    for key, before in stats_before.items():
        module_path = key.rsplit(".", 1)[0]
        module = model.get_submodule(module_path)
        own = list(module.parameters(recurse=False))
        is_frozen = isinstance(module, FrozenBatchNorm2d) or (own and not any(p.requires_grad for p in own))
        if is_frozen:
            assert torch.equal(before, stats_after[key]), f"{preset}: frozen norm stat {key} changed"
        elif not torch.equal(before, stats_after[key]):
            moved_stats.add(module_path)
    return moved_stats


FREEZE_CASES = [
    ("ssdlite320_mobilenet_v3_large", "heads"),
    ("ssdlite320_mobilenet_v3_large", "backbone_last_k"),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", "heads+neck"),
    ("retinanet_resnet50_fpn", "backbone_last_k"),
    ("fcos_resnet50_fpn", "heads"),
    ("maskrcnn_resnet50_fpn", "predictors"),
    ("lraspp_mobilenet_v3_large", "heads"),
    ("deeplabv3_mobilenet_v3_large", "heads+neck"),
    ("fcn_resnet50", "backbone_last_k"),
    ("ssd300_vgg16", "heads+neck"),
]


@pytest.mark.parametrize(
    ("arch", "preset"),
    [pytest.param(a, p, marks=pytest.mark.slow) if a in SLOW else (a, p) for a, p in FREEZE_CASES],
)
def test_frozen_tensors_and_norm_stats_bit_identical_after_sgd_step(arch, preset):
    fam = families.family_of(arch)
    model, _ = build(arch)
    moved = _check_step(model, fam, preset)
    if preset in ("heads", "backbone_last_k") and arch.startswith(("ssdlite", "retinanet", "fcn")):
        assert moved, "trainable BatchNorms should still update their statistics"


def test_frozen_batchnorm_from_a_file_stays_frozen_under_all(tmp_path):
    arch = "fasterrcnn_mobilenet_v3_large_320_fpn"
    from torchvision.models import get_model

    state = get_model(arch, weights=None, weights_backbone=None, num_classes=3, **fast_kwargs(arch))
    state = state.state_dict()
    path = tmp_path / "frozen.pth"
    torch.save({k: v for k, v in state.items() if "num_batches_tracked" not in k}, path)
    model, info = build(arch, weights=path)
    assert info["frozen_batchnorm"] > 0
    _check_step(model, families.family_of(arch), "all")


def test_train_mode_puts_only_frozen_norms_in_eval():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4),  # trainable
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)),  # frozen
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, affine=False)),  # no params: follows parent
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, affine=False)),
    )
    for p in model[2].parameters():
        p.requires_grad_(False)
    for p in model[3].parameters():
        p.requires_grad_(False)
    freeze.train_mode(model)
    assert model.training and model[1].training
    assert not model[2][1].training and not model[3][1].training
    assert model[4][1].training and model[2].training
