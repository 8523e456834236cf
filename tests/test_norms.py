"""The ``norm`` trial parameter (issue 13 item 6): keep | frozen | affine | train."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from search.spec import load_spec
from trainables import freeze, params
from trainables.freeze import AffineBatchNorm2d
from trainables.norms import apply_norm

ROOT = Path(__file__).resolve().parents[1]


def net() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), FrozenBatchNorm2d(4)
    )
    with torch.no_grad():
        for bn in (m[1], m[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return m


@pytest.mark.parametrize(
    ("mode", "types", "changed"),
    [
        ("keep", (nn.BatchNorm2d, FrozenBatchNorm2d), 0),
        ("frozen", (FrozenBatchNorm2d, FrozenBatchNorm2d), 1),
        ("affine", (AffineBatchNorm2d, AffineBatchNorm2d), 2),
        ("train", (nn.BatchNorm2d, nn.BatchNorm2d), 1),
    ],
)
def test_conversion_keeps_the_function_and_the_names(mode, types, changed):
    before = net().eval()
    x = torch.randn(2, 3, 8, 8)
    expected = before(x)
    model = net()
    assert apply_norm(model, mode) == changed
    assert (type(model[1]), type(model[4])) == types
    model.eval()
    torch.testing.assert_close(model(x), expected)  # eval-mode output unchanged by the conversion
    names = set(model.state_dict()) - {"1.num_batches_tracked", "4.num_batches_tracked"}
    assert names == set(before.state_dict()) - {"1.num_batches_tracked"}


def test_affine_trains_weights_but_never_statistics():
    model = net()
    apply_norm(model, "affine")
    freeze.train_mode(model)
    assert not model[1].training and model[1].weight.requires_grad
    mean = model[1].running_mean.clone()
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert torch.equal(model[1].running_mean, mean) and model[1].weight.grad is not None


def test_train_updates_statistics_of_a_converted_frozen_norm():
    model = net()
    apply_norm(model, "train")
    freeze.train_mode(model)
    mean = model[4].running_mean.clone()
    model(torch.randn(2, 3, 8, 8))
    assert model[4].training and not torch.equal(model[4].running_mean, mean)


def test_frozen_leaves_no_norm_parameter():
    model = net()
    apply_norm(model, "frozen")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert {n for n, _ in model.named_parameters()} == {"0.weight", "0.bias", "3.weight", "3.bias"}


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="norm must be one of"):
        apply_norm(net(), "batch")


def test_norm_is_a_searchable_parameter_and_build_model_applies_it(tmp_path):
    assert params.PARAMS["norm"].default == "keep" and params.PARAMS["norm"].choices == params.NORM_MODES
    spec = load_spec(ROOT / "spaces/det.yaml", ["space.norm={choices: [keep, train, affine]}"])
    assert spec.search_space.by_name["norm"].choices == ("keep", "train", "affine")
    from trainables import models

    cfg = spec.trial_config(tmp_path)
    model, info = models.build_model(cfg, params.resolve({"norm": "frozen"}), 4)
    assert info["norm"] == "frozen" and info["norms_replaced"] > 0
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())


def test_a_set_over_norm_parameters_selects_nothing_there_under_frozen():
    """A custom set written for BatchNorm parameters, in a study that searches norm: the frozen
    trials' norms hold buffers, so the pattern selects nothing there (the trial died with 'matches
    no parameter name'); a pattern that matches nothing at all is still refused."""
    m = net()
    apply_norm(m, "frozen")
    sets = {"s": ["0.*", "1.*"]}  # conv 0, and BatchNorm 1 (a FrozenBatchNorm2d now)
    rep = freeze.apply_trainable(m, None, "s", custom_sets=sets)
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["0.weight", "0.bias"], rep
    with pytest.raises(ValueError, match="'9.*' matches no parameter name"):
        freeze.apply_trainable(m, None, "s", custom_sets={"s": ["0.*", "9.*"]})


@pytest.mark.parametrize(("norm", "refused"), [("frozen", True), ("{choices: [frozen, train]}", False)])
def test_validate_refuses_a_norm_pattern_that_no_trial_can_train(norm, refused):
    from search.errors import SpecError
    from search.spec import deep_check

    spec = load_spec(
        ROOT / "spaces/det.yaml",
        [
            'model.trainable_sets={s: ["head.*", "backbone.features.0.0.1.*"]}',
            "space.trainable=s",
            f"space.norm={norm}",
        ],
    )
    if not refused:
        deep_check(spec)
        return
    with pytest.raises(SpecError) as err:
        deep_check(spec)
    assert err.value.key == "model.trainable_sets.s" and "norm: frozen" in err.value.message


def test_a_batch_of_one_image_through_a_1x1_norm_trains():
    """SSDlite's last extra layers and DeepLabV3's image pooling meet a 1x1 map: with one image
    per batch (batch_size 1, or a last batch of one) training raised at step 0. Under the guard
    that norm uses its running statistics for that input; larger inputs train as before."""
    from trainables.norms import one_value_guard

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4)).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.rand(1, 3, 8, 8))
    with one_value_guard(m):
        out = m(torch.rand(1, 3, 8, 8))
        out.sum().backward()
        assert m[2].training and torch.equal(m[2].running_mean, torch.zeros(4))  # not updated
        assert m[2].weight.grad is not None
        m(torch.rand(2, 3, 8, 8))  # two values per channel: batch statistics, as before
        assert not torch.equal(m[2].running_mean, torch.zeros(4))
    assert not m[2]._forward_hooks and not m[2]._forward_pre_hooks


@pytest.mark.parametrize("mode", ["frozen", "affine", "train"])
def test_conversion_keeps_each_norms_eps(mode):
    """A converted layer took the new class's default eps (1e-5) instead of the layer's own: the
    eval output of a BatchNorm built with eps 1e-3 (torchvision's MobileNetV3 and SSDlite) moved."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-3, momentum=0.01), FrozenBatchNorm2d(4, eps=1e-3)
    )
    with torch.no_grad():
        for bn in (model[1], model[2]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(1e-3, 3e-3)  # as small as eps: a wrong eps shows in the output
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 8, 8)
    expected = model.eval()(x)
    assert apply_norm(model, mode) >= 1
    torch.testing.assert_close(model.eval()(x), expected)
    assert [float(model[i].eps) for i in (1, 2)] == pytest.approx([1e-3, 1e-3])
