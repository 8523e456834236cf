"""A study folder moved or copied: ``export`` and ``promote`` read the MLflow store that came
with it (the default store lies in the output folder, beside the study), never create a store
where the study ran, and refuse to register into a store that is not there."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from mlflow import MlflowClient

from search import mlflow_store, run_map
from tests.cli_study import NAME, ok_json, one_error_line, search


def _runs_copy(cli_study, dest):
    shutil.copytree(cli_study["runs"], dest)
    return dest / NAME


@pytest.mark.slow  # one registration (25-35 s here)
def test_a_copied_output_folder_promotes_into_its_own_store(cli_study, tmp_path):
    exp_dir = _runs_copy(cli_study, tmp_path / "runs")

    def written(root):  # the files under a store's artifacts, with when each was last written
        return {p: p.stat().st_mtime_ns for p in (root / "mlartifacts").rglob("*") if p.is_file()}

    originals, started = written(cli_study["runs"]), time.time_ns()  # earlier tests' promotes too
    best = ok_json(search("best", str(exp_dir), "--json", cwd=tmp_path))[0]["id"]
    waiting = [{"op": "log", "key": best, "metrics": [["m", 1.0, 9, 9]]}, {"op": "log", "key": "parent"}]
    pending = exp_dir / "mlflow_pending.jsonl"  # its run lacks a record: promote says so
    pending.write_text("".join(json.dumps(op) + "\n" for op in waiting) + "{cut\n")
    out = ok_json(search("promote", str(exp_dir), "--model", "copied", "--force", "--json", cwd=tmp_path))
    assert out["trial"] == best and out["pending_records"] == 1
    here = f"sqlite:///{(tmp_path / 'runs' / mlflow_store.DB_FILE).resolve()}"
    version = MlflowClient(here, registry_uri=here).get_model_version_by_alias("copied", "champion")
    assert int(version.version) == out["version"] == 1
    there = f"sqlite:///{(cli_study['runs'] / mlflow_store.DB_FILE).resolve()}"
    assert MlflowClient(there, registry_uri=there).search_registered_models("name='copied'") == []
    # its bundle beside the copy's store, not in the original's folder (MLflow's absolute paths)
    new = [p for p, t in written(tmp_path / "runs").items() if t >= started]
    path = version.source.rsplit("/", 1)[1]  # bundle, or bundle-N after earlier tests' promotes of it
    assert path.startswith("bundle"), path
    assert any(p.match(f"*/{version.run_id}/artifacts/{path}/*") for p in new), new
    assert written(cli_study["runs"]) == originals


def test_a_store_that_is_not_there_is_not_created(cli_study, tmp_path):
    """The run map names a store that has gone (the study folder moved without it): promote says
    so (exit 2) and export works from the spec's facts; neither creates a store."""
    exp_dir = tmp_path / "lone" / NAME
    shutil.copytree(cli_study["exp_dir"], exp_dir)
    gone = tmp_path / "gone" / mlflow_store.DB_FILE
    runs_file = exp_dir / run_map.RUNS_FILE
    recorded = json.loads(runs_file.read_text())
    recorded["tracking_uri"] = f"sqlite:///{gone}"
    runs_file.write_text(json.dumps(recorded))
    proc = search("promote", str(exp_dir), "--model", "lone", "--force", cwd=tmp_path)
    one_error_line(proc, str(gone), "is not there")
    meta = ok_json(
        search(
            "export", str(exp_dir), "--out", str(tmp_path / "b"), "--no-torchscript", "--json", cwd=tmp_path
        )
    )
    assert meta["study"]["trial"] and (tmp_path / "b" / "weights.pt").is_file()
    assert not gone.parent.exists() and not (tmp_path / "lone" / mlflow_store.DB_FILE).exists()


def test_promote_of_a_study_whose_records_wait_says_how_to_send_them(cli_study, tmp_path):
    """MLflow was down until the launch ended: promote said 'the study was not recorded in MLflow'
    although its records waited in the pending file for a resume to send them."""
    from search import write_queue

    exp_dir = _runs_copy(cli_study, tmp_path / "runs")
    recorded = json.loads((exp_dir / run_map.RUNS_FILE).read_text())
    recorded["runs"] = {}  # nothing reached the store: every run is still to be made
    (exp_dir / run_map.RUNS_FILE).write_text(json.dumps(recorded))
    (exp_dir / write_queue.PENDING_FILE).write_text('{"op": "open_run", "key": "parent"}\n')
    proc = search("promote", str(exp_dir), "--model", "waiting", "--force", cwd=tmp_path)
    one_error_line(
        proc, "has no MLflow run yet", str(exp_dir / write_queue.PENDING_FILE), "then promote again"
    )
    assert f"python -m search resume {exp_dir}" in proc.stderr


