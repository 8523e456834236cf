"""A real 4-trial study through ``search.launcher`` on a tiny COCO set, recorded in SQLite MLflow:
runs (1 parent + 4 nested children, per-epoch metrics), Ctrl-C + resume (same runs, none left
RUNNING), ``best``, ``promote`` (registry version, alias, lineage; refusing a regression),
``export`` and ``predict`` (same outputs as the trial's own evaluation), and registry URIs as
the next study's base weights.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from ray.tune import Callback

from search import mlflow_store, registry, run_map, select
from search import study as S
from search.cli import main
from tests.tinydata import edited_study_copy, make_tiny_coco, write_tiny_spec
from trainables.files import sha256_file

ARCH = "ssdlite320_mobilenet_v3_large"
EPOCHS = 2


class InterruptOnce(Callback):
    """Ctrl-C (SIGINT to this process) once the first trial reported epoch 1."""

    def __init__(self) -> None:
        self.sent = False

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("epoch") == 1 and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)


class WatchStudy(Callback):
    """What ``status`` would read (study.json on disk) at the end of a resumed run, after Ray's last
    sync of its experiment folder (Ray's staged copy of study.json once overwrote the live one)."""

    def __init__(self, exp_dir: Path) -> None:
        self.exp_dir, self.seen = exp_dir, {}

    def on_experiment_end(self, trials, **info):
        self.seen = {k: t["state"] for k, t in S.read_study(self.exp_dir)["trials"].items()}


def write_spec(root: Path, name: str = "tiny", **extra) -> Path:
    return write_tiny_spec(
        root,
        name,
        # a 2x2 grid: exactly 4 trials; lr 1e-7 barely moves the (random) base model
        space={"optimizer": {"choices": ["sgd", "adamw"]}, "lr": {"choices": [1.0e-7, 0.01]}},
        search={"algorithm": "grid", "scheduler": "asha", "num_trials": 4, "max_concurrent": 2},
        epochs=EPOCHS,
        **extra,
    )


@pytest.fixture(scope="module")
def study(ray_local, tmp_path_factory):
    """The study, interrupted after the first epoch and resumed; MLflow run ids seen in between."""
    from search.launcher import launch, resume
    from search.spec import load_spec

    root = tmp_path_factory.mktemp("select")
    make_tiny_coco(root / "data", n_images=6, size=100)
    spec = load_spec(write_spec(root))
    t0 = time.time()
    first = launch(spec, extra_callbacks=[InterruptOnce()])
    exp_dir = root / "runs" / "tiny"
    runs_before = json.loads((exp_dir / run_map.RUNS_FILE).read_text())["runs"]
    mlc = mlflow_store.client(mlflow_store.default_uri(root / "runs"))
    statuses_before = {k: mlc.get_run(v).info.status for k, v in runs_before.items()}
    t1 = time.time()
    watch = WatchStudy(exp_dir)
    second = resume(exp_dir, extra_callbacks=[watch])
    t2 = time.time()
    print(f"launch (interrupted) {t1 - t0:.0f}s, resume {t2 - t1:.0f}s")
    return {
        "root": root,
        "exp_dir": exp_dir,
        "first": first,
        "second": second,
        "runs_before": runs_before,
        "statuses_before": statuses_before,
        "watched": watch.seen,
        "mlc": mlc,
    }


def _children(mlc, exp_id: str, parent: str) -> list:
    return mlc.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent}'", max_results=100)


