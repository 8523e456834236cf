"""A finished study read where it cannot be written: an archive mounted read-only, another user's
study (an audit copied one and ran every command on it). Reading commands work; a write is
refused in one line before anything is written; nothing is written beside the original.

Writes are denied through ``os.access`` for the archive's paths (as the kernel answers on a
read-only mount or for another user's files; the tests run as root, whom file modes do not stop)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from search import mlflow_store, promote, select, store_files
from search.errors import SpecError
from tests.cli_study import NAME


def _deny_writes(monkeypatch, denied) -> None:
    """``os.access`` answers no to writing the paths ``denied`` holds true for."""
    real = os.access

    def access(path, mode, *args, **kwargs):
        no = mode & os.W_OK and denied(Path(os.path.abspath(path)))
        return False if no else real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


@pytest.fixture
def archive(cli_study, tmp_path, monkeypatch):
    """A copy of the shared study's output folder that this process may not write."""
    root = tmp_path / "archive"
    shutil.copytree(cli_study["runs"], root)
    _deny_writes(monkeypatch, lambda path: path.is_relative_to(root))
    return root


def _files(root: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def test_promote_of_a_read_only_store_is_refused_before_anything_is_written(archive, cli_study):
    """The bundle went into the original's mlartifacts (recreating that folder when it was gone),
    then MLflow failed with 'attempt to write a readonly database' and three tracebacks."""
    before, original = _files(archive), _files(cli_study["runs"])
    with pytest.raises(select.SelectError, match=r"mlflow.db is read-only .*Fix: make it writable, or"):
        promote.promote(archive / NAME, "archived", force=True)
    assert _files(archive) == before and _files(cli_study["runs"]) == original


def test_a_read_only_store_is_read_as_it_is_and_served_from_a_mended_copy(archive, caplog, capsys):
    """Opening it warned 'could not point it at ...: attempt to write a readonly database' in every
    reading command; the UI named the artifacts of the folder it ran in (gone: no artifacts)."""
    db = archive / mlflow_store.DB_FILE
    before = _files(archive)
    with caplog.at_level(logging.INFO, logger="search"):
        assert not store_files.store_writable(db) and mlflow_store.mend_moved(db) == 0
    assert caplog.records == []
    experiment = select.study_store(archive / NAME)[1]
    with contextlib.ExitStack() as temporary:
        from search.commands_tracking import _ui_store_args

        extra, uri = _ui_store_args(db, f"sqlite:///{db}", temporary)
        copy = mlflow_store.sqlite_file(uri)
        assert copy is not None and copy != db
        assert "is read-only: the UI shows a copy" in capsys.readouterr().err
        located = MlflowClient(uri).get_experiment_by_name(experiment).artifact_location
        assert located == (archive / mlflow_store.ARTIFACTS_DIR / experiment).resolve().as_uri()
        assert extra[-1] == (archive / mlflow_store.ARTIFACTS_DIR).resolve().as_uri()
    assert not copy.parent.exists() and _files(archive) == before


@pytest.mark.parametrize(
    ("again", "fix"),
    [(None, "fix output_dir or tracking.uri"), ("resume", "Fix: make it writable, then resume again")],
)
def test_a_launch_or_resume_on_a_read_only_store_is_refused_before_ray(archive, again, fix, monkeypatch):
    """A resume with a read-only mlflow.db in a writable folder started Ray, retried for 70 s,
    printed 794 lines and ended exit 0 with every record left in the pending file."""
    spec = SimpleNamespace(tracking=None, output_dir=archive, name=NAME)
    folder = "tracking.uri: the folder of the SQLite store .* is not writable"
    with pytest.raises(SpecError, match=f"{folder}.*{fix}"):
        mlflow_store.check_tracking(spec, again=again)
    monkeypatch.undo()
    _deny_writes(monkeypatch, lambda path: path.name == mlflow_store.DB_FILE)  # the file alone
    with pytest.raises(SpecError, match=f"mlflow.db is read-only [(]the study writes to it[)].*{fix}"):
        mlflow_store.check_tracking(spec, again=again)


def test_a_store_copy_that_fails_leaves_nothing(archive, tmp_path, monkeypatch):
    """A copy cut short (a full temporary disk) left its folder in the temporary folder."""
    import errno
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()

    def full(db, copy):
        copy.write_bytes(b"part")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_files, "_copy_store", full)
    with pytest.raises(OSError, match="No space"):
        store_files.readable_copy(archive / mlflow_store.DB_FILE)
    assert list((tmp_path / "tmp").iterdir()) == []
