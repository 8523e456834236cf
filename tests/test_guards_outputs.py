"""Trust guards, outputs (issue 14, item 3): the inputs are read-only, and an output that cannot be
written is refused before any work."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from search import guards
from search.errors import SpecError
from search.spec import load_spec
from tests.test_guards import DET, ROOT, run

# ---------------------------------------------------------------- the inputs are read-only


def test_outputs_over_the_inputs_are_refused(tmp_path):
    spec = load_spec(DET)
    inputs = guards.spec_inputs(spec)
    weights = Path(spec.model.weights)
    images = spec.data.train.images
    link = tmp_path / "w.pt"
    link.symlink_to(weights)
    for path, folder in (
        (weights, False),
        (link, False),  # a symlink to the weights
        (images / "new.png", False),  # a new file inside the image folder
        (weights.parent / "other.pt", False),  # next to the base weights
        (images, True),
        (weights.parent, True),
        (spec.data.train.annotations, False),
        (images / "sub", True),  # a folder below the image folder (it was accepted)
        (images / "sub" / "w.pt", False),
    ):
        with pytest.raises(SpecError):
            guards.check_output(path, inputs, "--out", folder=folder)
    guards.check_output(tmp_path / "out.pt", inputs, "--out", folder=False)
    guards.check_output(tmp_path / "bundle", inputs, "--out", folder=True)
    guards.check_output(images.parent / "runs", inputs, "--out", folder=True)  # next to the images


def test_trial_out_below_the_images_exits_2_before_reading_the_data(tmp_path):
    images = ROOT / "spaces/data/bccd/images"
    done = run("trial", str(DET), "--out", str(images / "sub"), "--set", "train.epochs=1")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr  # no data-loading log lines first
    assert "--out" in lines[0] and "inside the input folder" in lines[0] and not (images / "sub").exists()
    done = run("trial", str(DET), "--half", "--set", "train.epochs=1")
    assert done.returncode == 2 and "--half" in done.stderr and "--weights-out" in done.stderr


def test_trial_weights_out_onto_the_base_exits_2_and_keeps_it(tmp_path):
    weights = ROOT / "spaces/base/det-base.pt"
    before = weights.stat().st_mtime_ns, weights.read_bytes()[:64]
    done = run("trial", str(DET), "--weights-out", str(weights), "--set", "train.epochs=1")
    assert done.returncode == 2 and "--weights-out" in done.stderr and "read-only" in done.stderr
    assert (weights.stat().st_mtime_ns, weights.read_bytes()[:64]) == before


@pytest.mark.parametrize(
    ("make", "path", "folder", "said"),
    [
        ("dir", "x", False, "is a folder"),  # --weights-out onto a folder
        ("file", "x", True, "is a file"),  # --out / output_dir onto a file
        ("file", "x/sub/w.pt", False, "above it is a file"),
        ("file", "x/sub", True, "above it is a file"),
        (None, "new/sub/w.pt", False, None),  # missing folders are made when it writes
        ("dir", "x/w.pt", False, None),
        ("dir", "x", True, None),
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, make, path, folder, said):
    if make == "dir":
        (tmp_path / "x").mkdir()
    elif make == "file":
        (tmp_path / "x").write_text("")
    before = sorted(tmp_path.rglob("*"))
    if said is None:
        guards.check_output(tmp_path / path, guards.protected([]), "--out", folder=folder)
    else:
        with pytest.raises(SpecError) as err:
            guards.check_output(tmp_path / path, guards.protected([]), "--out", folder=folder)
        assert err.value.key == "--out" and said in err.value.message
    assert sorted(tmp_path.rglob("*")) == before


def test_trial_weights_out_onto_a_folder_exits_2_before_training(tmp_path):
    done = run("trial", str(DET), "--weights-out", str(tmp_path), "--set", "train.epochs=1")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "is a folder" in lines[0], done.stderr


def test_trial_weights_out_replaces_only_a_weights_file(tmp_path):
    """--weights-out onto the spec (it was replaced by a torch zip) or any file torch did not
    write is refused; an earlier weights file may be replaced."""
    import torch

    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\n")
    with pytest.raises(SpecError, match="is the spec file"):
        guards.check_weights_out(spec, spec)
    with pytest.raises(SpecError, match="not a weights file"):
        guards.check_weights_out(spec, None)
    torch.save({"w": torch.zeros(1)}, tmp_path / "w.pt")
    guards.check_weights_out(tmp_path / "w.pt", spec)
    guards.check_weights_out(tmp_path / "new.pt", spec)


def test_output_dir_onto_the_images_is_refused():
    with pytest.raises(SpecError) as err:
        load_spec(DET, [f"output_dir={ROOT / 'spaces/data/bccd/images'}"])
    assert err.value.key == "output_dir"


DATA = ROOT / "spaces/data/bccd"


@pytest.mark.parametrize(
    "uri",
    [
        f"sqlite:///{DATA / 'annotations/mlflow.db'}",  # beside the annotation files
        f"sqlite:///{DATA / 'images/runs/mlflow.db'}",  # below the image folder
        f"file://{DATA / 'images/mlruns'}",  # a file store there
        str(DATA / "annotations"),  # a plain path is a file store too
        f"sqlite:///{ROOT / 'spaces/base/mlflow.db'}",  # beside the base weights
    ],
)
def test_a_local_tracking_store_among_the_inputs_is_refused(uri, monkeypatch):
    """A SQLite or file store is written where tracking.uri says: not among the data or weights."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow refuses a file store without it
    with pytest.raises(SpecError) as err:
        load_spec(DET, [f"tracking.uri={uri}"])
    assert err.value.key == "tracking.uri" and "read-only" in str(err.value)


