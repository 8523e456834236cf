"""Model building: every architecture trains and evaluates; base weights load safely and right.

Fast CPU tests: weights none unless a test writes its own file, 100-px images, 3 classes
(2 + background), batch 2 whose second image has no boxes. Never touches the network: enum
weights are tested against an empty temporary torch hub cache.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import re
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torchvision.models import get_model, get_model_weights
from torchvision.ops.misc import FrozenBatchNorm2d

from trainables import families, files, losses, models, weights
from trainables import params as P
from trainables.config import DataSplit, TrialConfig

NUM_CLASSES = 3
SIZE = 100

# One step > 5 s on 2 busy CPU cores (measured): kept out of the quick suite.
SLOW = {
    "fasterrcnn_resnet50_fpn_v2",
    "maskrcnn_resnet50_fpn_v2",
    "ssd300_vgg16",
    "deeplabv3_resnet101",
    "fcn_resnet101",
}
# The cheapest architecture of each family (used by per-family tests).
CHEAP = {
    "fasterrcnn": "fasterrcnn_mobilenet_v3_large_320_fpn",
    "maskrcnn": "maskrcnn_resnet50_fpn",
    "retinanet": "retinanet_resnet50_fpn",
    "fcos": "fcos_resnet50_fpn",
    "ssd": "ssd300_vgg16",
    "ssdlite": "ssdlite320_mobilenet_v3_large",
    "deeplabv3": "deeplabv3_mobilenet_v3_large",
    "fcn": "fcn_resnet50",
    "lraspp": "lraspp_mobilenet_v3_large",
}


def arch_params(archs, slow=SLOW):
    """pytest params with the slow ones marked."""
    return [pytest.param(a, marks=pytest.mark.slow) if a in slow else a for a in archs]


def fast_kwargs(arch: str) -> dict:
    """Builder kwargs that keep CPU tests small: no upscaling to 800 px, fewer sampled RoIs."""
    fam = families.family_of(arch)
    if fam.task == families.SEMANTIC or fam.name in ("ssd", "ssdlite"):
        return {}
    kw = {"min_size": SIZE, "max_size": 128}
    if fam.name in ("fasterrcnn", "maskrcnn"):
        kw |= {
            "box_batch_size_per_image": 128,
            "rpn_pre_nms_top_n_train": 300,
            "rpn_post_nms_top_n_train": 300,
        }
    return kw


def config(arch: str, weights=None, weights_backbone=None, **kwargs) -> TrialConfig:
    fam = families.family_of(arch)
    split = DataSplit(images=Path("/nonexistent"), annotations=Path("/nonexistent.json"))
    return TrialConfig(
        task=fam.task,
        arch=arch,
        train=split,
        val=split,
        out_dir=Path("/nonexistent-out"),
        weights=None if weights is None else str(weights),
        weights_backbone=None if weights_backbone is None else str(weights_backbone),
        model_kwargs={**fast_kwargs(arch), **kwargs},
    )


def build(arch: str, params: dict | None = None, num_classes: int = NUM_CLASSES, **cfg_kw):
    return models.build_model(config(arch, **cfg_kw), P.resolve(params or {}), num_classes)


def det_batch(masks: bool = False, num_classes: int = NUM_CLASSES):
    """Two 100-px images: two boxes in the first, none in the second."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(2)]
    boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [30.0, 20.0, 90.0, 50.0]])
    t1 = {"boxes": boxes, "labels": torch.tensor([1, num_classes - 1])}
    t2 = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}
    if masks:
        m = torch.zeros((2, SIZE, SIZE), dtype=torch.uint8)
        m[0, 12:70, 10:60] = 1
        m[1, 20:50, 30:90] = 1
        t1["masks"] = m
        t2["masks"] = torch.zeros((0, SIZE, SIZE), dtype=torch.uint8)
    return images, [t1, t2]


def sem_batch(num_classes: int = NUM_CLASSES):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, SIZE, SIZE, generator=g)
    y = torch.randint(0, num_classes, (2, SIZE, SIZE), generator=g)
    y[0, :10] = 255  # ignored pixels
    return x, y


