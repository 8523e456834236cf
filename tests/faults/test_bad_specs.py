"""Bad specs through ``python -m search launch`` (not just ``validate``): exit 2, ONE stderr line
naming the key path, and nothing created: no experiment or output folder, no ``mlflow.db``, no
Ray start (``ray.init`` is a tripwire in the batch child, and the child's private TMPDIR must
hold no Ray session).

Every invalid spec of ``tests/test_spec.py`` is launched too (they are only validated there), plus
the cases below: unknown keys in every section (with "did you mean"), types and ranges, missing
and unusable files (weights that would run code, wrong architecture, truncated, an enum not in
the hub cache, a freeze set that matches only the weights file's FrozenBatchNorm2d statistics),
impossible conditionals, unsupported loss/freeze/architecture pairs, freeze patterns matching
nothing, objective metrics the task does not produce, an unreachable Ray address and tracking
server, bad command-line values. All launch cases run in ONE child process
(``tests.faults.cli_batch``: torch is imported once); three run as real ``python -m search``
processes.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.faults.common import (
    closed_port,
    env,
    one_error_line,
    ray_sessions,
    run_batch,
    short_tmp,
    snapshot,
)
from tests.test_spec import BCCD, INVALID, spec_dict
from tests.test_spec_kwargs import SEMANTIC_CHANGES

SEMANTIC = {
    **SEMANTIC_CHANGES,  # the task, its metric and data with masks
    "model.arch": "lraspp_mobilenet_v3_large",
}
PORT = closed_port()  # nothing listens there


class Evil:
    """Unpickling this runs code (it would create ``marker``)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _files(root: Path) -> dict[str, Path]:
    """Files some cases point at (built once per module)."""
    import torch
    import torchvision

    root.mkdir(parents=True, exist_ok=True)
    out = {"marker": root / "EVIL_CODE_RAN"}
    out["evil"] = root / "evil.pt"
    with open(out["evil"], "wb") as f:
        pickle.dump({"model": Evil(str(out["marker"]))}, f)
    out["wrong_arch"] = root / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), out["wrong_arch"])
    ssd = torchvision.models.get_model(
        "ssdlite320_mobilenet_v3_large", weights=None, weights_backbone=None, num_classes=4
    ).state_dict()
    out["frozen_bn"] = root / "ssdlite_frozen_bn.pt"  # as saved from FrozenBatchNorm2d layers
    torch.save({k: v for k, v in ssd.items() if not k.endswith("num_batches_tracked")}, out["frozen_bn"])
    out["truncated"] = root / "truncated.pt"
    out["truncated"].write_bytes(out["wrong_arch"].read_bytes()[:4096])
    out["not_json"] = root / "annotations.png"
    shutil.copy(next((BCCD / "images").iterdir()), out["not_json"])
    val = json.loads((BCCD / "annotations/instances_val.json").read_text())
    val["categories"][0]["name"] = val["categories"][0]["name"] + "_other"
    out["cats_differ"] = root / "val_other_categories.json"
    out["cats_differ"].write_text(json.dumps(val))
    out["torch_home"] = root / "empty_torch_home"
    out["torch_home"].mkdir()
    return out


def _case(cid, changes, key, text, *, argv=(), setup=None, semantic=False):
    return {
        "id": cid,
        "changes": changes,
        "key": key,
        "text": text,
        "argv": list(argv),
        "setup": setup,
        "semantic": semantic,
    }