@pytest.mark.parametrize("uri", [f"sqlite:///{DATA / 'mlflow.db'}", "http://127.0.0.1:5000"])
def test_a_tracking_store_outside_the_inputs_loads(uri):
    assert load_spec(DET, [f"tracking.uri={uri}"]).tracking.uri == uri


@pytest.mark.parametrize(
    ("uri", "opt_in", "refused"),
    [
        ("file:///tmp/mlruns", None, True),  # MLflow's file store refuses every record by default
        ("/tmp/mlruns", None, True),  # a plain path is a file store
        ("file:mlruns", "false", True),
        ("file:///tmp/mlruns", "true", False),  # the user opted in as MLflow says
        ("/tmp/mlruns", "1", False),
        ("sqlite:////tmp/m.db", None, False),
        ("postgresql://u@db.example/mlflow", None, False),
        ("databricks", None, False),
    ],
)
def test_a_file_tracking_store_needs_mlflows_opt_in(uri, opt_in, refused, monkeypatch):
    """An audit's launch with a file: store exited 0 with every record refused by MLflow (its file
    store is in maintenance mode): now exit 2 naming the fix, unless MLFLOW_ALLOW_FILE_STORE is set."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    if opt_in is not None:
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", opt_in)
    if not refused:
        assert load_spec(DET, [f"tracking.uri={uri}"]).tracking.uri == uri
        return
    with pytest.raises(SpecError) as err:
        load_spec(DET, [f"tracking.uri={uri}"])
    assert err.value.key == "tracking.uri" and "MLFLOW_ALLOW_FILE_STORE=true" in str(err.value)
    assert "sqlite:///" in str(err.value)


def test_name_flag_onto_the_images_is_refused():
    """``launch --name images`` with output_dir the data folder: the study would have been written
    into the image folder (--name replaced the name after the spec's output checks)."""
    from search.launcher import apply_name

    spec = load_spec(DET, [f"output_dir={ROOT / 'spaces/data/bccd'}"])
    with pytest.raises(SpecError) as err:
        apply_name(spec, "images")
    assert err.value.key == "--name" and spec.name != "images"
    apply_name(spec, "other")
    assert spec.name == "other"
    with pytest.raises(SpecError, match=r"Fix: write e.g. --name escape[.]$"):  # was: "choose another"
        apply_name(spec, "../escape")


@pytest.mark.parametrize("name", [None, "ro1"])
def test_an_unwritable_output_dir_is_named_as_the_cause(tmp_path, monkeypatch, name):
    """--name's check found the folder above unwritable and blamed --name; without --name only the
    SQLite store's folder was checked (a server's store: nothing until the study folder failed)."""
    import os

    from search.launcher import launch

    out = tmp_path / "ro"
    out.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != out and real(p, mode))  # root passes chmod
    spec = load_spec(DET, [f"output_dir={out / 'runs'}", "tracking.uri=http://127.0.0.1:9"])
    with pytest.raises(SpecError) as err:
        launch(spec, name=name)
    assert err.value.key == "output_dir" and "is not writable" in err.value.message, str(err.value)
    assert list(out.iterdir()) == []
    study = out / "runs" / (name or spec.name)  # already there and writable: only it is written into
    study.mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != out / "runs" and real_access(p, mode))
    with pytest.raises(SpecError) as err:  # on past the check: the server at port 9 does not answer
        launch(spec, name=name)
    assert err.value.key == "tracking.uri", str(err.value)


