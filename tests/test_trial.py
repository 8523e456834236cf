"""Checkpoints, the training loop and run_trial end to end on a tiny COCO set (CPU, ssdlite320)."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.tinydata import tiny_split, trial_config, without_timing
from trainables import checkpoint, engine, losses
from trainables import params as P
from trainables.config import TrialConfig
from trainables.trial import run_trial, sha256_file

ARCH = "ssdlite320_mobilenet_v3_large"
RESULT_KEYS = {
    "status",
    "base_metric",
    "best_metric",
    "best_epoch",
    "history",
    "checkpoint",
    "params",
    "trainable_params",
    "frozen_params",
    "build",
    "param_groups",
}


# --- checkpoint -------------------------------------------------------------------------------
class TwoPart(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.head = nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
        self.backbone.requires_grad_(False)


def _save(path: Path, model: nn.Module, **kw) -> Path:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return checkpoint.save(
        path,
        model=model,
        optimizer=opt,
        scheduler=sched,
        epoch=3,
        metrics={"map": 0.5},
        params=P.resolve({}),
        base_sha256="ab" * 32,
        extra={"history": [{"epoch": 1}]},
        **kw,
    )


def test_checkpoint_trainable_only_atomic_weights_only(tmp_path):
    model = TwoPart()
    path = _save(tmp_path / "ck" / "latest.pt", model)
    assert sorted(p.name for p in path.parent.iterdir()) == ["latest.pt"]  # no .tmp left behind
    ckpt = torch.load(path, weights_only=True)  # RNG states etc. are weights_only-safe
    assert set(ckpt["model"]) == {
        "head.0.weight",
        "head.0.bias",
        "head.1.weight",
        "head.1.bias",
        "head.1.running_mean",
        "head.1.running_var",
        "head.1.num_batches_tracked",
    }
    assert ckpt["epoch"] == 3 and ckpt["base_sha256"] == "ab" * 32
    assert ckpt["extra"]["history"] == [{"epoch": 1}]
    full = checkpoint.load(_save(tmp_path / "full.pt", model, trainable_only=False))
    assert set(full["model"]) == set(model.state_dict())


def test_a_trainable_only_checkpoint_is_refused_as_weights(tmp_path):
    """As model.weights a trial's checkpoint of its trained tensors only gave a model whose frozen
    part was random (validate said ok); a full checkpoint is a state_dict like any other."""
    from trainables.weights import WeightsError, load_state_file

    model = TwoPart()
    with pytest.raises(WeightsError, match="holds only its trained tensors") as err:
        load_state_file(_save(tmp_path / "heads.pt", model))
    assert "--weights-out" in err.value.fix
    full = load_state_file(_save(tmp_path / "full.pt", model, trainable_only=False))
    assert set(full) == set(model.state_dict())


def test_checkpoint_restore_model_and_rng(tmp_path):
    src = TwoPart()
    src.head[1].running_mean.fill_(0.25)
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    path = _save(tmp_path / "latest.pt", src)
    expected = (torch.rand(3), random.random(), np.random.rand())
    dst = TwoPart()
    dst.backbone.load_state_dict(src.backbone.state_dict())  # "the base"
    opt = torch.optim.SGD([p for p in dst.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    assert checkpoint.restore(dst, opt, None, checkpoint.load(path)) == 3
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
    for (n, a), b in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_checkpoint_rng_tensor_roundtrip(tmp_path):
    torch.manual_seed(5)
    path = _save(tmp_path / "latest.pt", TwoPart())
    a = torch.rand(4)
    checkpoint.set_rng_state(checkpoint.load(path)["rng"])
    assert torch.equal(torch.rand(4), a)


# --- engine -----------------------------------------------------------------------------------
class Boom(nn.Module):
    """A detection-like model whose loss is NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def forward(self, images, targets):
        return {"loss_a": self.w.sum() * float("nan")}


