"""Conformance over every table entry: families, loss rows, activation rows, presets.

The pure-Python name lists (params.py, families.py) must agree with the torch-side tables, and
every row must really do something: each loss row changes the loss the model computes (or
equals it exactly where the family declares it native), each activation row replaces modules.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

from tests.test_models import CHEAP, SLOW, build, loss_dict, one_thread  # noqa: F401
from trainables import activations, families, freeze, loss_table, losses, models, weights
from trainables import params as P

DET_FAMILIES = [f for f in families.FAMILIES.values() if f.box_losses or f.cls_losses]


# ---------------------------------------------------------------- names agree across tables


def test_name_tables_agree():
    assert set(activations.ACTIVATIONS) == set(P.ACTIVATION_NAMES) - {"keep"}
    assert set(loss_table.BOX_TABLE) == set(P.BOX_LOSSES) - {"default"}
    assert set(loss_table.CLS_TABLE) == set(P.CLS_LOSSES) - {"default"}
    used_box = {b for f in families.FAMILIES.values() for b in f.box_losses}
    used_cls = {c for f in families.FAMILIES.values() for c in f.cls_losses}
    assert used_box == set(loss_table.BOX_TABLE) and used_cls == set(loss_table.CLS_TABLE)
    assert set(families.SCOPES) == set(P.ACTIVATION_SCOPES)


def test_table_modules_import_no_torch():
    code = "import sys, trainables.families, trainables.params; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("fam", families.FAMILIES.values(), ids=lambda f: f.name)
def test_family_rows_are_consistent(fam):
    assert fam.task in (families.DETECTION, families.INSTANCE, families.SEMANTIC)
    assert set(fam.presets) <= set(freeze.PRESETS)
    assert {"all", "heads", "backbone_last_k"} <= set(fam.presets)
    assert ("heads+neck" in fam.presets) == bool(fam.neck_prefixes)
    assert len(set(fam.loss_terms)) == len(fam.loss_terms)
    if fam.task == families.SEMANTIC:
        assert not fam.box_losses and not fam.cls_losses
    else:
        assert fam.box_term in fam.loss_terms and fam.cls_term in fam.loss_terms
        for arch in fam.archs:
            assert fam.native_box(arch) in (None, *fam.box_losses)
        assert fam.default_cls in (None, *fam.cls_losses)
    for arch in fam.archs:
        assert families.family_of(arch) is fam
    assert CHEAP[fam.name] in fam.archs


def test_family_of_covers_exactly_the_listed_torchvision_builders():
    listed = set(families.all_archs())
    builders = set(torchvision.models.list_models(module=torchvision.models.detection))
    builders |= set(torchvision.models.list_models(module=torchvision.models.segmentation))
    assert listed <= builders
    mapped = {b for b in builders if families.family_of(b) is not None}
    assert mapped == listed, mapped ^ listed
    assert families.family_of("keypointrcnn_resnet50_fpn") is None
    assert families.family_of("resnet50") is None


@pytest.mark.parametrize("arch", families.all_archs())
def test_every_arch_layout_matches_its_family(arch):
    fam = families.family_of(arch)
    kwargs = {"aux_loss": True} if fam.name in ("deeplabv3", "fcn") else {}
    sk = models.skeleton(arch, 3, kwargs)
    names = [n for n, _ in sk.named_parameters()]
    other = [n for n in names if fam.part(n) == "other"]
    assert not other, other[:5]
    for scope in ("heads", "backbone") + (("neck",) if fam.neck_prefixes else ()):
        assert any(fam.part(n) == scope for n in names), scope
    for glob in fam.predictors:
        assert freeze.match(names, [glob])
        assert all(fam.part(n) == "heads" for n in freeze.match(names, [glob]))
    stages = freeze.backbone_stages(sk, fam)
    assert len(stages) >= 4
    assert all(fam.part(p) == "backbone" for s in stages for p in s)
    one = models.skeleton(arch, 1, kwargs).state_dict()[fam.num_classes_key].shape[0]
    assert sk.state_dict()[fam.num_classes_key].shape[0] == 3 * one
    assert (
        models.pretrained_num_classes(arch, fam, {fam.num_classes_key: torch.zeros(7 * one, 1)}, kwargs) == 7
    )


def test_backbone_weights_enum():
    from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights, VGG16_Weights

    assert weights.backbone_weights_enum("fasterrcnn_resnet50_fpn") is ResNet50_Weights
    assert weights.backbone_weights_enum("ssdlite320_mobilenet_v3_large") is MobileNet_V3_Large_Weights
    assert weights.backbone_weights_enum("ssd300_vgg16") is VGG16_Weights
    assert weights.backbone_weights_enum("mobilenet_v2") is None


# ---------------------------------------------------------------- loss rows change the loss


def _loss_cases():
    cases = []
    for fam in DET_FAMILIES:
        arch = CHEAP[fam.name]
        for kind, values in (("box", fam.box_losses), ("cls", fam.cls_losses)):
            for value in values:
                slow = arch in SLOW or (fam.name == "maskrcnn" and value not in ("giou", "focal"))
                case = (arch, kind, value)
                cases.append(pytest.param(*case, marks=pytest.mark.slow) if slow else case)
    return cases


_BASES: dict[str, nn.Module] = {}
_DEFAULTS: dict[str, dict] = {}


def _base(arch):
    if arch not in _BASES:
        _BASES.clear()  # keep one model alive at a time
        torch.manual_seed(0)
        _BASES[arch] = build(arch)[0]
    return _BASES[arch]


def _losses_with(arch, params):
    if not params and arch in _DEFAULTS:
        return _DEFAULTS[arch]
    fam = families.family_of(arch)
    model = copy.deepcopy(_base(arch))
    losses.apply_losses(model, fam, P.resolve(params))
    model.train()
    with torch.no_grad():
        out = {k: v.detach() for k, v in loss_dict(model, fam).items()}
    if not params:
        _DEFAULTS[arch] = out
    return out


@pytest.mark.parametrize(("arch", "kind", "value"), _loss_cases())
def test_every_loss_row_changes_the_computed_loss(arch, kind, value):
    fam = families.family_of(arch)
    term = fam.box_term if kind == "box" else fam.cls_term
    default = _losses_with(arch, {})
    native = fam.native_box(arch) if kind == "box" else fam.default_cls
    extra = {"loss.focal_gamma": 1.0, "loss.focal_alpha": 0.5} if value == "focal" else {}
    swapped = _losses_with(arch, {f"loss.{kind}": value, **extra})
    assert set(swapped) == set(default)
    for k in default:
        assert torch.isfinite(swapped[k]), k
        if k != term:
            assert torch.allclose(swapped[k], default[k], rtol=1e-6, atol=0), f"{k} should not change"
    if value == native and not extra:
        assert torch.allclose(swapped[term], default[term], rtol=1e-5, atol=1e-7)
    else:
        assert not torch.allclose(swapped[term], default[term], rtol=1e-4, atol=0), (
            f"{value} did not change {term}: {float(swapped[term])}"
        )
    if value == "focal" and native == "focal":  # the native focal is reproduced with its defaults
        same = _losses_with(arch, {"loss.cls": "focal"})
        assert torch.allclose(same[term], default[term], rtol=1e-5)


@pytest.mark.parametrize("name", ["retinanet", "fcos"])
def test_focal_settings_act_under_the_default_cls_loss(name):
    """RetinaNet's and FCOS's own loss is focal at 2, 0.25: other loss.focal_* values act under
    loss.cls default as under loss.cls focal (else searching them would repeat one trial)."""
    arch, term = CHEAP[name], families.FAMILIES[name].cls_term
    tuned = {"loss.focal_gamma": 1.0, "loss.focal_alpha": 0.5}
    default, under_default = _losses_with(arch, {}), _losses_with(arch, tuned)
    assert not torch.allclose(under_default[term], default[term], rtol=1e-4, atol=0)
    explicit = _losses_with(arch, {"loss.cls": "focal", **tuned})
    assert torch.allclose(under_default[term], explicit[term], rtol=1e-6)


def test_rcnn_native_classifier_is_reproduced():
    arch = CHEAP["fasterrcnn"]
    default = _losses_with(arch, {})
    ce = _losses_with(arch, {"loss.cls": "ce", "loss.box": "l1"})
    assert torch.allclose(ce["loss_classifier"], default["loss_classifier"], rtol=1e-6)


def test_unsupported_loss_is_refused():
    fam = families.FAMILIES["ssdlite"]
    with pytest.raises(ValueError, match="cannot use loss.cls 'dice'"):
        losses.apply_losses(nn.Module(), fam, P.resolve({"loss.cls": "dice"}))


def test_semantic_loss_rows_and_aux_weight():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    target[0, 0] = 255
    out = {"out": logits, "aux": logits * 0.5}
    values = {}
    for seg in P.SEG_LOSSES:
        terms = losses.semantic_losses(out, target, P.resolve({"loss.seg": seg}))
        assert set(terms) == {"loss_seg", "loss_aux"} and torch.isfinite(terms["loss_seg"])
        values[seg] = float(terms["loss_seg"])
    assert len(set(values.values())) == len(values)
    smooth = losses.semantic_losses(out, target, P.resolve({"loss.label_smoothing": 0.2}))["loss_seg"]
    assert float(smooth) != values["ce"]
    ignored = torch.full_like(target, 255)
    assert float(losses.semantic_losses(out, ignored, P.resolve({}))["loss_seg"]) == 0.0
    terms = losses.semantic_losses(out, target, P.resolve({}))
    total = losses.weighted_total(terms, P.resolve({"loss.aux_weight": 0.25, "loss.weight.loss_seg": 2.0}))
    assert torch.allclose(total, 2.0 * terms["loss_seg"] + 0.25 * terms["loss_aux"])
    assert set(losses.semantic_losses({"out": logits}, target, P.resolve({}))) == {"loss_seg"}


def test_weighted_total():
    d = {"classification": torch.tensor(2.0), "bbox_regression": torch.tensor(3.0)}
    assert float(losses.weighted_total(d, P.resolve({}))) == 5.0
    params = P.resolve({"loss.weight.bbox_regression": 0.0, "loss.weight.classification": 1.5})
    assert float(losses.weighted_total(d, params)) == 3.0
    with pytest.raises(ValueError, match="empty"):
        losses.weighted_total({}, params)


def test_softmax_focal_reduces_to_ce():
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 2])
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(loss_table.softmax_focal(logits, labels, 0.0, -1.0), ce, atol=1e-6)
    assert (loss_table.softmax_focal(logits, labels, 2.0, -1.0) <= ce + 1e-6).all()


# ---------------------------------------------------------------- activation rows


@pytest.mark.parametrize("name", sorted(activations.ACTIVATIONS))
def test_every_activation_row_replaces_modules(name):
    fam = families.FAMILIES["ssdlite"]
    sk = models.skeleton("ssdlite320_mobilenet_v3_large", 3, {})
    gates = sum(isinstance(m, nn.Hardsigmoid) for m in sk.modules())
    n = activations.swap_activations(sk, fam, name, "all")
    assert n > 0
    target = type(activations.ACTIVATIONS[name].factory())
    left = {type(m) for m in sk.modules() if type(m) in activations.SWAPPABLE}
    assert left == {target}
    assert sum(isinstance(m, nn.Hardsigmoid) for m in sk.modules()) == gates > 0  # gates untouched
    assert activations.swap_activations(sk, fam, name, "all") == 0  # nothing left to change


def test_activation_scopes_match_the_documented_counts():
    counts = {}
    for fam_name, arch in CHEAP.items():
        fam = families.FAMILIES[fam_name]
        sk = models.skeleton(arch, 3, {})
        counts[fam_name] = {
            s: sum(activations.count_activations(sk, fam, s).values()) for s in families.SCOPES
        }
    assert counts["fasterrcnn"]["heads"] == 1 and counts["fasterrcnn"]["neck"] == 0  # F.relu elsewhere
    assert counts["retinanet"]["neck"] == 0 and counts["retinanet"]["heads"] == 8
    assert counts["deeplabv3"]["neck"] > 0 and counts["fcn"]["neck"] == 0 and counts["lraspp"]["neck"] == 0
    assert counts["ssd"]["heads"] == 0 and counts["ssd"]["neck"] > 0
    for fam_name, c in counts.items():
        assert c["all"] == c["heads"] + c["neck"] + c["backbone"], fam_name
        assert c["backbone"] > 0


def test_swapped_model_still_trains_and_keep_does_nothing():
    model, info = build("lraspp_mobilenet_v3_large", {"activation": "mish", "activation_scope": "backbone"})
    assert info["activations_replaced"] > 0
    assert any(isinstance(m, nn.Mish) for m in model.backbone.modules())
    assert not any(isinstance(m, nn.Mish) for m in model.classifier.modules())
    from tests.test_models import train_step

    terms, total = train_step(model, families.FAMILIES["lraspp"])
    assert torch.isfinite(total)
    assert activations.swap_activations(model, families.FAMILIES["lraspp"], "keep", "all") == 0
    with pytest.raises(ValueError, match="unknown activation"):
        activations.swap_activations(model, families.FAMILIES["lraspp"], "swish", "all")