def test_ui_of_a_study_whose_store_is_not_there_creates_none(cli_study, tmp_path):
    """The study folder came without its output folder's store: ui refused (exit 2) instead of
    making an empty store, and the folder it ran in, where the store was."""
    exp_dir = tmp_path / "lone" / NAME
    shutil.copytree(cli_study["exp_dir"], exp_dir)
    gone = tmp_path / "gone" / mlflow_store.DB_FILE
    runs_file = exp_dir / run_map.RUNS_FILE
    runs_file.write_text(
        json.dumps({**json.loads(runs_file.read_text()), "tracking_uri": f"sqlite:///{gone}"})
    )
    proc = search("ui", str(exp_dir), "--port", "0", cwd=tmp_path, timeout=120)
    one_error_line(proc, str(gone), "is not there")
    assert not gone.parent.exists() and not (tmp_path / "lone" / mlflow_store.DB_FILE).exists()


@pytest.mark.slow  # an export and four commands (the quick suite is near its 15 minutes)
def test_home_in_command_line_paths_and_a_name_in_two_places(cli_study, tmp_path):
    """``--output-dir=~/x`` and ``--out=~/x`` (which the shell leaves alone) are in the home folder,
    as in the spec, not a folder named ``~`` here; a NAME that is both ``./NAME`` and
    ``./runs/NAME`` is refused rather than one of them guessed."""
    home, here = tmp_path / "home", tmp_path / "here"
    _runs_copy(cli_study, home / "r")
    here.mkdir()
    obj = ok_json(search("status", NAME, "--output-dir=~/r", "--json", cwd=here, HOME=str(home)))
    assert obj["name"] == NAME
    meta = ok_json(
        search(
            "export",
            NAME,
            "--output-dir=~/r",
            "--out=~/b",
            "--no-torchscript",
            "--json",
            cwd=here,
            HOME=str(home),
        )
    )
    assert meta["study"]["trial"] and (home / "b" / "weights.pt").is_file() and not (here / "~").exists()
    _runs_copy(cli_study, here / "runs")
    shutil.copytree(cli_study["exp_dir"], here / NAME)
    one_error_line(search("status", NAME, cwd=here), "both", str(here / NAME), "hold a study")
    assert ok_json(search("status", f"./{NAME}", "--json", cwd=here))["name"] == NAME


@pytest.mark.slow  # an export (the quick suite is near its 15 minutes)
def test_a_study_copied_without_its_data_exports_the_classes_it_learnt(cli_study, tmp_path):
    """export read the class names from the annotation files: a study copied to a machine without
    its data exported nothing ('annotation file ... does not exist'), and annotations edited since
    the launch would have named its classes wrongly. facts.json, written at launch, has them."""
    import yaml

    from search import facts

    exp_dir = tmp_path / "deploy" / NAME
    shutil.copytree(cli_study["exp_dir"], exp_dir)
    recorded = facts.read_facts(exp_dir)
    assert recorded is not None and recorded["class_names"] and len(recorded["dataset_fingerprint"]) == 64
    spec = yaml.safe_load((exp_dir / "spec.yaml").read_text())
    for split in ("train", "val"):  # as on a machine where the data was never copied
        spec["data"][split] = {"annotations": str(tmp_path / "no" / "a.json"), "images": str(tmp_path / "no")}
    (exp_dir / "spec.yaml").write_text(yaml.safe_dump(spec))
    meta = ok_json(search("export", str(exp_dir), "--out", str(tmp_path / "b"), "--json", cwd=tmp_path))
    assert meta["class_names"] == recorded["class_names"] and meta["category_ids"] == recorded["category_ids"]
    assert meta["rebuild_check"]["images"].startswith("2 noise images") and meta["torchscript"]["ok"]
    assert meta["study"]["dataset_fingerprint"] == recorded["dataset_fingerprint"]