def test_runs_after_interrupt_and_resume(study):
    mlc, exp_dir = study["mlc"], study["exp_dir"]
    watched = study["watched"]  # the live state, not the interrupt's (2 trials, PENDING)
    assert len(watched) == 4 and set(watched.values()) <= {S.COMPLETE, S.PRUNED}, watched
    assert study["first"]["interrupted"] and not study["second"]["interrupted"]
    assert "RUNNING" not in study["statuses_before"].values()  # the interruption closed every run
    assert study["statuses_before"]["parent"] == "KILLED"
    exp = mlc.get_experiment_by_name("tiny")
    every = mlc.search_runs([exp.experiment_id], "", max_results=100)
    runs = json.loads((exp_dir / run_map.RUNS_FILE).read_text())["runs"]
    parent = mlc.get_run(runs["parent"])
    kids = _children(mlc, exp.experiment_id, parent.info.run_id)
    assert len(every) == 5 and len(kids) == 4  # 1 parent + 4 nested children, no duplicates
    assert {k: runs[k] for k in study["runs_before"]} == study["runs_before"]  # the same runs continued
    assert [r for r in every if r.info.status == "RUNNING"] == []
    assert parent.info.status == "FINISHED" and parent.data.tags["summary.status"] == "finished"
    state = S.read_study(exp_dir)
    assert set(state["trials"]) == {r.data.tags["search.trial_id"] for r in kids}
    for kid in kids:
        t = state["trials"][kid.data.tags["search.trial_id"]]
        assert kid.info.status == "FINISHED"
        assert {"optimizer", "lr"} <= set(kid.data.params)
        steps = [m.step for m in mlc.get_metric_history(kid.info.run_id, "map50")]
        assert sorted(set(steps)) == list(range(t["epochs"] + 1))  # epoch 0 (base) .. last epoch
        for key in ("loss", "lr", "epoch_seconds", "images_per_s", "map"):
            assert key in kid.data.metrics, key
        assert kid.data.metrics["best_map50"] == pytest.approx(t["best_metric"])
        assert kid.data.metrics["best_epoch"] == t["best_epoch"]
        if t["state"] == S.PRUNED:
            assert kid.data.tags["stopped_early"] == "true" and kid.data.tags["stopped_at_epoch"] == str(
                t["epochs"]
            )
            assert kid.data.tags["search.stopped.rule"] and kid.data.tags["search.stopped.epoch"] == str(
                t["epochs"]
            )
        else:
            assert t["state"] == S.COMPLETE and "stopped_early" not in kid.data.tags
        assert kid.data.tags["search.state"] == t["state"]  # one vocabulary: study.json and MLflow
    counts = {}
    for t in state["trials"].values():
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    every = {k: counts.get(k, 0) for k in S.STATES}  # the interrupted run's PENDING count is 0 now
    assert {
        k[len("search.trials.") :]: int(v)
        for k, v in parent.data.tags.items()
        if k.startswith("search.trials.")
    } == every
    assert parent.data.metrics["base_map50"] == pytest.approx(state["base_metric"])
    assert [m.step for m in mlc.get_metric_history(parent.info.run_id, "trials_finished")][-1] == 4


def test_best_json(study, capsys):
    exp_dir = study["exp_dir"]
    assert main(["best", str(exp_dir), "--json", "--top", "3"]) == 0
    rows = json.loads(capsys.readouterr().out)
    status_ids = {t["id"] for t in S.status_object(exp_dir)["trials"]}
    runs = json.loads((exp_dir / run_map.RUNS_FILE).read_text())["runs"]
    assert 1 <= len(rows) <= 3 and {r["id"] for r in rows} <= status_ids
    values = [r["best_metric"] for r in rows]
    assert values == sorted(values, reverse=True)
    keys = {"id", "state", "epochs", "best_metric", "params", "checkpoint", "run_id", "improvement"}
    for r in rows:
        assert keys <= set(r)
        assert r["run_id"] == runs[r["id"]] and r["epoch"] == r["best_epoch"]
        assert r["improvement"] == pytest.approx(r["best_metric"] - r["study_base_metric"])
    assert main(["best", "tiny", "--output-dir", str(exp_dir.parent)]) == 0
    assert rows[0]["id"] in capsys.readouterr().out
    assert main(["best", "nope", "--output-dir", str(exp_dir.parent)]) == 2


