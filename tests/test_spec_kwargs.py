"""Spec tests, continued: ``model.kwargs`` (no key silently ignored, every accepted key reaches the
model) and ``activation_scope`` without activations. The base spec is :mod:`tests.test_spec`'s."""

from __future__ import annotations

import pytest

from search.errors import SpecError
from search.spec import build_spec
from tests.test_spec import ROOT, spec_dict

NUCLEI = ROOT / "spaces/data/nuclei"  # masks: a semantic task refuses BCCD's boxes
SEMANTIC_CHANGES = {
    "task": "semantic_segmentation",
    "objective.metric": "miou",
    "data.train.images": str(NUCLEI / "images"),
    "data.train.annotations": str(NUCLEI / "annotations/instances_other_train.json"),
    "data.val.images": str(NUCLEI / "images"),
    "data.val.annotations": str(NUCLEI / "annotations/instances_other_val.json"),
}
COMPOSED_MODEL = {"arch": "fasterrcnn", "backbone": "mobilenet_v3_small", "weights": "none"}


def _kwargs_spec(arch: str, kwargs: dict):
    """The base spec with ``model.arch``/``model.kwargs`` set (semantic task for semantic archs,
    a composition over mobilenet_v3_small for ``fasterrcnn``)."""
    from trainables import families

    changes = SEMANTIC_CHANGES if families.family_of(arch).task == families.SEMANTIC else {}
    raw = spec_dict(**changes)
    raw["model"] = {**COMPOSED_MODEL} if arch == "fasterrcnn" else {"arch": arch, "weights": "none"}
    raw["model"]["kwargs"] = kwargs
    return build_spec(raw, ROOT)


KWARGS_REFUSED = [
    # (arch, kwargs, key path, text in the message); silently ignored keys -> model.kwargs.<key>
    ("ssdlite320_mobilenet_v3_large", {"min_sise": 320}, "model.kwargs.min_sise", "ignore it silently"),
    (
        "ssdlite320_mobilenet_v3_large",
        {"score_tresh": 0.2},
        "model.kwargs.score_tresh",
        "Did you mean 'score_thresh'",
    ),
    ("ssdlite320_mobilenet_v3_large", {"dropout": 0.1}, "model.kwargs.dropout", "ignore it silently"),
    (
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        {"min_sise": 320},
        "model.kwargs.min_sise",
        "Did you mean 'min_size'",
    ),
    (
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        {"min_size": 320, "box_detections_per_im": 50},
        "model.kwargs.box_detections_per_im",
        "Did you mean 'box_detections_per_img'",
    ),
    (
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        {"anchor_generator": None},
        "model.kwargs.anchor_generator",
        "does not take 'anchor_generator'",
    ),
    ("maskrcnn_resnet50_fpn", {"mask_thresh": 0.5}, "model.kwargs.mask_thresh", "ignore it silently"),
    (
        "retinanet_resnet50_fpn",
        {"score_threshold": 0.1},
        "model.kwargs.score_threshold",
        "Did you mean 'score_thresh'",
    ),
    ("lraspp_mobilenet_v3_large", {"aux_los": False}, "model.kwargs.aux_los", "Did you mean 'aux_loss'"),
    (
        "deeplabv3_mobilenet_v3_large",
        {"output_stride": 8},
        "model.kwargs.output_stride",
        "use one of: aux_loss.",
    ),
    (
        "fasterrcnn",
        {"box_detections_per_im": 50},
        "model.kwargs.box_detections_per_im",
        "Did you mean 'box_detections_per_img'",
    ),
    # keys the chain does receive but refuses loudly: the build's own message, as before
    ("ssdlite320_mobilenet_v3_large", {"min_size": 320}, "model.kwargs", "multiple values for argument"),
    ("lraspp_mobilenet_v3_large", {"aux_loss": True}, "model.kwargs", "does not use auxiliary loss"),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", {"num_classes": 5}, "model.kwargs", "must not set"),
    ("fasterrcnn", {"rpn_anchor_generator": 1}, "model.kwargs", "must not set"),
]


@pytest.mark.parametrize(
    "arch,kwargs,key,text", KWARGS_REFUSED, ids=[f"{c[0]}-{next(iter(c[1]))}" for c in KWARGS_REFUSED]
)
def test_model_kwargs_refused(arch, kwargs, key, text):
    from search.spec import deep_check

    with pytest.raises(SpecError) as err:
        deep_check(_kwargs_spec(arch, kwargs))
    assert err.value.key == key and text in str(err.value), str(err.value)
    if key != "model.kwargs":
        assert f"{arch} does not take {key.rsplit('.', 1)[1]!r}" in err.value.message
        assert err.value.fix.startswith("use one of: ")
        assert len(str(err.value).splitlines()) == 1


