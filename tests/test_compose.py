"""Composed models (arch fasterrcnn/maskrcnn/retinanet/fcos/deeplabv3/fcn + model.backbone).

Every listed backbone family trains one step and evaluates at 100 px with and without FPN; the
other heads with one backbone each; the layout fits the family rows (freeze presets, stages,
activations, losses); backbone weights load by enum (the shared MobileNetV2 file through a
temporary hub cache) and by file; a frozen backbone stays bit-identical; the spec keys validate.
CPU, one torch thread, random init unless a test writes or links its own weights.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import torch
from torchvision.models import get_model, get_model_weights
from torchvision.ops.misc import FrozenBatchNorm2d

from tests.test_freeze import _check_step
from tests.test_models import (  # noqa: F401 (one_thread: module fixture)
    NUM_CLASSES,
    SIZE,
    det_batch,
    one_thread,
    sem_batch,
    train_step,
)
from tests.test_spec import ROOT
from trainables import activations, compose, compose_build, families, freeze, losses, models, weights
from trainables import params as P
from trainables.config import DataSplit, TrialConfig

SPEC = ROOT / "spaces" / "examples" / "det-mobilenet_v2.yaml"
# Keep CPU steps short: 100-px inputs, few RoIs and proposals, few detections when evaluating.
FAST = {
    "min_size": SIZE,
    "max_size": 128,
    "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 200,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 100,
    "box_batch_size_per_image": 64,
    "box_detections_per_img": 10,
}
BACKBONES = [
    "resnet18",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "convnext_tiny",
    "regnet_y_400mf",
]
SLOW_BACKBONES = {("convnext_tiny", False), ("efficientnet_b0", False), ("mobilenet_v3_large", False)}
OTHER_HEADS = [  # (arch, backbone, fpn)
    ("retinanet", "regnet_y_400mf", True),
    ("retinanet", "mobilenet_v3_small", False),
    ("fcos", "efficientnet_b0", True),
    ("fcos", "mobilenet_v3_small", False),
    ("maskrcnn", "mobilenet_v3_small", True),
    ("deeplabv3", "resnet18", None),
    ("fcn", "mobilenet_v3_small", None),
]


def kwargs_for(arch: str, **settings) -> dict:
    fam = families.family_of(arch)
    kw = {} if fam.task == families.SEMANTIC else dict(FAST)
    if fam.name in ("retinanet", "fcos"):
        kw = {k: v for k, v in kw.items() if k in ("min_size", "max_size")} | {"detections_per_img": 10}
    if settings.pop("aux_loss", False):
        kw["aux_loss"] = True
    return kw | {"compose": settings}


def config(arch: str, weights=None, weights_backbone=None, **settings) -> TrialConfig:
    split = DataSplit(images=Path("/nonexistent"), annotations=Path("/nonexistent.json"))
    return TrialConfig(
        task=families.family_of(arch).task,
        arch=arch,
        train=split,
        val=split,
        out_dir=Path("/nonexistent"),
        weights=None if weights is None else str(weights),
        weights_backbone=None if weights_backbone is None else str(weights_backbone),
        model_kwargs=kwargs_for(arch, **settings),
    )


def build(arch: str, params: dict | None = None, weights=None, weights_backbone=None, **settings):
    cfg = config(arch, weights, weights_backbone, **settings)
    return models.build_model(cfg, P.resolve(params or {}), NUM_CLASSES)


def _names(model):
    return [n for n, _ in model.named_parameters()]


def _trains_and_evaluates(model, fam):
    terms, total = train_step(model, fam)
    expected = set(fam.loss_terms) - ({"loss_aux"} if fam.task == families.SEMANTIC else set())
    assert expected <= set(terms) <= set(fam.loss_terms), sorted(terms)
    assert math.isfinite(float(total.detach()))
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in model.named_parameters()
        if fam.part(n) == "backbone"
    )
    model.eval()
    with torch.no_grad():
        if fam.task == families.SEMANTIC:
            assert model(sem_batch()[0])["out"].shape == (2, NUM_CLASSES, SIZE, SIZE)
        else:
            out = model(det_batch(masks=fam.task == families.INSTANCE)[0])
            assert len(out) == 2 and {"boxes", "scores", "labels"} <= set(out[0])
            if fam.task == families.INSTANCE:
                assert "masks" in out[0]


def _layout_fits_family(model, fam, arch, settings):
    names = _names(model)
    assert not [n for n in names if fam.part(n) == "other"]
    sk = models.skeleton(arch, NUM_CLASSES, kwargs_for(arch, **settings))
    assert [n for n, _ in sk.named_parameters()] == names  # the meta skeleton is named like the model
    assert all(p.device.type == "meta" for p in sk.parameters())
    stages = freeze.backbone_stages(model, fam)
    assert len(stages) >= 4 and all(fam.part(p) == "backbone" for s in stages for p in s)
    for glob in fam.predictors:
        if fam.task == families.SEMANTIC and glob.startswith("aux_") and model.aux_classifier is None:
            continue
        assert all(fam.part(n) == "heads" for n in freeze.match(names, [glob]))
    has_neck = any(fam.part(n) == "neck" for n in names)
    assert has_neck == (settings.get("fpn", fam.task != families.SEMANTIC) or fam.name == "deeplabv3")


# ---------------------------------------------------------------- every backbone family, every head


@pytest.mark.parametrize(
    ("backbone", "fpn"),
    [
        pytest.param(b, f, marks=pytest.mark.slow) if (b, f) in SLOW_BACKBONES else (b, f)
        for b in BACKBONES
        for f in (True, False)
    ],
    ids=lambda v: {True: "fpn", False: "nofpn"}.get(v, v) if isinstance(v, bool) else v,
)
def test_fasterrcnn_over_each_backbone_trains_and_evaluates(backbone, fpn):
    # small FPN / RoI sizes keep the step short (the no-FPN box head is a 1280*7*7 x 1024 linear)
    settings = (
        {"backbone": backbone, "fpn": fpn, "fpn_channels": 64}
        if fpn
        else {"backbone": backbone, "fpn": False, "roi_output_size": 3}
    )
    torch.manual_seed(0)
    model, info = build("fasterrcnn", **settings)
    fam = families.family_of("fasterrcnn")
    assert fam.composed and info["family"] == "fasterrcnn" and info["weights_backbone"] == "none"
    assert info["frozen_batchnorm"] == 0 and info["compose"]["fpn"] is fpn
    n_maps = len(info["compose"]["feature_layers"]) + (1 if fpn else 0)
    assert len(info["compose"]["anchor_sizes"]) == n_maps == len(info["compose"]["aspect_ratios"])
    _layout_fits_family(model, fam, "fasterrcnn", settings)
    _trains_and_evaluates(model, fam)


@pytest.mark.parametrize(("arch", "backbone", "fpn"), OTHER_HEADS)
def test_other_heads_train_and_evaluate(arch, backbone, fpn):
    settings = {"backbone": backbone} | ({"fpn": fpn, "fpn_channels": 64} if fpn else {})
    if fpn is False:
        settings["fpn"] = False
    if families.family_of(arch).task == families.SEMANTIC:
        settings["aux_loss"] = arch == "deeplabv3"
    torch.manual_seed(0)
    model, info = build(arch, **settings)
    fam = families.family_of(arch)
    _layout_fits_family(model, fam, arch, settings)
    if arch == "deeplabv3":  # resnet18 cannot dilate: out layer4, aux layer3 (the stride group before)
        assert info["compose"]["feature_layers"] == ["layer3", "layer4"] and model.aux_classifier is not None
    if arch == "fcos":
        assert all(len(s) == 1 for s in info["compose"]["anchor_sizes"])
    _trains_and_evaluates(model, fam)


def test_default_feature_layers_and_anchors_follow_torchvision():
    fam = families.family_of("fasterrcnn")
    p = compose.plan("fasterrcnn", fam, compose.Settings("resnet50"))
    assert p.layers == ("layer1", "layer2", "layer3", "layer4") and p.channels == (256, 512, 1024, 2048)
    assert p.anchor_sizes == ((32,), (64,), (128,), (256,), (512,))  # = fasterrcnn_resnet50_fpn's
    p = compose.plan("retinanet", families.family_of("retinanet"), compose.Settings("resnet50"))
    assert p.layers == ("layer2", "layer3", "layer4")
    assert p.anchor_sizes[0] == (32, 40, 50) and len(p.anchor_sizes) == 5  # = _default_anchorgen
    p = compose.plan("fcos", families.family_of("fcos"), compose.Settings("resnet50"))
    assert p.anchor_sizes == ((8,), (16,), (32,), (64,), (128,)) and p.aspect_ratios[0] == (1.0,)
    p = compose.plan("fasterrcnn", fam, compose.Settings("mobilenet_v2", fpn=False))
    assert p.layers == ("18",) and p.anchor_sizes == ((32, 64, 128, 256, 512),)  # the tutorial
    p = compose.plan(
        "deeplabv3", families.family_of("deeplabv3"), compose.Settings("mobilenet_v3_large"), aux=True
    )
    assert p.layers == ("12", "16")
    # the composed layout equals the builder's: a builder-family glob works on a composition
    sk = models.skeleton("fasterrcnn", 3, {"compose": {"backbone": "resnet50"}})
    ref = models.skeleton("fasterrcnn_resnet50_fpn", 3, {})
    assert [n for n, _ in sk.named_parameters()] == [n for n, _ in ref.named_parameters()]


def test_family_rows_and_names():
    for arch in families.composed_archs():
        fam = families.family_of(arch)
        base = families.FAMILIES[arch]
        assert fam.composed and fam.archs == (arch,) and fam.name == base.name
        assert (fam.backbone_prefixes, fam.neck_prefixes, fam.head_prefixes) == (
            base.backbone_prefixes,
            base.neck_prefixes,
            base.head_prefixes,
        )
    assert families.family_of("fasterrcnn_resnet50_fpn") is families.FAMILIES["fasterrcnn"]
    assert families.family_of("fcn_resnet50") is families.FAMILIES["fcn"]
    assert families.family_of("fasterrcnn") is families.COMPOSED["fasterrcnn"]
    assert families.family_of("ssd") is families.FAMILIES["ssd"]  # prefix mapping kept
    assert "fasterrcnn" not in families.all_archs()
    assert set(compose.backbones()) >= set(BACKBONES)
    assert not any(b.startswith(("vit_", "swin_")) for b in compose.backbones())


# One backbone of each torchvision classification family that composes.
REPRESENTATIVES = [
    "alexnet",
    "convnext_tiny",
    "densenet121",
    "efficientnet_b0",
    "efficientnet_v2_s",
    "mnasnet0_5",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "regnet_x_400mf",
    "resnet18",
    "resnext50_32x4d",
    "shufflenet_v2_x0_5",
    "squeezenet1_0",
    "vgg11_bn",
    "wide_resnet50_2",
]


def _units_and_skeleton(name):
    us = compose.units(name)
    assert len(compose._groups(us)) >= 4 and us[-1].stride >= 16, name
    for arch in ("fasterrcnn", "retinanet"):
        sk = models.skeleton(arch, 3, {"compose": {"backbone": name}})
        fam = families.family_of(arch)
        assert not [n for n, _ in sk.named_parameters() if fam.part(n) == "other"], name
        assert len(freeze.backbone_stages(sk, fam)) >= 3, name


def test_each_backbone_family_composes_on_the_meta_device():
    """Unit analysis (a meta forward) and a meta skeleton for one backbone of every family."""

    def kind(n):
        return re.match("[a-z]+", n).group()

    assert {kind(n) for n in compose.backbones()} == {kind(n) for n in REPRESENTATIVES}
    for name in REPRESENTATIVES:
        _units_and_skeleton(name)


@pytest.mark.slow
def test_every_composable_backbone_composes_on_the_meta_device():
    for name in compose.backbones():
        _units_and_skeleton(name)


# ---------------------------------------------------------------- freeze, activations, losses


def test_frozen_backbone_is_bit_identical_after_a_step():
    """heads+neck over a BatchNorm backbone (trained from scratch: BatchNorm2d, not frozen ones)."""
    torch.manual_seed(0)
    model, _ = build("fasterrcnn", backbone="mobilenet_v3_small", fpn=True, fpn_channels=64)
    fam = families.family_of("fasterrcnn")
    assert any(type(m) is torch.nn.BatchNorm2d for m in model.backbone.body.modules())
    _check_step(model, fam, "heads+neck")
    for n, p in model.named_parameters():
        assert p.requires_grad == (fam.part(n) != "backbone"), n
    # backbone_last_k trains exactly the last stride stage of the backbone
    rep = freeze.apply_trainable(model, fam, "backbone_last_k", k=1)
    last = freeze.backbone_stages(model, fam)[-1]
    trained_backbone = [n for n in rep.trainable_names if fam.part(n) == "backbone"]
    assert trained_backbone and all(n.startswith(last) for n in trained_backbone)


def test_frozen_backbone_with_weights_file_and_frozen_batchnorm(tmp_path):
    torch.manual_seed(5)
    state = get_model("resnet18", weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    model, info = build("retinanet", weights_backbone=path, backbone="resnet18", fpn_channels=64)
    fam = families.family_of("retinanet")
    assert info["frozen_batchnorm"] > 0 and info["weights_backbone"] == f"file:{path}"
    assert not any(type(m) is torch.nn.BatchNorm2d for m in model.backbone.body.modules())
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)
    got = model.state_dict()
    assert torch.equal(got["backbone.body.layer2.0.conv1.weight"], state["layer2.0.conv1.weight"])
    assert torch.equal(got["backbone.body.bn1.running_var"], state["bn1.running_var"])
    _check_step(model, fam, "heads")
    _check_step(model, fam, "all")  # frozen norms stay frozen even when everything else trains


def test_activation_and_loss_choices_apply_to_compositions():
    params = {"loss.box": "giou", "loss.cls": "focal", "activation": "silu", "activation_scope": "backbone"}
    model, info = build("fasterrcnn", params, backbone="mobilenet_v2", fpn=True, fpn_channels=64)
    assert isinstance(model.roi_heads, losses.RoIHeadsWithLosses)
    assert info["losses"]["box"] == "giou" and info["activations_replaced"] > 0
    assert activations.count_activations(model, families.family_of("fasterrcnn"), "backbone") == {
        "SiLU": info["activations_replaced"]
    }
    model, info = build("retinanet", {"loss.box": "ciou"}, backbone="mobilenet_v3_small")
    assert model.head.regression_head._loss_type == "ciou"
    with pytest.raises(ValueError, match="cannot use loss.box"):
        build("fcn", {"loss.box": "giou"}, backbone="mobilenet_v3_small")


# ---------------------------------------------------------------- weights


def test_shared_mobilenet_v2_loads_through_the_enum_from_a_temporary_hub(hub, mobilenet_v2_file):
    member = get_model_weights("mobilenet_v2").IMAGENET1K_V1
    path = weights.hub_cache_path(member)
    assert path == hub / "checkpoints" / mobilenet_v2_file.name
    path.parent.mkdir(parents=True)
    os.symlink(mobilenet_v2_file, path)
    model, info = build(
        "fasterrcnn", weights_backbone="IMAGENET1K_V1", backbone="mobilenet_v2", fpn=False, roi_output_size=3
    )
    assert info["weights_backbone"] == f"enum:{member!r}" and info["backbone_sha256"].startswith("b0353104")
    assert info["frozen_batchnorm"] == 52  # every BatchNorm2d of features.0-18, as torchvision's builders
    want = torch.load(mobilenet_v2_file, map_location="cpu", weights_only=True)
    got = model.state_dict()
    fam = families.family_of("fasterrcnn")
    p = compose.plan("fasterrcnn", fam, compose.Settings("mobilenet_v2", fpn=False))
    compared = 0
    for src, dst in compose_build.key_prefixes(p):
        for key, tensor in want.items():
            if key.startswith(src) and not key.endswith("num_batches_tracked"):
                assert torch.equal(got[dst + key[len(src) :]], tensor), key
                compared += 1
    assert compared == len([k for k in want if k.startswith("features.") and "num_batches" not in k])


def test_backbone_enum_missing_from_cache_names_path_and_url(hub):
    member = get_model_weights("resnet18").IMAGENET1K_V1
    with pytest.raises(weights.WeightsError) as err:
        build("fasterrcnn", weights_backbone="IMAGENET1K_V1", backbone="resnet18")
    msg = str(err.value)
    assert str(hub / "checkpoints" / os.path.basename(member.url)) in msg and member.url in msg


def test_backbone_file_must_fit_the_trunk(tmp_path):
    torch.manual_seed(2)
    state = get_model("mobilenet_v3_small", weights=None).state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}  # the head may be absent
    path = tmp_path / "mnv3s.pth"
    torch.save(state, path)
    model, info = build("fcos", weights_backbone=path, backbone="mobilenet_v3_small", frozen_batchnorm=False)
    assert info["frozen_batchnorm"] == 0 and info["backbone_sha256"]
    got = model.state_dict()["backbone.body.4.block.0.0.weight"]
    assert torch.equal(got, state["features.4.block.0.0.weight"])
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.0.weight": torch.zeros(3)}, bad)
    with pytest.raises(weights.WeightsError, match="does not fit mobilenet_v3_small's feature trunk"):
        build("fcos", weights_backbone=bad, backbone="mobilenet_v3_small")
    with pytest.raises(weights.WeightsError, match="no weight enum"):
        build("fcos", weights="DEFAULT", backbone="mobilenet_v3_small")


def test_densenets_published_key_names_load_as_torchvision_loads_them(tmp_path):
    """torchvision's densenet*.pth files name "denselayer1.norm.1.weight" what the model calls
    "denselayer1.norm1.weight" (its enum loader renames them); the file was refused."""
    torch.manual_seed(3)
    state = get_model("densenet121", weights=None).state_dict()
    published = {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in state.items()
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in published
    torch.save(published, tmp_path / "densenet121.pth")
    model, _ = build("fasterrcnn", weights_backbone=tmp_path / "densenet121.pth", backbone="densenet121")
    got = model.backbone.body.state_dict()
    key = next(k for k in got if k.endswith("denselayer1.norm1.weight"))
    assert torch.equal(got[key], state[f"features.{key}"])


def test_composed_file_weights_load_then_predictors_are_replaced(tmp_path):
    settings = {"backbone": "mobilenet_v3_small", "fpn_channels": 64}
    torch.manual_seed(1)
    src, _ = build("fasterrcnn", **settings)
    src.roi_heads.box_predictor = type(src.roi_heads.box_predictor)(1024, 6)  # a 6-class checkpoint
    state = src.state_dict()
    path = tmp_path / "composed.pth"
    torch.save({"model": state}, path)
    model, info = build("fasterrcnn", weights=path, **settings)
    assert info["pretrained_num_classes"] == 6 and info["predictors_replaced"] == ["roi_heads.box_predictor"]
    assert info["missing"] == [] and info["unexpected"] == []
    for k, v in model.state_dict().items():
        if not k.startswith("roi_heads.box_predictor."):
            assert torch.equal(v, state[k]), k


def test_compose_settings_errors():
    with pytest.raises(compose.ComposeError, match="model.backbone"):
        build("fasterrcnn", backbone="vit_b_16")
    with pytest.raises(compose.ComposeError, match="model.feature_layers.*units: conv1"):
        build("fasterrcnn", backbone="resnet18", feature_layers=["layer9"])
    with pytest.raises(compose.ComposeError, match="model.anchor_sizes.*5 feature maps"):
        build("fasterrcnn", backbone="resnet18", anchor_sizes=[[32], [64]])
    with pytest.raises(compose.ComposeError, match="model.kwargs"):
        models.build_model(
            dataclass_replace(
                config("fcn", backbone="resnet18"),
                model_kwargs={"min_size": 3, "compose": {"backbone": "resnet18"}},
            ),
            P.resolve({}),
            NUM_CLASSES,
        )
    with pytest.raises(ValueError, match="only apply to composed archs"):
        models.skeleton("fasterrcnn_resnet50_fpn", 3, {"compose": {"backbone": "resnet18"}})


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)