def loss_dict(model, family, params=None):
    """One training forward's loss dict (train mode, fixed seed)."""
    torch.manual_seed(0)
    if family.task == families.SEMANTIC:
        x, y = sem_batch()
        return losses.semantic_losses(model(x), y, P.resolve(params or {}))
    images, targets = det_batch(masks=family.task == families.INSTANCE)
    return model(images, targets)


def train_step(model, family, params=None, lr=0.01):
    from trainables import freeze

    freeze.train_mode(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    terms = loss_dict(model, family, params)
    total = losses.weighted_total(terms, P.resolve(params or {}))
    opt.zero_grad()
    total.backward()
    opt.step()
    return terms, total


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a shared 2-core box two spinning threads stall (stack-facts.md)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------- every architecture


@pytest.mark.parametrize("arch", arch_params(families.all_archs()))
def test_every_arch_trains_one_step_and_evaluates(arch):
    fam = families.family_of(arch)
    model, info = build(arch)
    assert info["weights"] == "none" and info["predictors_replaced"] == []
    terms, total = train_step(model, fam)
    assert set(terms) <= set(fam.loss_terms), f"{sorted(terms)} vs family {fam.loss_terms}"
    expected = set(fam.loss_terms) - ({"loss_aux"} if fam.task == families.SEMANTIC else set())
    assert expected <= set(terms)
    assert math.isfinite(float(total.detach()))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.eval()
    with torch.no_grad():
        if fam.task == families.SEMANTIC:
            out = model(sem_batch()[0])["out"]
            assert out.shape == (2, NUM_CLASSES, SIZE, SIZE)
        else:
            out = model(det_batch()[0])
            assert len(out) == 2 and {"boxes", "scores", "labels"} <= set(out[0])
            if out[0]["labels"].numel():
                assert int(out[0]["labels"].max()) < NUM_CLASSES


def test_builder_kwargs_are_honoured():
    model, _ = build("retinanet_resnet50_fpn", min_size=120, max_size=128)
    assert model.transform.min_size == (120,) and model.transform.max_size == 128
    images, _ = model.transform(det_batch()[0])
    assert max(images.tensors.shape[-2:]) <= 128  # not upscaled to 800
    with pytest.raises(ValueError, match="num_classes"):
        models.build_model(config("retinanet_resnet50_fpn", num_classes=5), P.resolve({}), NUM_CLASSES)


def test_rcnn_like_input_is_the_data_image_size_unless_kwargs_size_it():
    """README: data.image_size is the network input's long side. R-CNN, RetinaNet and FCOS would
    resize it to torchvision's short side 800 again: they keep the data's size instead."""
    cfg = dataclasses.replace(config("retinanet_resnet50_fpn"), model_kwargs={}, image_size=96)
    model, _ = models.build_model(cfg, P.resolve({}), NUM_CLASSES)
    image = torch.rand(3, 72, 96)  # long side 96, as the data pipeline gives it
    model.eval()
    assert tuple(model.transform([image])[0].image_sizes[0]) == (72, 96)
    assert tuple(model.transform([torch.rand(3, 300, 400)])[0].image_sizes[0]) == (72, 96)
    model.train()
    jittered = torch.rand(3, 90, 120)  # training keeps the data's scale jitter
    assert tuple(model.transform([jittered])[0].image_sizes[0]) == (90, 120)
    model, _ = build("retinanet_resnet50_fpn", min_size=120, max_size=128)
    assert model.transform.min_size == (120,) and not model.transform._skip_resize


def test_unknown_architecture_is_refused():
    cfg = config("ssdlite320_mobilenet_v3_large")
    cfg = TrialConfig(task="detection", arch="resnet50", train=cfg.train, val=cfg.val, out_dir=cfg.out_dir)
    with pytest.raises(ValueError, match="not a supported architecture"):
        models.build_model(cfg, P.resolve({}), NUM_CLASSES)


class RealTensorOps(TorchDispatchMode):
    """Counts the tensor elements that aten ops produce outside the meta device (real memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.elements += t.numel()
        return out


def test_skeleton_is_meta_fast_and_named_like_the_real_model():
    """Fast because nothing is computed on real memory: the initialisations of tens of millions of
    parameters run on the meta device (a few hundred real elements: transform constants)."""
    for arch in ("fasterrcnn_resnet50_fpn", "lraspp_mobilenet_v3_large"):
        with RealTensorOps() as real:
            sk = models.skeleton(arch, NUM_CLASSES, fast_kwargs(arch))
        assert all(p.device.type == "meta" for p in sk.parameters())
        assert real.elements < 1000 < sum(p.numel() for p in sk.parameters()), real.elements
        real = get_model(
            arch, weights=None, weights_backbone=None, num_classes=NUM_CLASSES, **fast_kwargs(arch)
        )
        assert [n for n, _ in sk.named_parameters()] == [n for n, _ in real.named_parameters()]
    sk = models.skeleton("deeplabv3_mobilenet_v3_large", NUM_CLASSES, {}, weights="DEFAULT")
    assert any(n.startswith("aux_classifier.") for n, _ in sk.named_parameters())


def test_loss_and_activation_choices_are_applied_and_reported():
    params = {"loss.box": "giou", "loss.cls": "focal", "activation": "silu", "activation_scope": "heads"}
    model, info = build("ssdlite320_mobilenet_v3_large", params)
    assert info["losses"]["box"] == "giou" and info["losses"]["cls"] == "focal"
    assert info["activations_replaced"] == 12
    assert isinstance(model, losses.SSDWithLosses)
    with pytest.raises(ValueError, match="cannot use loss.box"):
        build("lraspp_mobilenet_v3_large", {"loss.box": "giou"})


# ---------------------------------------------------------------- enum weights (hub cache)


def test_enum_weights_missing_from_cache_name_path_and_url(hub):
    member = get_model_weights("retinanet_resnet50_fpn").DEFAULT
    expected = hub / "checkpoints" / os.path.basename(member.url)
    with pytest.raises(weights.WeightsError) as info:
        build("retinanet_resnet50_fpn", weights="DEFAULT")
    msg = str(info.value)
    assert str(expected) in msg and member.url in msg
    assert not expected.exists()  # nothing was downloaded


def test_backbone_enum_missing_from_cache(hub):
    with pytest.raises(weights.WeightsError) as info:
        build("fasterrcnn_mobilenet_v3_large_320_fpn", weights_backbone="IMAGENET1K_V1")
    assert "mobilenet_v3_large" in str(info.value) and str(hub) in str(info.value)


def test_unknown_enum_name():
    with pytest.raises(weights.WeightsError, match="no weights 'COCO_V9'"):
        build("retinanet_resnet50_fpn", weights="COCO_V9")


def test_damaged_cache_file_is_refused(hub):
    member = get_model_weights("mobilenet_v2")["IMAGENET1K_V1"]
    path = weights.hub_cache_path(member)
    path.parent.mkdir(parents=True)
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(weights.WeightsError, match="damaged or a different file"):
        weights.cached_weights(member)


def test_enum_resolver_loads_the_shared_mobilenet_v2(hub, mobilenet_v2_file):
    member = weights.resolve_enum(get_model_weights("mobilenet_v2"), "MobileNet_V2_Weights.IMAGENET1K_V1")
    path = weights.hub_cache_path(member)
    assert path == hub / "checkpoints" / mobilenet_v2_file.name
    path.parent.mkdir(parents=True)
    os.symlink(mobilenet_v2_file, path)
    found, sha = weights.cached_weights(member)
    assert found == path and sha.startswith("b0353104")
    net = get_model("mobilenet_v2", weights=member)
    want = torch.load(mobilenet_v2_file, map_location="cpu", weights_only=True)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in want.items())


@pytest.mark.parametrize("arch", ["ssdlite320_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"])
def test_enum_weights_from_the_cache_load_first_then_predictors(arch, hub, monkeypatch):
    """The enum path end to end, with a stand-in file (random tensors of the pretrained shape)."""
    monkeypatch.setattr(weights, "_HASH_IN_NAME", re.compile(r"(?!)"))  # the stand-in has another hash
    member = get_model_weights(arch).DEFAULT
    n_pre = len(member.meta["categories"])
    extra = {"aux_loss": True} if families.family_of(arch).task == families.SEMANTIC else {}
    torch.manual_seed(3)
    state = get_model(arch, weights=None, weights_backbone=None, num_classes=n_pre, **extra).state_dict()
    path = weights.hub_cache_path(member)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    model, info = build(arch, weights="DEFAULT")
    assert info["weights"] == f"enum:{member!r}" and info["weights_file"] == str(path)
    assert info["pretrained_num_classes"] == n_pre and info["sha256"] == files.sha256_file(path)
    replaced = info["predictors_replaced"]
    assert replaced
    for name, tensor in model.state_dict().items():
        if not _under(name, replaced):
            assert torch.equal(tensor, state[name]), name
        else:
            assert tensor.shape[0] != state[name].shape[0], name


def test_backbone_enum_from_the_cache(hub, monkeypatch):
    from torchvision.models import MobileNet_V3_Large_Weights

    monkeypatch.setattr(weights, "_HASH_IN_NAME", re.compile(r"(?!)"))
    member = MobileNet_V3_Large_Weights.IMAGENET1K_V1
    torch.manual_seed(4)
    state = get_model("mobilenet_v3_large", weights=None).state_dict()
    path = weights.hub_cache_path(member)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    model, info = build("fasterrcnn_mobilenet_v3_large_320_fpn", weights_backbone="IMAGENET1K_V1")
    assert info["weights_backbone"] == f"enum:{member!r}" and info["predictors_replaced"] == []
    got = model.state_dict()["backbone.body.5.block.0.0.weight"]
    assert torch.equal(got, state["features.5.block.0.0.weight"])


# ---------------------------------------------------------------- file weights


FILE_SLOW = SLOW | {"fcos_resnet50_fpn", "fcn_resnet50"}


def _save_source(arch: str, tmp_path: Path, num_classes: int = 5, **kw):
    torch.manual_seed(1)
    kw = {**fast_kwargs(arch), **kw}
    src = get_model(arch, weights=None, weights_backbone=None, num_classes=num_classes, **kw)
    state = src.state_dict()
    path = tmp_path / f"{arch}.pth"
    torch.save(state, path)
    return state, path


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# fcos and fcn replace like retinanet and deeplabv3: their runs are in the slow suite.
@pytest.mark.parametrize("arch", arch_params(sorted(CHEAP.values()), FILE_SLOW))
def test_file_weights_load_then_only_predictors_are_replaced(arch, tmp_path):
    fam = families.family_of(arch)
    extra = {"aux_loss": True} if fam.name in ("deeplabv3", "fcn") else {}
    state, path = _save_source(arch, tmp_path, num_classes=5, **extra)
    model, info = build(arch, weights=path)
    assert info["pretrained_num_classes"] == 5
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["missing"] == [] and info["unexpected"] == [] and info["mismatched"] == []
    replaced = info["predictors_replaced"]
    assert replaced
    got = model.state_dict()
    assert set(got) == set(state)
    for name, tensor in got.items():
        if _under(name, replaced):
            assert tensor.shape[0] % NUM_CLASSES == 0 and tensor.shape != state[name].shape, name
        else:
            assert torch.equal(tensor, state[name]), name
    # the replaced layers are exactly the family's declared predictors
    from trainables import freeze

    declared = set(freeze.preset_names(model, fam, "predictors"))
    assert declared == {n for n, _ in model.named_parameters() if _under(n, replaced)}
    if arch == "ssdlite320_mobilenet_v3_large":
        train_step(model, fam)  # and it trains at the new class count


def test_same_class_count_keeps_predictors_and_checkpoint_dict_loads(tmp_path):
    arch = "ssdlite320_mobilenet_v3_large"
    state, _ = _save_source(arch, tmp_path, num_classes=NUM_CLASSES)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": state, "epoch": 3, "metrics": {"map": 0.5}}, ckpt)
    model, info = build(arch, weights=ckpt)
    assert info["predictors_replaced"] == [] and info["pretrained_num_classes"] == NUM_CLASSES
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_partial_file_loads_with_missing_keys_reported(tmp_path):
    arch = "fasterrcnn_mobilenet_v3_large_320_fpn"
    state, _ = _save_source(arch, tmp_path)
    dropped = [k for k in state if k.startswith("backbone.fpn.")]
    path = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state.items() if k not in dropped}, path)
    model, info = build(arch, weights=path)
    assert sorted(info["missing"]) == sorted(dropped)
    assert torch.equal(model.state_dict()["backbone.body.0.0.weight"], state["backbone.body.0.0.weight"])


def test_mostly_mismatched_file_is_refused(tmp_path):
    _, path = _save_source("ssdlite320_mobilenet_v3_large", tmp_path)  # another architecture
    with pytest.raises(weights.WeightsError, match="only .* state keys"):
        build("fasterrcnn_mobilenet_v3_large_320_fpn", weights=path)
    state, _ = _save_source("fasterrcnn_mobilenet_v3_large_320_fpn", tmp_path)
    keys = list(state)
    half = tmp_path / "half.pth"
    torch.save({k: state[k] for k in keys[: len(keys) // 3]}, half)
    with pytest.raises(weights.WeightsError, match="refusing"):
        build("fasterrcnn_mobilenet_v3_large_320_fpn", weights=half)


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "payload": _Evil(str(marker))}, path)
    with pytest.raises(weights.WeightsError, match="weights_only"):
        build("ssdlite320_mobilenet_v3_large", weights=path)
    with pytest.raises(weights.WeightsError, match="weights_only"):
        build("fasterrcnn_mobilenet_v3_large_320_fpn", weights_backbone=path)
    assert not marker.exists()


def test_not_a_state_dict_and_missing_file(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(weights.WeightsError, match="neither a state_dict"):
        build("ssdlite320_mobilenet_v3_large", weights=path)
    with pytest.raises(weights.WeightsError, match="does not exist"):
        build("ssdlite320_mobilenet_v3_large", weights=tmp_path / "nope.pth")


def test_frozen_batchnorm_file_gets_frozen_batchnorm(tmp_path):
    arch = "fasterrcnn_mobilenet_v3_large_320_fpn"
    state, _ = _save_source(arch, tmp_path)
    frozen = {k: v for k, v in state.items() if not (k.startswith("backbone.body.") and "num_batches" in k)}
    path = tmp_path / "frozen.pth"
    torch.save(frozen, path)
    model, info = build(arch, weights=path)
    assert info["frozen_batchnorm"] > 0 and info["missing"] == []
    assert isinstance(model.get_submodule("backbone.body.0.1"), FrozenBatchNorm2d)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.body.modules())


def test_backbone_file_goes_through_the_builder(tmp_path):
    torch.manual_seed(2)
    cls_state = get_model("mobilenet_v3_large", weights=None).state_dict()
    path = tmp_path / "mnv3.pth"
    torch.save(cls_state, path)
    hub_before = torch.hub.get_dir()
    model, info = build("fasterrcnn_mobilenet_v3_large_320_fpn", weights_backbone=path)
    assert torch.hub.get_dir() == hub_before
    assert info["weights_backbone"] == f"file:{path}" and info["backbone_sha256"]
    got = model.state_dict()
    assert torch.equal(got["backbone.body.0.0.weight"], cls_state["features.0.0.weight"])
    assert torch.equal(got["backbone.body.16.1.running_var"], cls_state["features.16.1.running_var"])
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.0.weight": torch.zeros(3)}, bad)
    with pytest.raises(weights.WeightsError, match="does not fit"):
        build("fasterrcnn_mobilenet_v3_large_320_fpn", weights_backbone=bad)


def test_weights_given_make_backbone_weights_ignored(tmp_path):
    _, path = _save_source("ssdlite320_mobilenet_v3_large", tmp_path)
    _, info = build("ssdlite320_mobilenet_v3_large", weights=path, weights_backbone="DEFAULT")
    assert info["weights_backbone"].startswith("ignored")


def test_build_does_not_mutate_its_inputs():
    cfg = config("ssdlite320_mobilenet_v3_large")
    params = P.resolve({"activation": "gelu"})
    before = (copy.deepcopy(cfg.model_kwargs), dict(params))
    models.build_model(cfg, params, NUM_CLASSES)
    assert (cfg.model_kwargs, params) == before
