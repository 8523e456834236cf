"""Composed models, continued: the spec keys of a composition (``model.backbone``, ``fpn``,
``backbone_weights``...) reach the trial config, their static and deep errors, and the bundled
composed spec validates and runs a short trial. CPU, one torch thread (:mod:`tests.test_models`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import pytest
import torch

from search.errors import SpecError
from search.spec import build_spec, deep_check, load_spec
from tests.test_compose import SPEC
from tests.test_models import one_thread  # noqa: F401 (one_thread: module fixture)
from tests.test_spec import ROOT, spec_dict
from trainables import compose, families
from trainables import params as P


def _raw(**model):
    raw = spec_dict()
    raw["model"] = {"arch": "fasterrcnn", "backbone": "mobilenet_v3_small", **model}
    raw["space"] = {"trainable": {"choices": ["heads", "heads+neck", "backbone_last_k"]}}
    return raw


def test_spec_fields_reach_the_trial_config(tmp_path):
    spec = build_spec(
        _raw(
            fpn=False,
            feature_layers=[12],
            anchor_sizes=[[16, 32]],
            aspect_ratios=[1.0],
            weights_backbone="IMAGENET1K_V1",
            kwargs={"min_size": 100},
        ),
        ROOT,
    )
    cfg = spec.trial_config(out_dir=tmp_path)
    c = cfg.model_kwargs["compose"]
    assert cfg.model_kwargs["min_size"] == 100 and c["backbone"] == "mobilenet_v3_small"
    assert c["feature_layers"] == ["12"] and c["fpn"] is False and c["frozen_batchnorm"] is True
    facts = deep_check(spec)  # the skeleton sees the same settings
    assert facts["parameters"] > 0
    p = compose.plan("fasterrcnn", families.family_of("fasterrcnn"), compose.Settings.from_dict(c))
    assert p.anchor_sizes == ((16, 32),) and p.aspect_ratios == ((1.0,),)
    settings = compose.Settings.from_dict(c)
    assert compose.Settings.from_dict(settings.to_dict()) == settings


@pytest.mark.parametrize(
    ("model", "key", "text"),
    [
        ({"backbone": None}, "model.backbone", "is required"),
        ({"anchor_sizes": [[32], [64]]}, "model.anchor_sizes", "but the model has 5 feature maps"),
        ({"fpn": False, "anchor_sizes": [[32], [64]]}, "model.anchor_sizes", "1 feature map;"),
        (
            {"feature_layers": ["3", "6"], "anchor_sizes": [[32]] * 4},
            "model.anchor_sizes",
            "lists 4 size groups",
        ),
        ({"fpn": False, "feature_layers": ["3", "8"]}, "model.feature_layers", "exactly one feature layer"),
        ({"aspect_ratios": [[1.0]] * 4}, "model.aspect_ratios", "lists 4 ratio groups"),
        ({"anchor_sizes": [[32], [64], [128], [256], [512, 600]]}, "model.anchor_sizes", "different numbers"),
        ({"weights": "DEFAULT"}, "model.weights", "no weight enum"),
        ({"fpn": False, "fpn_channels": 64}, "model.fpn_channels", "only applies with fpn: true"),
        ({"arch": "retinanet", "roi_output_size": 5}, "model.roi_output_size", "not retinanet"),
        ({"mask_roi_output_size": 7}, "model.mask_roi_output_size", "applies to maskrcnn"),
        ({"arch": "fcos", "anchor_sizes": [[8, 16]] * 5}, "model.anchor_sizes", "anchor-free"),
        ({"arch": "ssdlite320_mobilenet_v3_large"}, "model.backbone", "only applies to composed archs"),
        ({"kwargs": {"compose": {}}}, "model.kwargs.compose", "reserved"),
    ],
)
def test_spec_static_errors(model, key, text):
    with pytest.raises(SpecError) as err:
        build_spec(_raw(**model), ROOT)
    assert err.value.key == key and text in str(err.value), str(err.value)


def test_spec_semantic_composition_rules():
    raw = _raw(arch="deeplabv3", fpn=True)
    raw["task"] = "semantic_segmentation"
    raw["objective"] = {"metric": "miou", "mode": "max"}
    with pytest.raises(SpecError, match="model.fpn: deeplabv3 compositions take no FPN"):
        build_spec(raw, ROOT)
    raw["model"] = {"arch": "deeplabv3", "backbone": "resnet18", "anchor_sizes": [[32]]}
    with pytest.raises(SpecError, match="model.anchor_sizes: applies to detection"):
        build_spec(raw, ROOT)
    # an aux unit without aux_loss was dropped without a word (and loss.aux_weight did nothing)
    fcn = ["model.arch=fcn", "model.backbone=resnet18", "model.weights=none", "space.trainable=heads"]
    fcn.append("model.feature_layers=[layer2, layer4]")
    with pytest.raises(SpecError) as err:
        deep_check(load_spec(ROOT / "spaces/seg.yaml", fcn))
    assert err.value.key == "model.feature_layers" and "aux_loss is not true" in err.value.message
    deep_check(load_spec(ROOT / "spaces/seg.yaml", [*fcn, "model.kwargs={aux_loss: true}"]))


@pytest.mark.parametrize(
    ("model", "key", "text"),
    [
        ({"backbone": "mobilenetv2"}, "model.backbone", "Did you mean 'mobilenet_v2'"),
        ({"backbone": "swin_t"}, "model.backbone", "does not compose"),
        ({"feature_layers": ["3", "99"]}, "model.feature_layers", "not a unit of mobilenet_v3_small"),
        ({"feature_layers": ["8", "3", "12"]}, "model.feature_layers", "forward order"),
        ({"weights_backbone": "IMAGENET1K_V9"}, "model.weights_backbone", "MobileNet_V3_Small_Weights"),
        ({"kwargs": {"rpn_anchor_generator": 1}}, "model.kwargs", "must not set"),
        # FCOS's GroupNorm(32, C): torch's own words said model.kwargs
        ({"arch": "fcos", "fpn_channels": 100}, "model.fpn_channels", "GroupNorm(32, C)"),
        ({"arch": "fcos", "fpn": False, "feature_layers": ["8"]}, "model.feature_layers", "C = 48"),
    ],
)
def test_spec_deep_errors(model, key, text):
    spec = build_spec(_raw(**model), ROOT)
    with pytest.raises(SpecError) as err:
        deep_check(spec)
    assert err.value.key == key and text in str(err.value), str(err.value)
    assert "use one of" in str(err.value) or key != "model.backbone"


def test_unknown_backbone_lists_the_valid_ones():
    spec = build_spec(_raw(backbone="resnet51"), ROOT)
    with pytest.raises(SpecError) as err:
        deep_check(spec)
    assert all(b in str(err.value) for b in compose.backbones())
    assert "Did you mean 'resnet50'" in str(err.value)


def test_bundled_composed_spec_validates():
    spec = load_spec(SPEC)
    assert spec.model.arch == "fasterrcnn" and spec.model.backbone == "mobilenet_v2"
    facts = deep_check(spec)
    assert facts["parameters"] > 2_000_000
    c = spec.trial_config(out_dir=Path("/nonexistent")).model_kwargs["compose"]
    assert c["fpn"] is False and c["frozen_batchnorm"] is True


def test_bundled_composed_spec_runs_a_short_trial(tmp_path, hub, mobilenet_v2_file):
    """The spec's ImageNet backbone loads offline only from the shared weights (through the hub)."""
    from trainables import checkpoint
    from trainables.trial import run_trial

    (hub / "checkpoints").mkdir()
    os.symlink(mobilenet_v2_file, hub / "checkpoints" / mobilenet_v2_file.name)
    spec = load_spec(
        SPEC,
        [
            "train.epochs=1",
            "train.limit_train=4",
            "train.limit_val=2",
            "train.batch_size=2",
            "data.image_size=128",
            "model.kwargs={min_size: 128, max_size: 128}",
            "model.roi_output_size=3",
        ],
    )
    cfg = spec.trial_config(out_dir=tmp_path / "trial")
    params = P.resolve(copy.deepcopy(spec.search_space.defaults()))
    result = run_trial(cfg, params)
    assert result["status"] == "ok", result
    assert result["build"]["weights_backbone"].startswith("enum:MobileNet_V2_Weights")
    assert [h["epoch"] for h in result["history"]] == [0, 1]
    model = checkpoint.load_trained(cfg, params, spec.num_classes + 1, Path(result["checkpoint"]))
    want = torch.load(mobilenet_v2_file, map_location="cpu", weights_only=True)
    got = model.state_dict()["backbone.body.3.conv.0.0.weight"]
    assert torch.equal(got, want["features.3.conv.0.0.weight"])
    # export: the bundle rebuilds the composition and reproduces the trial model's outputs
    from search import bundle

    meta = bundle.build_bundle(cfg, Path(result["checkpoint"]), spec.class_names, tmp_path / "bundle")
    assert meta["arch"] == "fasterrcnn" and meta["builder"] == "search"
    loaded, _ = bundle.load_bundle(tmp_path / "bundle")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize(
    ("arch", "kwargs", "builder"),
    [
        ("fasterrcnn_mobilenet_v3_large_320_fpn", {}, "torchvision"),
        ("fasterrcnn", {"compose": {"backbone": "mobilenet_v3_small"}}, "search"),
    ],
)
def test_a_bundle_rebuilds_the_trial_models_input_size(arch, kwargs, builder):
    """R-CNN-like models take data.image_size as their input: model.yaml's builder_kwargs carry
    it, so that the bundle's model resizes an image as the trial's did (not to 800 or 320)."""
    from search import bundle, bundle_load
    from tests.test_models import config
    from trainables import models

    cfg = dataclasses.replace(config(arch), model_kwargs=kwargs, image_size=96)
    trial_model, info = models.build_model(cfg, P.resolve({}), 3)
    meta = bundle._model_yaml(cfg, Path("best.pt"), {"params": {}}, info, trial_model, ["a", "b"], None)
    assert meta["builder"] == builder and "_skip_resize" not in meta["builder_kwargs"]
    loaded = bundle_load.build(meta)
    for model in (trial_model, loaded):
        model.eval()
        assert model.transform([torch.rand(3, 300, 400)])[0].image_sizes[0] == (72, 96)