def test_promote_registers_alias_and_lineage(study, capsys):
    exp_dir, mlc = study["exp_dir"], study["mlc"]
    top = select.best(exp_dir, 1)[0]
    beats = S.better(top["best_metric"], top["study_base_metric"], "max")
    argv = ["promote", str(exp_dir), "--model", "tiny-det", "--json"] + ([] if beats else ["--force"])
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["forced"] is (not beats) and out["trial"] == top["id"] and out["alias"] == "champion"
    assert out["previous_version"] is None and out["study_best"] is None  # a new alias; the best trial
    mv = mlc.get_model_version_by_alias("tiny-det", "champion")
    assert int(mv.version) == out["version"] == 1 and mv.run_id == top["run_id"]
    for key in ("study", "trial", "run_id", "base_weights_sha256", "dataset_fingerprint", "metric", "map50"):
        assert mv.tags.get(key), key
    assert mv.tags["study"] == "tiny" and mv.tags["trial"] == top["id"] and mv.tags["metric"] == "map50"
    parent_tags = mlc.get_run(
        json.loads((exp_dir / run_map.RUNS_FILE).read_text())["runs"]["parent"]
    ).data.tags
    assert mv.tags["dataset_fingerprint"] == parent_tags["dataset_fingerprint"]
    assert mv.tags["base_weights_sha256"] == parent_tags["base_weights_sha256"] == "none"
    arts = {a.path for a in mlc.list_artifacts(top["run_id"], "bundle")}
    assert {"bundle/weights.pt", "bundle/model.yaml", "bundle/load.py", "bundle/SHA256SUMS"} <= arts

    # the registered model is the next study's base: models:/NAME@ALIAS resolves to its weights
    uri = mlflow_store.default_uri(exp_dir.parent)
    weights = registry.resolve_model_uri("models:/tiny-det@champion", uri, cache_dir=study["root"] / "cache")
    assert weights.name == "weights.pt"
    state = torch.load(weights, map_location="cpu", weights_only=True)
    assert all(torch.is_tensor(v) for v in state.values())
    same = registry.resolve_model_uri(f"runs:/{top['run_id']}/bundle", uri, cache_dir=study["root"] / "cache")
    assert sha256_file(same) == sha256_file(weights)
    # the cache is keyed by tracking store: a second store with the same model name and version
    # (here a copy of the first) gets its own download, never the first store's file
    other_db = study["root"] / "other-store" / "mlflow.db"
    other_db.parent.mkdir(exist_ok=True)
    shutil.copy2(exp_dir.parent / mlflow_store.DB_FILE, other_db)
    other = registry.resolve_model_uri(
        "models:/tiny-det@champion", f"sqlite:///{other_db}", cache_dir=study["root"] / "cache"
    )
    assert other != weights and other.is_file() and weights.is_file()
    assert sha256_file(other) == sha256_file(weights)
    with pytest.raises(registry.RegistryError, match="cannot resolve models:/tiny-det@nope"):
        registry.resolve_model_uri("models:/tiny-det@nope", uri, cache_dir=study["root"] / "cache")
    fresh = study["root"] / "fresh-cache"  # a run that does not exist: no folder left behind
    with pytest.raises(registry.RegistryError, match="cannot resolve runs:/0123456789abcdef/bundle"):
        registry.resolve_model_uri("runs:/0123456789abcdef/bundle", uri, cache_dir=fresh)
    assert not fresh.exists()
    # a spec with it as base: validate resolves it as launch does (it once said the "weights file
    # 'models:/tiny-det@champion' does not exist" while launch --dry-run accepted it)
    path = write_spec(study["root"], "tiny-next")
    raw = yaml.safe_load(path.read_text())
    raw["model"]["weights"] = "models:/tiny-det@champion"
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    from trainables.config import DataSplit, TrialConfig
    from trainables.models import build_model

    images = study["root"] / "data" / "images"
    ann = study["root"] / "data" / "annotations.json"
    cfg = TrialConfig(
        task="detection",
        arch=ARCH,
        train=DataSplit(images, ann),
        val=DataSplit(images, ann),
        out_dir=study["root"] / "next",
        weights=str(weights),
        image_size=96,
    )
    from trainables import params as P

    model, info = build_model(cfg, P.resolve({}), num_classes=3)
    assert info["missing"] == [] and info["sha256"] == sha256_file(weights)