def test_predict_min_score_outside_0_1_exits_2(tmp_path):
    done = run("predict", str(tmp_path), str(tmp_path / "x.png"), "--min-score", "1.5")
    assert done.returncode == 2 and "--min-score" in done.stderr


def test_a_spec_read_from_a_read_only_place_loads(tmp_path, monkeypatch):
    """Every command reads a study's spec (status, best, export of a read-only copy): the spec's
    own output_dir is not held to be writable; a command's output option is."""
    monkeypatch.setattr(guards.os, "access", lambda *a, **k: False)  # as for a user on a read-only mount
    load_spec(DET, [f"output_dir={tmp_path / 'runs'}"])
    with pytest.raises(SpecError, match="is not writable"):
        guards.check_output(tmp_path / "w.pt", guards.protected([]), "--weights-out", folder=False)


_TRIAL = {"id": "t1", "state": "TERMINATED", "params": {"lr": 0.01}, "history": [{"epoch": 1}]}
_EDITS = [{"id": "t2"}, {"params": "zzz"}, {"history": 5}, {"history": [3]}, {"index": "2"}, {"stopped": "x"}]
MALFORMED_STUDY = ["{not json", '["a list"]', '{"trials": [1, 2]}', '{"trials": {"x": 1}}'] + [
    # a hand-edited trial record (status and best failed with a TypeError, KeyError or AttributeError)
    json.dumps({"trials": {"t1": {**_TRIAL, **edit}}})
    for edit in _EDITS
]


@pytest.mark.parametrize("text", MALFORMED_STUDY)
def test_status_and_best_on_a_malformed_study_file_exit_2(tmp_path, text):
    exp = tmp_path / "broken"
    exp.mkdir()
    (exp / "study.json").write_text(text)
    for command in ("status", "best"):
        done = run(command, str(exp))
        assert done.returncode == 2, (command, done.stderr)
        assert str(exp / "study.json") in done.stderr and "not a valid study file" in done.stderr


def test_status_of_a_study_file_without_its_objective_or_epochs(tmp_path):
    """'{}' said the study had no study.json yet; no 'metric' was exit 1, KeyError; a null epoch
    count a TypeError after half the table."""
    exp = tmp_path / "hand"
    exp.mkdir()
    for text in ("{}", json.dumps({"mode": "max", "trials": {}})):
        (exp / "study.json").write_text(text)
        done = run("status", str(exp))
        assert done.returncode == 2 and "not a valid study file (no 'metric' or 'mode'" in done.stderr, (
            done.stderr
        )
    study = {"name": "hand", "metric": "map", "mode": "max", "trials": {"t1": {**_TRIAL, "epochs": None}}}
    (exp / "study.json").write_text(json.dumps(study))
    done = run("status", str(exp))
    assert done.returncode == 0 and "t1" in done.stdout, done.stderr
    study["trials"]["t1"]["state"] = None  # no state: a TypeError half-way through the table (exit 1)
    (exp / "study.json").write_text(json.dumps(study))
    done = run("status", str(exp))
    assert done.returncode == 0 and re.search(r"^t1 +- +0 ", done.stdout, re.M), (done.stdout, done.stderr)
    study["trials"]["t1"] |= {"best_metric": 0.5, "best_epoch": 1}
    (exp / "study.json").write_text(json.dumps(study))
    done = run("best", str(exp))
    assert done.returncode == 0 and re.search(r"^ 1 t1 +- +0.5000 ", done.stdout, re.M), (
        done.stdout,
        done.stderr,
    )
