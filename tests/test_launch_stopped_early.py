"""A launch stopped (Ctrl-C, SIGTERM, SIGKILL) before Ray's state was first saved and signed, which
happens when its first trial is added: its folder held study.json (and perhaps an empty tuner.pkl)
but nothing resumable, so ``launch`` refused it as an existing study, ``resume`` failed (exit 1, or
exit 2 asking for --trust-folder) and the name was lost. Now ``launch`` starts it over, ``resume``
and ``status`` say so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from search import durable
from search import study as S
from search.study_folder import gone_text, never_started
from tests.tinydata import make_tiny_coco, write_tiny_spec


def _stopped_launch(folder: Path) -> Path:
    """The files of a launch stopped in its first second (as a SIGKILL after tuner.pkl left them)."""
    folder.mkdir(parents=True)
    (folder / S.SPEC_FILE).write_text("name: s\n")
    S.write_study(folder, S.new_study("s", "map50", "max"))
    for name in ("tuner.pkl", "optuna.journal", "space.json", ".validate_storage_marker"):
        (folder / name).write_bytes(b"")
    return folder


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda f: None, True),
        (lambda f: (f / durable.STATE_DIR / ".1.tmp").mkdir(parents=True), True),  # a snapshot half made
        (
            lambda f: (f / durable.STATE_DIR).mkdir() or (f / durable.STATE_DIR / "current").write_text("1"),
            False,
        ),
        (
            lambda f: S.write_study(f, S.new_study("s", "map50", "max") | {"trials": {"t": {"id": "t"}}}),
            False,
        ),
        (lambda f: (f / "trial_t" / "checkpoint_000000").mkdir(parents=True), False),
        (lambda f: (f / "notes.txt").write_text("mine"), False),  # not a file a launch writes
        (lambda f: (f / S.SPEC_FILE).unlink(), False),
        (lambda f: (f / "local" / "20261207-120000").mkdir(parents=True), True),  # `trial`'s own run
        (lambda f: (f / f".{S.STUDY_FILE}.123.tmp").write_text("{"), True),  # a write the kill cut
    ],
    ids=["stopped", "half-snapshot", "snapshot", "a-trial", "a-checkpoint", "user-file", "no-spec"]
    + ["trial-runs", "cut-write"],
)
def test_never_started(tmp_path, change, expected):
    from search.study_folder import start_over

    folder = _stopped_launch(tmp_path / "s")
    change(folder)
    assert never_started(folder) is expected
    words = "launch it again" if expected else "resume it"
    assert words in gone_text(folder)
    if expected:  # started over: what the launch wrote goes, `trial`'s runs stay
        assert start_over(folder)
        assert {p.name for p in folder.iterdir()} <= {"local"}
        assert (folder / "local").is_dir() is (folder / "local" / "20261207-120000").is_dir()


def test_a_stopped_launch_starts_over_and_resume_says_so(ray_local, tmp_path, monkeypatch, capsys):
    from ray import tune

    from search.errors import SpecError
    from search.launcher import launch, resume
    from search.spec import load_spec

    make_tiny_coco(tmp_path / "data", n_images=4, size=64)
    search = {"algorithm": "random", "scheduler": "none", "num_trials": 1, "max_concurrent": 1}
    path = write_tiny_spec(tmp_path, "early", space={"lr": 0.01}, search=search, epochs=1)
    monkeypatch.setenv("SEARCH_NO_MLFLOW", "1")

    class Stopped(tune.Tuner):
        def __init__(self, *args, **kwargs):
            raise KeyboardInterrupt  # Ctrl-C after study.json, before Ray's first save

    monkeypatch.setattr(tune, "Tuner", Stopped)
    with pytest.raises(KeyboardInterrupt):
        launch(load_spec(path))
    exp_dir = tmp_path / "runs" / "early"
    assert (exp_dir / S.STUDY_FILE).is_file() and never_started(exp_dir)
    with pytest.raises(SpecError, match="nothing to resume") as err:
        resume(exp_dir)
    assert "launch the spec again" in str(err.value)
    monkeypatch.undo()
    monkeypatch.setenv("SEARCH_NO_MLFLOW", "1")
    capsys.readouterr()
    summary = launch(load_spec(path))
    assert "starting over" in capsys.readouterr().out
    assert summary["status"] == "finished" and summary["counts"] == {S.COMPLETE: 1}
    assert not never_started(exp_dir) and json.loads((exp_dir / S.STUDY_FILE).read_text())["trials"]


def test_resume_of_a_folder_no_launch_made_is_bad_input(tmp_path, capsys):
    """A folder with a study.json but no Ray state was exit 1, 'FileNotFoundError: ...' and the
    hint to set SEARCH_DEBUG; it is the user's input: exit 2 with the fix."""
    from search import cli

    folder = tmp_path / "s1"
    folder.mkdir()
    (folder / S.STUDY_FILE).write_text(json.dumps({"name": "s1", "status": "running", "trials": {}}))
    assert cli.main(["resume", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "Fix: resume the folder a 'launch' made" in err, err
    assert "FileNotFoundError" not in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in folder.iterdir()) == [S.STUDY_FILE]  # nothing created


def test_a_full_disk_is_one_line_naming_the_file(monkeypatch, capsys):
    """A command that found the disk full said only 'OSError: [Errno 28] ...' with the SEARCH_DEBUG
    hint; it names the file and what to do (a launch's own DiskFull line says more: kept)."""
    import errno

    from search import cli

    def full(args):
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/data/out/b/weights.pt")
        except OSError as exc:
            raise RuntimeError("torch wrapped it") from exc

    monkeypatch.setitem(cli.COMMANDS, "status", cli.COMMANDS["status"]._replace(run=full))
    monkeypatch.delenv("SEARCH_DEBUG", raising=False)
    assert cli.main(["status", "x"]) == 1
    err = capsys.readouterr().err.strip()
    assert (
        err == "error: No space left on device (/data/out/b/weights.pt): free some space, then run it again."
    )


def test_resume_while_its_launch_is_starting_says_so(tmp_path):
    """A launch holding the study before Ray's first save: resume said to resume 'the folder a
    launch made', as for a folder no launch made."""
    from search.errors import SpecError
    from search.guards import StudyLock
    from search.launcher import resume

    folder = tmp_path / "starting"
    folder.mkdir()
    (folder / S.STUDY_FILE).write_text(json.dumps({"name": "starting", "status": "running", "trials": {}}))
    lock = StudyLock(folder).acquire()  # this process stands for the launch
    try:
        with pytest.raises(SpecError, match="its launch is still starting") as err:
            resume(folder)
        assert "wait for it to end" in str(err.value)
    finally:
        lock.release()


def test_a_folder_holding_other_files_is_refused_not_written_into(tmp_path):
    """A launch into an existing folder of the user's files wrote its study in among them (exit 0)."""
    from search.study_folder import ExperimentExists, refuse_existing

    folder = tmp_path / "runs" / "s"
    refuse_existing(folder)  # not there: fine
    folder.mkdir(parents=True)
    refuse_existing(folder)  # empty: fine
    (folder / ".search.lock").write_text("")  # a launch's own file: fine
    (folder / "local" / "20261207-120000").mkdir(parents=True)  # `search trial`'s run by default: fine
    refuse_existing(folder)
    for name in ("mine.txt", "notes", "a.csv", "b.csv"):
        (folder / name).write_text("x")
    with pytest.raises(ExperimentExists, match=r"holds files a launch does not write \(a\.csv, b\.csv, mine"):
        refuse_existing(folder)
