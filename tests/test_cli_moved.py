"""A study folder moved or copied: ``export`` and ``promote`` read the MLflow store that came
with it (the default store lies in the output folder, beside the study), never create a store
where the study ran, and refuse to register into a store that is not there."""

from __future__ import annotations

import json
import shutil

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
    out = ok_json(search("promote", str(exp_dir), "--model", "copied", "--force", "--json", cwd=tmp_path))
    here = f"sqlite:///{(tmp_path / 'runs' / mlflow_store.DB_FILE).resolve()}"
    version = MlflowClient(here, registry_uri=here).get_model_version_by_alias("copied", "champion")
    assert int(version.version) == out["version"] == 1
    there = f"sqlite:///{(cli_study['runs'] / mlflow_store.DB_FILE).resolve()}"
    assert MlflowClient(there, registry_uri=there).search_registered_models("name='copied'") == []


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