# (id, spec changes, key path in the message, text in the message); F:<name> is a file from _files
EXTRA = [
    # unknown keys, every section, with "did you mean"
    _case("unknown-model-key", {"model.weigths": "none"}, "model.weigths", "did you mean 'weights'"),
    _case("unknown-data-key", {"data.image_sise": 96}, "data.image_sise", "did you mean 'image_size'"),
    _case("unknown-objective-key", {"objective.metirc": "map"}, "objective.metirc", "did you mean 'metric'"),
    _case("unknown-search-key", {"search.num_trial": 3}, "search.num_trial", "did you mean 'num_trials'"),
    _case("unknown-resources-key", {"resources.gpus": 1}, "resources.gpus", "did you mean 'gpu'"),
    _case("unknown-tracking-key", {"tracking.url": "http://x"}, "tracking.url", "did you mean 'uri'"),
    _case("unknown-split-key", {"data.train.image": "x"}, "data.train.image", "did you mean 'images'"),
    # types and ranges
    _case("max-concurrent-text", {"search.max_concurrent": "two"}, "search.max_concurrent", "integer"),
    _case("gpu-negative", {"resources.gpu": -1}, "resources.gpu", "greater than or equal"),
    _case("limit-train-zero", {"train.limit_train": 0}, "train.limit_train", "greater than or equal"),
    _case("reduction-factor-one", {"search.reduction_factor": 1}, "search.reduction_factor", "greater than"),
    _case("max-failures-negative", {"search.max_failures": -1}, "search.max_failures", "greater than"),
    _case("eval-base-not-bool", {"train.eval_base": "maybe"}, "train.eval_base", "bool"),
    _case("image-size-huge", {"data.image_size": 10000}, "data.image_size", "4096"),
    _case("split-not-mapping", {"data.train": "images/"}, "data.train", "mapping"),
    _case("space-not-mapping", {"space": ["lr"]}, "space", "mapping"),
    _case("seed-negative", {"train.seed": -1}, "train.seed", "greater than or equal"),
    _case("time-budget-negative", {"search.time_budget": -5}, "search.time_budget", "positive"),
    _case("time-budget-zero-text", {"search.time_budget": "0s"}, "search.time_budget", "positive"),
    _case("time-budget-nan", {"search.time_budget": float("nan")}, "search.time_budget", "finite"),
    _case("time-budget-inf-text", {"search.time_budget": "9" * 400 + "s"}, "search.time_budget", "finite"),
    _case("n-startup-negative", {"search.n_startup_trials": -1}, "search.n_startup_trials", "greater than"),
    _case("lr-fixed-text", {"space.lr": "fast"}, "space.lr", "fast"),
    # missing or unusable files
    _case("missing-val-images", {"data.val.images": "/nonexistent/val"}, "data.val.images", "does not exist"),
    _case("annotations-not-json", {"data.train.annotations": "F:not_json"}, "data.train", "annotations.png"),
    _case("categories-differ", {"data.val.annotations": "F:cats_differ"}, "data.val.annotations", "differ"),
    _case("weights-enum-not-cached", {"model.weights": "DEFAULT"}, "model.weights", "not in the torch hub"),
    _case("weights-code-pickle", {"model.weights": "F:evil"}, "model.weights", "weights_only"),
    _case("weights-wrong-arch", {"model.weights": "F:wrong_arch"}, "model.weights", "unexpected e.g."),
    _case("weights-truncated", {"model.weights": "F:truncated"}, "model.weights", "truncated.pt"),
    _case(
        "trainable-set-frozen-batchnorm",
        {"model.weights": "F:frozen_bn", "model.trainable_sets": {"bn": ["backbone.features.0.0.1.*"]}},
        "model.trainable_sets.bn",
        "FrozenBatchNorm2d",
    ),
    # impossible conditionals
    _case(
        "when-value-outside-range",
        {"space.momentum": {"low": 0.8, "high": 0.9, "when": {"lr": 0.5}}},
        "space.momentum.when.lr",
        "never",
    ),
    # unsupported loss / freeze / architecture pairs
    _case(
        "cls-loss-on-semantic", {"space.loss.cls": "focal"}, "space.loss.cls", "does not apply", semantic=True
    ),
    _case(
        "box-loss-on-semantic", {"space.loss.box": "giou"}, "space.loss.box", "does not apply", semantic=True
    ),
    _case(
        "freeze-preset-unsupported",
        {"space.trainable": "heads+neck"},
        "space.trainable",
        "heads+neck",
        semantic=True,
    ),
    _case(
        "loss-term-unsupported",
        {"space.loss.weight.loss_aux": 0.5},
        "space.loss.weight.loss_aux",
        "loss term",
        semantic=True,
    ),
    _case("seg-loss-unknown", {"space.loss.seg": "lovasz"}, "space.loss.seg", "ce, ce+dice", semantic=True),
    _case("compose-key-on-builder", {"model.backbone": "resnet50"}, "model.backbone", "composed"),
    _case(
        "backbone-does-not-compose",
        {"model.arch": "fasterrcnn", "model.backbone": "vit_b_16"},
        "model.backbone",
        "does not compose",
    ),
    _case("builder-kwarg-reserved", {"model.kwargs": {"num_classes": 5}}, "model.kwargs", "num_classes"),
    _case(
        "builder-kwarg-bad-value",
        {"model.kwargs": {"width_mult": "x"}},
        "model.kwargs.width_mult",
        "a number",
    ),
    _case("builder-kwarg-clash", {"model.kwargs": {"min_size": 320}}, "model.kwargs", "rejects"),
    _case(
        "activation-scope-without-activations",
        {
            "model.arch": "fasterrcnn_mobilenet_v3_large_320_fpn",
            "model.weights": "none",
            "space.activation": "silu",
            "space.activation_scope": "neck",
        },
        "space.activation_scope",
        "holds no activation module",
    ),
    _case(
        "builder-kwarg-typo",
        {"model.kwargs": {"score_tresh": 0.2}},
        "model.kwargs.score_tresh",
        "did you mean 'score_thresh'",
    ),
    # freeze patterns
    _case(
        "freeze-pattern-matches-nothing",
        {"model.trainable_sets": {"mine": ["head.*", "nothing.here.*"]}, "space.trainable": "mine"},
        "model.trainable_sets.mine",
        "nothing.here",
    ),
    _case(
        "freeze-set-empty",
        {"model.trainable_sets": {"mine": []}, "space.trainable": "mine"},
        "model.trainable_sets.mine",
        "no pattern",
    ),
    # objective metric not produced by the task
    _case("objective-mask-on-detection", {"objective.metric": "mask_map"}, "objective.metric", "mask_map"),
    _case(
        "objective-map-on-semantic", {"objective.metric": "map50"}, "objective.metric", "miou", semantic=True
    ),
    # cluster and tracking
    _case(
        "ray-address-unreachable",
        {"resources.address": f"127.0.0.1:{PORT}"},
        "resources.address",
        "cannot reach the Ray cluster",
    ),
    _case("ray-address-malformed", {"resources.address": "headnode"}, "resources.address", "HOST:PORT"),
    _case(
        "ray-address-flag-unreachable",
        {},
        "--address",
        "cannot reach the Ray cluster",
        argv=["--address", f"127.0.0.1:{PORT}"],
    ),
    _case(
        "tracking-server-unreachable",
        {"tracking.uri": f"http://127.0.0.1:{PORT}"},
        "tracking.uri",
        "unreachable",
    ),
    _case(
        "tracking-sqlite-unwritable",
        {"tracking.uri": "sqlite:////proc/no/such/mlflow.db"},
        "tracking.uri",
        "cannot create",
    ),
    _case("tracking-uri-unknown-scheme", {"tracking.uri": f"htp://127.0.0.1:{PORT}"}, "tracking.uri", "htp"),
    _case(
        "tracking-uri-password",
        {"tracking.uri": f"http://bob:pw123@127.0.0.1:{PORT}"},
        "tracking.uri",
        "MLFLOW_TRACKING_PASSWORD",
    ),
    # issue 13/14: scheduler names, the reference trial, values a launch cannot use
    _case("scheduler-unknown", {"search.scheduler": "ashaa"}, "search.scheduler", "did you mean 'asha'"),
    _case(
        "reference-trial-grid",
        {"search.reference_trial": True, "search.algorithm": "grid"},
        "search.reference_trial",
        "grid",
    ),
    _case("seed-2-32", {"search.seed": 2**32}, "search.seed", "less than 4294967296"),
    _case("name-too-long", {"name": "n" * 101}, "name", "at most 100"),
    # the command line
    _case("name-flag-bad", {}, "--name", "letters", argv=["--name", "../escape"]),
    _case("keep-top-negative", {}, "--keep-top", ">= 1", argv=["--keep-top", "-1"]),
    # 0 would delete the best trial's checkpoint too (export and promote then have nothing)
    _case("keep-top-zero", {}, "--keep-top", ">= 1", argv=["--keep-top", "0"]),
    _case("set-unknown-key", {}, "train.epoch", "did you mean 'epochs'", argv=["--set", "train.epoch=3"]),
    _case("set-not-key-value", {}, "--set", "KEY=VALUE", argv=["--set", "train.epochs"]),
    _case("experiment-exists", {}, "runs/t", "already holds a study", setup="existing"),
    _case("spec-empty-file", {}, ".yaml: the top level", "mapping", setup="empty"),
    _case("spec-bad-yaml", {}, ".yaml: is not valid YAML", "at line", setup="bad_yaml"),
    _case("spec-is-a-folder", {}, "spec file", "is a folder, not a file", setup="folder"),
]