def test_promote_says_when_the_alias_moves_to_another_than_the_best(study, capsys):
    """``promote --trial`` moved ``champion`` from the study's best to a worse trial without a word."""
    exp_dir, ranked = study["exp_dir"], select.best(study["exp_dir"])
    where = ["promote", str(exp_dir), "--model", "tiny-moved", "--force"]
    assert main(where) == 0 and main([*where, "--trial", ranked[1]["id"]]) == 0
    out = capsys.readouterr().out
    assert "tiny-moved@champion pointed at version 1 before" in out
    assert f"note: not the study's best trial ({ranked[0]['id']}: map50=" in out


def test_promote_again_keeps_what_an_earlier_version_serves(study, capsys, monkeypatch):
    """A second promote of a trial (after a resume had trained it on) wrote its bundle over the
    first's, so version 1 served other weights than its tags said; and a promote of a running
    study tagged the epoch it read first, not the one it exported."""
    from search import promote

    exp_dir, mlc, top = study["exp_dir"], study["mlc"], select.best(study["exp_dir"], 1)[0]
    where = ["promote", str(exp_dir), "--model", "tiny-again", "--force", "--json"]
    assert main(where) == 0
    first = json.loads(capsys.readouterr().out)
    before = {a.path: a.file_size for a in mlc.list_artifacts(top["run_id"], first["source"].split("/")[-1])}
    assert before
    exported = promote.export_trial

    def trained_on(*args, **kwargs):  # the trial reached a new best while promote read it
        meta, trial = exported(*args, **kwargs)
        return meta, {**trial, "best_metric": trial["best_metric"] + 0.25, "best_epoch": 7}

    monkeypatch.setattr(promote, "export_trial", trained_on)
    assert main(where) == 0
    second = json.loads(capsys.readouterr().out)
    assert first["trial"] == second["trial"] == top["id"] and first["source"] != second["source"]
    paths = [out["source"].removeprefix(f"runs:/{top['run_id']}/") for out in (first, second)]
    assert all(p == "bundle" or p.startswith("bundle-") for p in paths), paths
    assert {a.path: a.file_size for a in mlc.list_artifacts(top["run_id"], paths[0])} == before
    version = mlc.get_model_version("tiny-again", str(second["version"]))
    assert version.tags["best_epoch"] == "7" and "at epoch 7" in version.description
    assert second["value"] == pytest.approx(top["best_metric"] + 0.25)
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    def made_meanwhile(name):  # two promotes of a new model: the other created it after this one looked
        raise MlflowException(f"{name} not found", error_code=RESOURCE_DOES_NOT_EXIST)

    monkeypatch.setattr(mlc, "get_registered_model", made_meanwhile)
    promote._registered(mlc, "tiny-again", "ssdlite")  # was exit 1: "Registered Model ... already exists"


def test_promote_refuses_a_regression(study, tmp_path, capsys):
    exp_dir, mlc = study["exp_dir"], study["mlc"]
    # the real study: a trial is refused exactly when it does not beat the base model
    for t in select.best(exp_dir):
        if not S.better(t["best_metric"], t["study_base_metric"], "max"):
            assert main(["promote", str(exp_dir), "--model", "tiny-weak", "--trial", t["id"]]) == 1
            assert "does not beat the base model" in capsys.readouterr().err
            break

    # a study whose every trial got worse than its base model (study.json as the launcher writes it)
    def worse(state: dict) -> None:
        for t in state["trials"].values():
            t["base_metric"] = 0.9
            t["history"] = [{"epoch": 0, "map50": 0.9}] + [r for r in t["history"] if r.get("epoch")]

    fake = edited_study_copy(exp_dir, tmp_path / "runs" / "worse", worse)
    versions = len(mlc.search_model_versions("name='tiny-det'"))
    assert main(["promote", str(fake), "--model", "tiny-det"]) == 1
    err = capsys.readouterr().err
    assert "refusing to promote trial" in err and "epoch-0 map50 0.9000" in err and "--force" in err
    assert len(mlc.search_model_versions("name='tiny-det'")) == versions  # nothing registered
    assert main(["promote", str(exp_dir), "--model", "tiny-det", "--trial", "no-such-trial"]) == 2
    # export makes its bundle (a way to inspect a model too), and says what promote would refuse
    top = select.best(fake, 1)[0]["id"]
    shutil.copytree(exp_dir / f"trial_{top}", fake / f"trial_{top}")
    assert main(["export", str(fake), "--out", str(tmp_path / "worse-bundle"), "--no-torchscript"]) == 0
    assert "does not beat the base model's epoch-0 0.9000" in capsys.readouterr().err