KWARGS_MISTYPED = [
    # (arch, kwargs, key, words): values the build took without a word and a forward pass failed on
    ("ssdlite320_mobilenet_v3_large", {"topk_candidates": "abc"}, "topk_candidates", "takes an integer"),
    ("ssdlite320_mobilenet_v3_large", {"score_thresh": True}, "score_thresh", "takes a number"),
    ("ssdlite320_mobilenet_v3_large", {"width_mult": "x"}, "width_mult", "takes a number"),
    ("retinanet_resnet50_fpn", {"image_mean": [0.5, "a", 0.5]}, "image_mean", "a list of numbers"),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", {"min_size": 320.5}, "min_size", "an integer or a list"),
    ("fasterrcnn", {"box_detections_per_img": 1.5}, "box_detections_per_img", "takes an integer"),
    ("deeplabv3_mobilenet_v3_large", {"aux_loss": "yes"}, "aux_loss", "a boolean or null"),
]


@pytest.mark.parametrize("arch,kwargs,key,words", KWARGS_MISTYPED, ids=[c[2] for c in KWARGS_MISTYPED])
def test_model_kwargs_of_the_wrong_type_refused(arch, kwargs, key, words):
    from search.spec import deep_check

    with pytest.raises(SpecError) as err:
        deep_check(_kwargs_spec(arch, kwargs))
    assert err.value.key == f"model.kwargs.{key}" and words in err.value.message, str(err.value)
    assert "torchvision's default is" in err.value.fix and len(str(err.value).splitlines()) == 1


KWARGS_ACCEPTED = [
    # (arch, kwargs, {module attribute path: value the skeleton must show}: the key is really used)
    (
        "ssdlite320_mobilenet_v3_large",
        {"score_thresh": 0.2, "detections_per_img": 50},
        {"score_thresh": 0.2, "detections_per_img": 50},
    ),
    ("ssdlite320_mobilenet_v3_large", {"width_mult": 0.5}, {}),
    (
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        {"box_detections_per_img": 50, "rpn_pre_nms_top_n_test": 100, "min_size": 320},
        {
            "roi_heads.detections_per_img": 50,
            "rpn._pre_nms_top_n": {"training": 2000, "testing": 100},
            "transform.min_size": (320,),
        },
    ),
    (
        "maskrcnn_resnet50_fpn",
        {"box_score_thresh": 0.1, "size_divisible": 16, "min_size": 256},
        {"roi_heads.score_thresh": 0.1, "transform.size_divisible": 16},
    ),
    ("fcos_resnet50_fpn", {"center_sampling_radius": 2.0}, {"center_sampling_radius": 2.0}),
    ("lraspp_mobilenet_v3_large", {"aux_loss": False}, {}),
    ("deeplabv3_mobilenet_v3_large", {"aux_loss": True}, {}),
    ("fasterrcnn", {"min_size": 128, "box_nms_thresh": 0.4}, {"roi_heads.nms_thresh": 0.4}),
    # a number where a float is declared, a list of sizes where min_size's default is an int
    (
        "retinanet_resnet50_fpn",
        {"score_thresh": 0, "min_size": [256, 288]},
        {"transform.min_size": [256, 288]},
    ),
]


@pytest.mark.parametrize(
    "arch,kwargs,expected", KWARGS_ACCEPTED, ids=[f"{c[0]}-{'-'.join(c[1])}" for c in KWARGS_ACCEPTED]
)
def test_model_kwargs_accepted_and_used(arch, kwargs, expected):
    from search.spec import deep_check
    from trainables import builder_kwargs, models

    spec = _kwargs_spec(arch, kwargs)
    assert deep_check(spec)["parameters"] > 0
    assert set(kwargs) <= builder_kwargs.accepted_kwargs(arch)
    sk = models.skeleton(arch, 3, spec.model.model_kwargs())
    for path, value in expected.items():
        obj = sk
        for part in path.split("."):
            obj = getattr(obj, part)
        assert obj == value, path


def _supported_archs() -> list[str]:
    import torchvision

    from trainables import families

    builders = [b for b in torchvision.models.list_models() if families.family_of(b) is not None]
    return sorted({*families.all_archs(), *builders, *families.composed_archs()})


def _chain_parameters(arch: str) -> set[str]:
    """Every named parameter anywhere in ``arch``'s chain, collected independently of
    trainables.models: the builder (or composed head class), every detection class in the MRO of
    the built class, the transform, and for ssdlite the MobileNetV3 backbone's constructors."""
    import inspect

    import torchvision
    from torch import nn
    from torchvision.models import mobilenetv3
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    heads = {
        "fasterrcnn": torchvision.models.detection.FasterRCNN,
        "maskrcnn": torchvision.models.detection.MaskRCNN,
        "retinanet": torchvision.models.detection.RetinaNet,
        "fcos": torchvision.models.detection.FCOS,
    }
    fns: list = [GeneralizedRCNNTransform.__init__]
    if arch in heads:
        cls = heads[arch]
    else:
        builder = torchvision.models.get_model_builder(arch)
        fns.append(builder)
        cls = inspect.signature(builder).return_annotation
    fns += [c.__init__ for c in cls.__mro__ if issubclass(c, nn.Module) and "__init__" in c.__dict__]
    if arch.startswith("ssdlite"):
        fns += [mobilenetv3._mobilenet_v3_conf, mobilenetv3.MobileNetV3.__init__]
    return {name for fn in fns for name in inspect.signature(fn).parameters}