FROM_TEST_SPEC = [
    _case(f"spec:{cid}", {k: v for k, v in changes.items() if k != "output_dir"}, key, text)
    for cid, changes, key, text in INVALID
]
CASES = FROM_TEST_SPEC + EXTRA


def _resolve(value, files):
    if isinstance(value, str) and value.startswith("F:"):
        return str(files[value[2:]])
    if isinstance(value, dict):
        return {k: _resolve(v, files) for k, v in value.items()}
    return value


def _write_case(case: dict, folder: Path, files: dict) -> Path:
    folder.mkdir(parents=True)
    spec = folder / "spec.yaml"
    changes = {k: _resolve(v, files) for k, v in case["changes"].items()}
    if case["semantic"]:
        changes = {**SEMANTIC, **changes}
    raw = spec_dict(**changes)  # dotted keys applied as --set does; _DELETE removes a key
    setup = case["setup"]
    if setup == "empty":
        spec.write_text("")
    elif setup == "bad_yaml":
        spec.write_text("name: t\nmodel: {arch: [unclosed\n")
    elif setup == "folder":
        spec = folder / "spec_folder.yaml"
        spec.mkdir()
    else:
        spec.write_text(yaml.safe_dump(raw))
    if setup == "existing":
        (folder / "runs" / "t").mkdir(parents=True)
        (folder / "runs" / "t" / "study.json").write_text("{}")
    return spec


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Every case launched in one batch child; returns {id: result + "created" paths}."""
    root = tmp_path_factory.mktemp("badspecs")
    files = _files(root / "files")
    cases, before, folders = [], {}, {}
    for i, case in enumerate(CASES):
        folder = root / "cases" / f"{i:03d}"
        spec = _write_case(case, folder, files)
        folders[case["id"]] = folder
        before[case["id"]] = snapshot(folder)
        cases.append({"id": case["id"], "argv": ["launch", str(spec), *case["argv"]], "cwd": str(folder)})
    t0 = time.time()
    results = run_batch(cases, root / "batch", TORCH_HOME=str(files["torch_home"]))
    print(f"{len(cases)} bad specs launched in {time.time() - t0:.1f}s")
    for cid, folder in folders.items():
        results[cid]["created"] = sorted(snapshot(folder) - before[cid])
    results["__files__"] = files
    return results


def test_enough_distinct_bad_specs(launched):
    """A sample, not a count: at least 40 cases, and at least 40 different refusals among them
    (each case's last stderr line, its own folder masked), so the ids are not one check renamed."""
    assert len({c["id"] for c in CASES}) == len(CASES) >= 40
    refusals: dict[str, list[str]] = {}
    for case in CASES:
        lines = [ln for ln in launched[case["id"]]["stderr"].splitlines() if ln.strip()]
        text = re.sub(r"/cases/\d+/", "/cases/N/", lines[-1] if lines else "<no stderr>")
        refusals.setdefault(text, []).append(case["id"])
    assert len(refusals) >= 40, {t: ids for t, ids in refusals.items() if len(ids) > 1}


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_spec_refused_before_anything_starts(launched, case):
    r = launched[case["id"]]
    assert r["rc"] == 2, f"exit {r['rc']}:\n{r['stderr'][-3000:]}"
    line = one_error_line(r["stderr"])
    assert line.startswith("error: "), line
    assert case["key"] in line, f"key path {case['key']!r} not named: {line}"
    assert case["text"].lower() in line.lower(), line
    assert not r["ray_init"] and not r["ray_initialized"], "Ray was started"
    assert r["created"] == [], f"created {r['created']}"
    assert not r["stdout"].strip(), r["stdout"]


def test_no_ray_session_and_no_code_ran(launched):
    assert launched["__ray_sessions__"]["sessions"] == []
    assert not launched["__files__"]["marker"].exists(), "unpickling the weights file ran code"


# ---------------------------------------------------------------- real `python -m search launch` processes

REAL = ["spec:epochs-zero", "ray-address-unreachable", "tracking-server-unreachable"]


@pytest.mark.parametrize("cid", REAL)
def test_real_process(tmp_path, cid):
    """The same refusal from a real ``python -m search launch`` process: its whole stderr is one line,
    exit 2, nothing created, no Ray session in its private TMPDIR."""
    case = next(c for c in CASES if c["id"] == cid)
    spec = _write_case(case, tmp_path / "case", {})
    before = snapshot(tmp_path / "case")
    tmpdir = short_tmp("fr")
    proc = subprocess.run(
        [sys.executable, "-m", "search", "launch", str(spec), *case["argv"]],
        cwd=tmp_path / "case",
        env=env(tmpdir),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    assert case["key"] in line and case["text"].lower() in line.lower(), line
    assert snapshot(tmp_path / "case") == before
    assert ray_sessions(tmpdir) == [] and not (tmpdir / "ray").exists()
    shutil.rmtree(tmpdir, ignore_errors=True)


def test_tripwire_and_session_check_see_a_real_start(tmp_path):
    """Control: the checks above are not vacuous. A valid spec reaches ``ray.init`` in the batch child
    (the tripwire fires), and ``launch --dry-run`` of it creates nothing."""
    folder = tmp_path / "ok"
    spec = _write_case(_case("valid", {}, "", ""), folder, {})
    before = snapshot(folder)
    small = ["--set", "train.limit_train=2", "--set", "train.limit_val=2", "--set", "data.image_size=64"]
    cases = [
        {"id": "dry", "argv": ["launch", str(spec), "--dry-run", *small], "cwd": str(folder)},
        {"id": "valid", "argv": ["launch", str(spec)], "cwd": str(folder)},
    ]
    results = run_batch(cases, tmp_path / "batch", SEARCH_NO_MLFLOW="1")
    assert results["dry"]["rc"] == 0 and not results["dry"]["ray_init"], results["dry"]["stderr"][-2000:]
    assert results["valid"]["ray_init"] and results["valid"]["rc"] == 1
    assert "ray.init called" in results["valid"]["stderr"]
    assert snapshot(folder) == before