def test_export_predict_matches_the_trials_evaluation(study, tmp_path, capsys):
    from search import bundle, bundle_predict
    from trainables import coco_eval

    exp_dir = study["exp_dir"]
    top = select.best(exp_dir, 1)[0]
    out = tmp_path / "bundle"
    assert main(["export", str(exp_dir), "--out", str(out), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["study"]["trial"] == top["id"] and meta["checkpoint"]["epoch"] == top["best_epoch"]
    assert {"weights.pt", "model.yaml", "metrics.json", "load.py", "SHA256SUMS"} <= {
        p.name for p in out.iterdir()
    }
    assert meta["torchscript"]["ok"], meta["torchscript"]
    assert meta["rebuild_check"]["max_abs_diff"] <= 1e-5
    on_disk = yaml.safe_load((out / "model.yaml").read_text())
    assert on_disk["class_names"] == ["red", "blue"] and on_disk["num_classes"] == 3
    assert on_disk["category_ids"] == [3, 7]  # tinydata's ids, not 1..K
    assert on_disk["preprocessing"]["image_size"] == 96 and on_disk["params"]["lr"] == top["params"]["lr"]
    bundle.verify(out)
    assert main(["export", str(exp_dir), "--out", str(out)]) == 2  # not empty: refused

    own, index = _trials_own_predictions(exp_dir, top, tmp_path)
    paths = [rec.path for rec in index.images]
    assert (
        main(
            [
                "predict",
                str(out),
                *map(str, paths[:3]),
                "--out",
                str(tmp_path / "pred"),
                "--min-score",
                "0",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert len(result["images"]) == 3
    for entry, pred, rec in zip(result["images"], own, index.images, strict=False):
        sx, sy = rec.width / pred["input_size"][1], rec.height / pred["input_size"][0]
        expect = pred["boxes"] * torch.tensor([sx, sy, sx, sy])
        got = torch.tensor([d["box"] for d in entry["detections"]]).reshape(-1, 4)
        assert got.shape == expect.shape
        assert torch.allclose(got, expect, atol=1e-3)
        assert [d["label"] for d in entry["detections"]] == pred["labels"].tolist()
        named = {(d["class"], d["category_id"]) for d in entry["detections"]}
        assert named <= {("red", 3), ("blue", 7)} and named, entry["detections"]
        assert torch.allclose(
            torch.tensor([d["score"] for d in entry["detections"]]), pred["scores"], atol=1e-5
        )
        assert Path(entry["annotated"]).is_file()
    # without --json: a table per image, one row per detection
    assert main(["predict", str(out), str(paths[0]), "--min-score", "0"]) == 0
    table = capsys.readouterr().out.splitlines()
    rows = [ln for ln in table if ln.startswith("  ") and "(" in ln and "box" not in ln]
    assert len(rows) == len(result["images"][0]["detections"]) and str(paths[0]) in "\n".join(table)
    # the bundle on every val image reproduces the trial's recorded best metric
    full = bundle_predict.predict_files(out, paths, min_score=0.0)
    preds = [
        {
            "image_id": rec.id,
            "boxes": torch.tensor([d["box"] for d in e["detections"]]).reshape(-1, 4),
            "scores": torch.tensor([d["score"] for d in e["detections"]]),
            "labels": torch.tensor([d["label"] for d in e["detections"]], dtype=torch.int64),
            "input_size": (rec.height, rec.width),
        }
        for e, rec in zip(full["images"], index.images, strict=True)
    ]
    # (training evaluated batches of 2: low-score boxes may differ in the last bits, not the metric)
    assert coco_eval.evaluate_detections(index, preds)["map50"] == pytest.approx(top["best_metric"], abs=1e-3)
    _load_py_gives_the_same_model(out, paths[0], result["images"][0], own[0])
    _tampered_bundles_are_refused(out, paths[0], tmp_path, capsys)


def _trials_own_predictions(exp_dir: Path, top: dict, tmp_path: Path) -> tuple[list[dict], Any]:
    """The trial's own evaluation: its model at the checkpoint through the trial's val pipeline,
    one image a batch (as predict), each prediction with its image id and input size."""
    from search import bundle
    from trainables import coco, data

    spec = select.load_study_spec(exp_dir)
    cfg = spec.trial_config(out_dir=tmp_path / "x")
    model, _, _ = bundle.trial_model(cfg, Path(top["checkpoint"]), 3)
    index = coco.load_coco(cfg.val.annotations, cfg.val.images, task="detection")
    ds = data.CocoDetection(index, data.build_transforms("detection", False, 96, {}))
    loader = data.make_loader(ds, 1, shuffle=False, workers=0, seed=0)
    own = []
    with torch.inference_mode():
        for images, targets in loader:
            for image, target, pred in zip(images, targets, model(list(images)), strict=True):
                own.append({**pred, "image_id": target["image_id"], "input_size": tuple(image.shape[-2:])})
    return own, index


def _load_py_gives_the_same_model(out: Path, image: Path, predicted: dict, own: dict) -> None:
    """The bundle's standalone load.py (torch/torchvision only) gives the same model: the same
    labels as ``predict`` and, through its TorchScript file, the trial's own boxes."""
    import importlib.util

    spec_ = importlib.util.spec_from_file_location("bundle_load_copy", out / "load.py")
    mod = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(mod)
    m2, meta2 = mod.load_bundle(out)
    r2 = mod.predict(m2, meta2, image)
    assert [d["label"] for d in r2["detections"]] == [d["label"] for d in predicted["detections"]]
    ts = mod.load_torchscript(out)
    x = mod.preprocess(mod.read_image(image), meta2)
    _, dets = ts([x])
    assert torch.allclose(dets[0]["boxes"], own["boxes"], atol=1e-4)


def _tampered_bundles_are_refused(out: Path, image: Path, tmp_path: Path, capsys) -> None:
    """A bundle is verified whole: every file model.yaml names has a matching sha256 entry, and
    weights_file is a plain name inside the bundle; otherwise predict exits 2 naming the file."""
    import hashlib

    def copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(out, dst)
        return dst

    def resum(folder: Path, drop: str | None = None) -> None:
        lines = []
        for line in (folder / "SHA256SUMS").read_text().splitlines():
            name = line.partition("  ")[2]
            if name != drop:
                lines.append(f"{hashlib.sha256((folder / name).read_bytes()).hexdigest()}  {name}")
        (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")

    unlisted = copy("unlisted")  # the weights' line removed, then the weights changed
    resum(unlisted, drop="weights.pt")
    state = torch.load(unlisted / "weights.pt", weights_only=True)
    torch.save(
        {k: (v + 1 if v.is_floating_point() else v) for k, v in state.items()}, unlisted / "weights.pt"
    )
    empty = copy("empty")
    (empty / "SHA256SUMS").write_text("")
    outside = copy("outside")  # weights_file points out of the bundle (model.yaml re-summed)
    shutil.copy2(out / "weights.pt", tmp_path / "elsewhere.pt")
    meta = yaml.safe_load((outside / "model.yaml").read_text())
    meta["weights_file"] = "../elsewhere.pt"
    (outside / "model.yaml").write_text(yaml.safe_dump(meta))
    resum(outside)
    for folder, words in ((unlisted, "weights.pt"), (empty, "model.yaml"), (outside, "plain file name")):
        capsys.readouterr()
        assert main(["predict", str(folder), str(image)]) == 2, folder
        err = capsys.readouterr().err
        assert words in err, (folder, err)
