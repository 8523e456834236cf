"""`python -m search trial` through the real CLI: the --json contract, --set of space values,
the base weights left untouched, and --weights-out producing a loadable base."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.tinydata import make_tiny_coco

ROOT = Path(__file__).resolve().parents[1]
KEYS = {
    "base_metric",
    "best_metric",
    "best_epoch",
    "history",
    "checkpoint",
    "params",
    "trainable_params",
    "frozen_params",
}


def _spec(tmp_path: Path, **extra) -> Path:
    images, ann = make_tiny_coco(tmp_path / "data", n_images=5, size=100)
    raw = {
        "name": "cli-trial",
        "task": "detection",
        "model": {"arch": "ssdlite320_mobilenet_v3_large", "weights": "none"},
        "data": {
            "train": {"images": str(images), "annotations": str(ann)},
            "val": {"images": str(images), "annotations": str(ann)},
            "image_size": 96,
        },
        "train": {"epochs": 1, "batch_size": 2},
        "objective": {"metric": "map50", "mode": "max"},
        "space": {
            "optimizer": {"choices": ["sgd", "adamw"]},
            "lr": {"low": 1e-3, "high": 1e-1, "log": True},
            "momentum": {"low": 0.8, "high": 0.9, "when": {"optimizer": "sgd"}},
        },
        "output_dir": str(tmp_path / "runs"),
        **extra,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _trial(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "search", "trial", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


def test_trial_json_contract_and_set_space(tmp_path):
    spec = _spec(tmp_path)
    base = tmp_path / "base.pt"
    proc = _trial(
        str(spec),
        "--json",
        "--set",
        "space.optimizer=adamw",
        "--set",
        "space.lr=0.004",
        "--weights-out",
        str(base),
        "--half",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert KEYS <= set(out)
    assert out["params"]["optimizer"] == "adamw" and out["params"]["lr"] == 0.004
    assert "momentum" not in json.dumps(out["param_groups"])  # adamw groups carry betas
    assert all(g["lr"] == 0.004 for g in out["param_groups"])
    assert [h["epoch"] for h in out["history"]] == [0, 1]
    assert out["base_metric"] == out["history"][0]["map50"]
    assert Path(out["checkpoint"]).is_file()
    state = torch.load(base, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    assert out["weights_note"] is None  # activation keep: nothing the state_dict lacks

    # the written weights are a valid base for the next trial, and that base stays untouched
    digest = hashlib.sha256(base.read_bytes()).hexdigest()
    spec2 = _spec(tmp_path / "second", model={"arch": "ssdlite320_mobilenet_v3_large", "weights": str(base)})
    proc = _trial(str(spec2), "--json", "--set", "space.trainable=heads")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out2 = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out2["frozen_params"] > 0 and out2["trainable_params"] > 0
    assert hashlib.sha256(base.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in base.parent.iterdir() if p.name.startswith("base")) == ["base.pt"]


def test_trial_default_params_are_space_defaults(tmp_path):
    """(A study's own settings, grace_period above the epochs and HyperBand below its concurrency,
    do not hold back one trial.)"""
    spec = _spec(tmp_path, search={"grace_period": 3, "scheduler": "hyperband", "num_trials": 4})
    proc = _trial(str(spec), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["params"]["optimizer"] == "sgd"  # first choice
    assert abs(out["params"]["lr"] - 0.01) < 1e-9  # geometric midpoint of [1e-3, 1e-1]
    assert abs(out["params"]["momentum"] - 0.85) < 1e-9


def test_bundled_instance_spec_runs_at_tiny_size(tmp_path):
    """spaces/inst.yaml (Mask R-CNN) runs one epoch on a few small images of the bundled nuclei data."""
    proc = _trial(
        str(ROOT / "spaces" / "inst.yaml"),
        "--json",
        "--out",
        str(tmp_path / "t"),
        "--set",
        "train.epochs=1",
        "--set",
        "train.limit_train=2",
        "--set",
        "train.limit_val=2",
        "--set",
        "data.image_size=128",
        "--set",
        "model.kwargs={min_size: 128, max_size: 128}",
        "--set",
        "space.trainable=heads",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert KEYS <= set(out) and out["status"] == "ok"
    assert {"map", "mask_map"} <= set(out["history"][1]) and "loss_mask" in out["history"][1]


@pytest.mark.parametrize(
    ("args", "code", "stream", "text"),
    [
        ([], 2, "stderr", "the following arguments are required"),  # argparse's own exit
        (["--help"], 0, "stdout", "usage:"),
        (["validate", "no/such/spec.yaml"], 2, "stderr", "does not exist"),
        (["validate", "spaces/det.yaml", "--quick", "--json"], 0, "stdout", '"name": "det-demo"'),
    ],
)
def test_module_entry_point_exit_codes_and_flushed_output(args, code, stream, text):
    """``python -m search`` leaves with os._exit after the atexit handlers (search/__main__.py):
    the exit code and every line written must survive that."""
    proc = subprocess.run(
        [sys.executable, "-m", "search", *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == code, (proc.stdout[-500:], proc.stderr[-500:])
    assert text in getattr(proc, stream)


def test_a_segmentation_bundle_says_its_own_losses(tmp_path):
    """A semantic-segmentation bundle's model.yaml names its loss.* choices (it said the detection
    heads' {box: default, cls: default}) and no detection reason for skipping ONNX."""
    from search import bundle
    from search.spec import load_spec
    from trainables import params as P
    from trainables.trial import run_trial

    sets = ["train.epochs=1", "train.limit_train=4", "train.limit_val=2", "space.loss.seg=dice"]
    spec = load_spec(ROOT / "spaces/seg.yaml", sets)
    cfg = spec.trial_config(out_dir=tmp_path / "trial")
    params = P.resolve(spec.search_space.defaults())
    result = run_trial(cfg, params)
    assert result["status"] == "ok", result
    meta = bundle.build_bundle(cfg, Path(result["checkpoint"]), spec.class_names, tmp_path / "bundle")
    written = yaml.safe_load((tmp_path / "bundle" / "model.yaml").read_text())
    for m in (meta, written):
        assert m["choices"]["losses"]["loss.seg"] == "dice" and "box" not in m["choices"]["losses"]
        assert "detection" not in m["onnx"]