def test_a_facts_file_that_names_other_classes_than_the_data_is_refused(cli_study, tmp_path):
    """facts.json won over the annotation files without a look: one naming the classes in another
    order (not this study's, or annotations edited since the launch) exported swapped labels."""
    import yaml

    from search import facts, select
    from search.bundle import BundleError

    exp_dir = _runs_copy(cli_study, tmp_path / "runs")
    recorded = facts.read_facts(exp_dir)
    assert select.load_study_spec(exp_dir).class_names == recorded["class_names"]
    swapped = {k: v[::-1] if k in ("class_names", "category_ids") else v for k, v in recorded.items()}
    (exp_dir / facts.FACTS_FILE).write_text(json.dumps(swapped))
    with pytest.raises(
        select.SelectError, match=r"names the classes .* but the study's models learnt .*Fix: put"
    ):
        select.load_study_spec(exp_dir)
    (exp_dir / facts.FACTS_FILE).write_text(  # one class too many, and the data not here
        json.dumps({**recorded, "class_names": ["a", "b", "c"], "category_ids": [1, 2, 3]})
    )
    spec = yaml.safe_load((exp_dir / "spec.yaml").read_text())
    spec["data"]["train"] = spec["data"]["val"] = {
        "annotations": str(tmp_path / "a.json"),
        "images": str(tmp_path),
    }
    (exp_dir / "spec.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(BundleError, match="do not fit a model of 3 classes: the class list"):
        select.export(exp_dir, tmp_path / "b", torchscript=False)  # was torch's 'size mismatch' (exit 1)


def test_a_study_from_before_facts_json_without_its_data_says_to_put_it_back(cli_study, tmp_path):
    """An older study's export without its data said 'point it at the folder ...', a fix of a spec
    that export never reads: the study folder's saved one names the data."""
    import yaml

    from search import facts, select

    exp_dir = _runs_copy(cli_study, tmp_path / "runs")
    (exp_dir / facts.FACTS_FILE).unlink()
    spec = yaml.safe_load((exp_dir / "spec.yaml").read_text())
    spec["data"]["train"]["images"] = str(tmp_path / "gone")
    (exp_dir / "spec.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(
        select.SelectError, match="does not exist.* was launched before facts.json .*Fix: put"
    ):
        select.load_study_spec(exp_dir)


def _without_base_file(cli_study, tmp_path):
    """A copy of the study whose spec names a base weights file this machine does not have."""
    import yaml

    exp_dir = _runs_copy(cli_study, tmp_path / "runs")
    spec = yaml.safe_load((exp_dir / "spec.yaml").read_text())
    spec["model"]["weights"] = str(tmp_path / "gone" / "base.pt")
    (exp_dir / "spec.yaml").write_text(yaml.safe_dump(spec))
    return exp_dir


@pytest.mark.slow  # an export (the quick suite is near its 15 minutes)
def test_a_full_checkpoint_exports_without_the_base_weights_file(cli_study, tmp_path):
    """export refused a study whose base weights file is not on this machine ('weights file ...
    does not exist'), though a checkpoint of every tensor needs none of it."""
    from search import select

    exp_dir = _without_base_file(cli_study, tmp_path)
    meta = select.export(exp_dir, tmp_path / "b", torchscript=False)
    assert (tmp_path / "b" / meta["weights_file"]).is_file() and meta["class_names"]


def test_a_checkpoint_of_the_trained_tensors_alone_asks_for_the_base_weights_file(cli_study, tmp_path):
    """Without the base file, a checkpoint that holds only the trained tensors cannot be rebuilt:
    one line names the file to put back (nothing is written)."""
    import torch

    from search import select
    from search.bundle import BundleError

    exp_dir = _without_base_file(cli_study, tmp_path)
    for path in exp_dir.glob("trial_*/checkpoint_*/model.pt"):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        torch.save({**ckpt, "trainable_only": True}, path)
    with pytest.raises(BundleError, match=r"only the trained tensors.*gone/base.pt .*Fix: put that file"):
        select.export(exp_dir, tmp_path / "b", torchscript=False)
    assert not (tmp_path / "b").exists()


def test_a_resume_whose_data_is_gone_says_to_put_it_back(cli_study, tmp_path):
    """resume of a study whose data moved said 'point it at the folder ...': a fix of a spec that
    resume does not read (it reads the study's saved one)."""
    import yaml

    from search.errors import SpecError
    from search.study_folder import read_spec

    exp_dir = _runs_copy(cli_study, tmp_path / "runs")
    spec = yaml.safe_load((exp_dir / "spec.yaml").read_text())
    spec["data"]["train"]["images"] = str(tmp_path / "gone")
    (exp_dir / "spec.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError, match=r"gone. does not exist\. Fix: put it back there: .*spec\.yaml names"):
        read_spec(exp_dir)


def test_a_resume_whose_store_is_gone_is_refused(cli_study, tmp_path, monkeypatch):
    """resume without the study's mlflow.db made an empty store and went on in it (exit 0), its
    earlier runs out of sight: 'MLflow run ... of parent is gone; starting a new one'."""
    import yaml

    from search import mlflow_store
    from search.errors import SpecError
    from search.study_folder import check_store_there, read_spec

    exp_dir = _runs_copy(cli_study, tmp_path / "runs")
    spec = yaml.safe_load((exp_dir / "spec.yaml").read_text())
    spec["output_dir"] = str(tmp_path / "runs")  # as if it ran here
    (exp_dir / "spec.yaml").write_text(yaml.safe_dump(spec))
    check_store_there(read_spec(exp_dir), exp_dir)  # there: nothing to say
    (tmp_path / "runs" / mlflow_store.DB_FILE).unlink()
    with pytest.raises(SpecError, match=r"db, which holds this study's 3 run.s., is not there. Fix: put"):
        check_store_there(read_spec(exp_dir), exp_dir)
    assert not (tmp_path / "runs" / mlflow_store.DB_FILE).exists()
    monkeypatch.setenv(mlflow_store.DISABLE_ENV, "1")
    check_store_there(read_spec(exp_dir), exp_dir)  # going on without MLflow, as the fix says