def test_diverged_raised_before_step():
    model = Boom()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loader = [([torch.zeros(3, 8, 8)], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0).long()}])]
    with pytest.raises(engine.Diverged) as info:
        engine.train_one_epoch(model, loader, opt, sched, device=torch.device("cpu"), params=P.resolve({}))
    assert info.value.step == 0 and "loss" in info.value.losses
    assert torch.equal(model.w.detach(), torch.ones(2)) and model.w.grad is None


class Quadratic(nn.Module):
    """A detection-like model with a finite loss."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def forward(self, images, targets):
        return {"loss_a": (self.w**2).sum()}


def test_the_epochs_lr_is_the_one_its_steps_used():
    """A step schedule that drops after each epoch of 2 steps: epoch 1 trained at 0.1 throughout
    (it said 0.01, the lr the scheduler had set for the next step); a cosine epoch does not say 0."""
    model = Quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 ** (s // 2))
    loader = [([torch.zeros(3, 8, 8)], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0).long()}])] * 2
    rows = [
        engine.train_one_epoch(model, loader, opt, sched, device=torch.device("cpu"), params=P.resolve({}))
        for _ in range(2)
    ]
    assert [r["lr"] for r in rows] == pytest.approx([0.1, 0.01])


# --- run_trial --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    return tiny_split(tmp_path_factory.mktemp("tiny"))


_cfg, _strip = trial_config, without_timing


@pytest.fixture(scope="module")
def full_run(coco_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    reports = []
    result = run_trial(_cfg(coco_dir, out), {"lr": 0.01}, report=lambda m, d: reports.append((m, d)))
    return out, result, reports


def test_run_trial_shape(full_run):
    out, result, reports = full_run
    assert RESULT_KEYS <= set(result) and result["status"] == "ok"
    assert [row["epoch"] for row in result["history"]] == [0, 1, 2]
    base = result["history"][0]
    assert result["base_metric"] == base["map"] and {"map", "map50", "map75"} <= set(base)
    for row in result["history"][1:]:
        assert {"map", "loss", "lr", "epoch_seconds", "images_per_s"} <= set(row)
    assert result["best_epoch"] in (1, 2)
    assert result["best_metric"] == result["history"][result["best_epoch"]]["map"]
    assert result["checkpoint"] == str(out / "checkpoints" / "best.pt")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "latest.pt"]
    assert result["params"] == P.resolve({"lr": 0.01})
    assert result["trainable_params"] > 0 and result["frozen_params"] >= 0
    assert result["param_groups"] and all(
        g["lr"] == 0.01 for g in result["param_groups"] if not g["name"].startswith("backbone")
    )
    assert json.loads((out / "trial.json").read_text()) == result
    # report: epoch 0 (base, no checkpoint) then every epoch with the checkpoint folder
    assert [m["epoch"] for m, _ in reports] == [0, 1, 2]
    assert reports[0][0]["base_metric"] == result["base_metric"] and reports[0][1] is None
    assert all(d == out / "checkpoints" and "map" in m for m, d in reports[1:])
    ckpt = checkpoint.load(out / "checkpoints" / "latest.pt")
    assert ckpt["epoch"] == 2 and ckpt["trainable_only"] is False  # random init: full state kept


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    """A base weights FILE (ssdlite at torchvision's 91 classes), alone in its folder."""
    import torchvision

    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("weights") / "base.pth"
    torch.save(torchvision.models.get_model(ARCH, weights=None, weights_backbone=None).state_dict(), path)
    return path


class Interrupt(Exception):
    pass


def _interrupted_then_resumed(cfg: TrialConfig, params: dict) -> dict:
    def stop_after_1(metrics, ckpt_dir):
        if metrics["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_trial(cfg, params, report=stop_after_1)
    assert checkpoint.load(cfg.out_dir / "checkpoints" / "latest.pt")["epoch"] == 1
    return run_trial(cfg, params, resume_from=cfg.out_dir / "checkpoints")


def test_resume_equals_uninterrupted(coco_dir, full_run, tmp_path):
    """Random init, everything trains, full-state checkpoints."""
    _, uninterrupted, _ = full_run
    resumed = _interrupted_then_resumed(_cfg(coco_dir, tmp_path / "r"), {"lr": 0.01})
    assert _strip(resumed["history"]) == _strip(uninterrupted["history"])
    assert resumed["best_epoch"] == uninterrupted["best_epoch"]
    assert resumed["base_metric"] == uninterrupted["base_metric"]


def test_resume_reports_an_owed_epoch_0(coco_dir, full_run, tmp_path):
    """A checkpoint written while another trial still held the shared base evaluation has no epoch
    0; the resumed trial evaluates its starting model (rebuilt) and reports epoch 0 after all."""
    _, uninterrupted, _ = full_run
    cfg = _cfg(coco_dir, tmp_path / "r")

    def stop_at_1(metrics, ckpt_dir):
        if metrics["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_trial(cfg, {"lr": 0.01}, report=stop_at_1)
    latest = cfg.out_dir / "checkpoints" / "latest.pt"
    ckpt = checkpoint.load(latest)
    ckpt["extra"]["history"] = [r for r in ckpt["extra"]["history"] if r["epoch"] != 0]
    ckpt["extra"]["base_metric"] = None
    torch.save(ckpt, latest)
    reports = []
    resumed = run_trial(
        cfg, {"lr": 0.01}, report=lambda m, d: reports.append(m["epoch"]), resume_from=latest.parent
    )
    assert sorted(reports) == [0, 2] and reports[-1] == 2
    assert resumed["base_metric"] == uninterrupted["base_metric"]
    assert sorted(r["epoch"] for r in resumed["history"]) == [0, 1, 2]


def test_resume_trainable_only_with_frozen_backbone(coco_dir, base_file, tmp_path):
    """Base file + frozen backbone: trainable-only checkpoints (with the heads' BN statistics)
    rebuild the same model; warmup, step schedule and hflip augmentation all cross the resume."""
    params = {
        "lr": 0.02,
        "trainable": "heads",
        "warmup_epochs": 0.5,
        "schedule": "step",
        "aug.hflip": 0.5,
        "optimizer": "adamw",
    }
    cfg = _cfg(coco_dir, tmp_path / "a", weights=str(base_file), eval_base=False)
    uninterrupted = run_trial(cfg, params)
    ckpt = checkpoint.load(tmp_path / "a" / "checkpoints" / "latest.pt")
    assert ckpt["trainable_only"] is True
    assert not any(k.startswith("backbone.features.") for k in ckpt["model"])
    assert any(k.endswith("running_mean") for k in ckpt["model"])  # trainable BN stats kept
    resumed = _interrupted_then_resumed(dataclasses.replace(cfg, out_dir=tmp_path / "b"), params)
    assert [r["epoch"] for r in resumed["history"]] == [1, 2]
    assert _strip(resumed["history"]) == _strip(uninterrupted["history"])
    a = checkpoint.load(tmp_path / "a" / "checkpoints" / "latest.pt")["model"]
    b = checkpoint.load(tmp_path / "b" / "checkpoints" / "latest.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_diverged_trial(coco_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = losses.weighted_total

    def poisoned(loss_dict, params):
        calls["n"] += 1
        total = real(loss_dict, params)
        return total * float("nan") if calls["n"] == 2 else total

    monkeypatch.setattr(engine.losses, "weighted_total", poisoned)
    reports = []
    result = run_trial(_cfg(coco_dir, tmp_path), {}, report=lambda m, d: reports.append(m))
    assert result["status"] == "diverged"
    assert result["best_metric"] is None and result["checkpoint"] is None
    assert reports[-1]["diverged"] == 1 and reports[-1]["epoch"] == 1 and reports[-1]["step"] == 1
    assert not (tmp_path / "checkpoints" / "latest.pt").exists()
    assert json.loads((tmp_path / "trial.json").read_text())["status"] == "diverged"


def test_base_weights_file_verified_and_untouched(coco_dir, base_file, tmp_path, monkeypatch):
    sha = sha256_file(base_file)
    out = tmp_path / "out"
    result = run_trial(_cfg(coco_dir, out, weights=str(base_file), epochs=1), {})
    assert result["status"] == "ok"
    assert sha256_file(base_file) == sha and [p.name for p in base_file.parent.iterdir()] == ["base.pth"]
    assert result["build"]["base_sha256"] == {"weights": sha}
    ckpt = checkpoint.load(out / "checkpoints" / "latest.pt")
    assert ckpt["base_sha256"] == sha and ckpt["trainable_only"] is True
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "trial.json"]


def test_base_weights_file_changed_is_an_error(coco_dir, base_file, tmp_path):
    """A copy of the base weights is overwritten for real while the trial runs (when epoch 1 is
    reported): the end-of-trial hash check refuses the result."""
    import shutil

    wfile = tmp_path / "w.pth"
    shutil.copyfile(base_file, wfile)
    sha = sha256_file(wfile)
    seen = []

    def overwrite_at_epoch_1(metrics, ckpt_dir):
        seen.append(metrics["epoch"])
        if metrics["epoch"] == 1:
            state = torch.load(wfile, weights_only=True)
            first = next(k for k, v in state.items() if v.is_floating_point())
            state[first] = state[first] + 1.0
            torch.save(state, wfile)

    cfg = _cfg(coco_dir, tmp_path / "out", weights=str(wfile), epochs=1, eval_base=False)
    with pytest.raises(RuntimeError, match="changed during the trial") as err:
        run_trial(cfg, {}, report=overwrite_at_epoch_1)
    assert str(wfile) in str(err.value) and seen == [1]
    assert sha256_file(wfile) != sha  # the file really changed (no hash was faked)
    assert not (tmp_path / "out" / "trial.json").exists()  # no result recorded


def test_trainable_only_checkpoint_keeps_a_random_frozen_part(coco_dir, tmp_path):
    """ImageNet backbone file + heads only: ssdlite's extra feature layers start random and stay
    frozen. The checkpoint must hold them, so that loading it gives one model whatever the RNG."""
    import torchvision

    torch.manual_seed(5)
    backbone = tmp_path / "mnv3.pth"
    torch.save(torchvision.models.mobilenet_v3_large().state_dict(), backbone)
    params = P.resolve({"lr": 0.01, "trainable": "heads"})
    cfg = _cfg(coco_dir, tmp_path / "run", weights_backbone=str(backbone), epochs=1, eval_base=False)
    run_trial(cfg, params)
    path = tmp_path / "run" / "checkpoints" / "latest.pt"
    ckpt = checkpoint.load(path)
    assert ckpt["trainable_only"] is True
    assert any(k.startswith("backbone.extra.") for k in ckpt["model"])  # frozen, random: kept
    assert not any(k.startswith("backbone.features.0.") for k in ckpt["model"])  # from the file
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(checkpoint.load_trained(cfg, params, 3, path).state_dict())
    a, b = models
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_a_trials_model_dies_with_its_run(coco_dir, tmp_path):
    """No reference cycle keeps the model (and its device memory) alive after a trial's run."""
    import gc
    import weakref

    from trainables import families, trial

    def build() -> weakref.ref:
        run = trial._Run(
            cfg=_cfg(coco_dir, tmp_path),
            params=P.resolve({}),
            report=None,
            device=torch.device("cpu"),
            amp_dtype=None,
            ckpt_dir=tmp_path,
            files={},
            shas={},
            train_index=None,
            val_index=None,
            train_loader=[],
            val_loader=None,
            num_classes=3,
            family=families.family_of(ARCH),
        )
        trial._build_model(run)
        return weakref.ref(run.model)

    gc.disable()
    try:
        ref = build()
        assert ref() is None
    finally:
        gc.enable()