def test_accepted_kwargs_conformance_every_arch():
    import inspect

    from torchvision.models import get_model_builder

    from trainables import builder_kwargs, families

    archs = _supported_archs()
    assert len(archs) >= 20
    for arch in archs:
        accepted = builder_kwargs.accepted_kwargs(arch)
        assert accepted is None or (isinstance(accepted, frozenset) and accepted), arch
        if accepted is None:
            continue
        assert not accepted & {
            "weights",
            "weights_backbone",
            "num_classes",
            "progress",
            "compose",
            "self",
            "args",
            "kwargs",
        }, arch
        fam = families.family_of(arch)
        if fam.task == families.SEMANTIC:  # builders forward nothing; compositions take only aux_loss
            own = set() if fam.composed else set(inspect.signature(get_model_builder(arch)).parameters)
            assert accepted <= own | {"aux_loss"}, arch  # lraspp pops aux_loss from its **kwargs
        else:
            invented = accepted - _chain_parameters(arch)
            assert not invented, f"{arch}: {sorted(invented)} are no parameter of its chain"
            assert {"min_size", "max_size", "image_mean"} & accepted, arch
        assert builder_kwargs.ignored_kwargs(arch, dict.fromkeys(accepted)) == [], arch
        assert builder_kwargs.ignored_kwargs(arch, {"no_such_key": 1}) == ["no_such_key"], arch
        # torchvision's own defaults pass the type check, and a string where it has a number does not
        sigs = builder_kwargs._chain_signatures(arch)
        defaults = {
            k: p.default
            for k in accepted
            for p in [next((s.parameters[k] for s in sigs if k in s.parameters), None)]
            if p is not None and p.default is not p.empty
        }
        assert builder_kwargs.mistyped_kwarg(arch, defaults) is None, arch
        numeric = [k for k, v in defaults.items() if type(v) in (int, float)]
        if fam.task != families.SEMANTIC:
            assert builder_kwargs.mistyped_kwarg(arch, {numeric[0]: "x"})[0] == numeric[0], arch
    assert builder_kwargs.accepted_kwargs("resnet50") is None


ACTIVATION_SCOPE_CASES = [
    # (arch, space entries, refused key or None)
    (
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        {"activation": {"choices": ["keep", "silu"]}, "activation_scope": "neck"},
        "space.activation_scope",
    ),
    (
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        {"activation": "silu", "activation_scope": {"choices": ["heads", "neck"]}},
        "space.activation_scope",
    ),
    (
        "lraspp_mobilenet_v3_large",
        {"activation": "gelu", "activation_scope": "neck"},
        "space.activation_scope",
    ),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", {"activation": "keep", "activation_scope": "neck"}, None),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", {"activation": "silu", "activation_scope": "backbone"}, None),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", {"activation": {"choices": ["keep", "silu"]}}, None),  # heads
    ("ssdlite320_mobilenet_v3_large", {"activation": "silu", "activation_scope": "neck"}, None),
    ("deeplabv3_mobilenet_v3_large", {"activation": "silu", "activation_scope": "neck"}, None),  # ASPP
]


@pytest.mark.parametrize(
    "arch,space,key",
    ACTIVATION_SCOPE_CASES,
    ids=[f"{c[0].split('_')[0]}-{i}" for i, c in enumerate(ACTIVATION_SCOPE_CASES)],
)
def test_activation_scope_without_activations_is_refused(arch, space, key):
    """A scope in which the architecture has no activation module makes activation choices
    silent no-ops (neck on FPN families, fcn, lraspp): refused before launch."""
    from search.spec import deep_check

    raw = spec_dict(**(SEMANTIC_CHANGES if arch.startswith(("lraspp", "deeplabv3")) else {}))
    raw["model"] = {"arch": arch, "weights": "none"}
    raw["space"] = {**raw["space"], **space}
    spec = build_spec(raw, ROOT)
    if key is None:
        deep_check(spec)
        return
    with pytest.raises(SpecError) as err:
        deep_check(spec)
    assert err.value.key == key and "holds no activation module" in err.value.message, str(err.value)
    assert "'neck'" in err.value.message and "'backbone'" in err.value.fix and "'neck'" not in err.value.fix
