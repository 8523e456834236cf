"""Signed snapshots of Ray's state (search/durable.py): what resume installs, and what it refuses;
and the one test of a full disk (search/failures.py) that the driver and the trials share."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest

from search import durable
from search.failures import disk_full


@pytest.fixture
def key(tmp_path, monkeypatch):
    path = tmp_path / "config" / "search" / "state.key"
    monkeypatch.setenv(durable.KEY_ENV, str(path))
    return path


def _study(tmp_path):
    exp = tmp_path / "study"
    exp.mkdir()
    (exp / "tuner.pkl").write_bytes(b"tuner v1")
    (exp / "experiment_state-2026-12-02_01.json").write_text('{"v": 1}')
    (exp / "searcher-state-2026-12-02_01.pkl").write_bytes(b"searcher v1")
    (exp / "study.json").write_text("{}")  # not Ray's: never copied or replaced
    return exp


def _snapshot(exp):
    d = durable.Durability(exp)
    assert d.snapshot() is None  # nothing saved by Ray since the last one
    d.saved = True
    return d, d.snapshot()


def test_key_is_created_private_and_refused_when_others_can_read(key, tmp_path):
    k = durable.signing_key()
    assert len(k) == 32 and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert durable.signing_key() == k  # made once
    key.chmod(0o644)
    with pytest.raises(durable.UntrustedState, match="readable by others"):
        durable.signing_key()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644, 0o660])
def test_a_key_its_group_or_others_can_reach_is_refused(key, mode):
    """Only others' bits were checked once a mask of 0o007 slipped in: a group-readable key, that
    every member of the group could sign with, was taken."""
    durable.signing_key()
    key.chmod(mode)
    with pytest.raises(durable.UntrustedState, match=f"readable by others .*mode {mode:o}"):
        durable.signing_key()
    key.chmod(0o600)
    assert len(durable.signing_key()) == 32


def test_install_puts_back_what_was_signed(key, tmp_path):
    exp = _study(tmp_path)
    _, snap = _snapshot(exp)
    assert sorted(p.name for p in snap.iterdir()) == sorted(
        ["tuner.pkl", "experiment_state-2026-12-02_01.json", "searcher-state-2026-12-02_01.pkl"]
        + [durable.MANIFEST, durable.SIGNATURE]
    )
    # after the snapshot: Ray's background copy changed a file and wrote a newer session's state,
    # and someone replaced tuner.pkl
    (exp / "searcher-state-2026-12-02_01.pkl").write_bytes(b"searcher v2 (half written")
    (exp / "experiment_state-2026-12-02_02.json").write_text('{"v": 2}')
    (exp / "tuner.pkl").write_bytes(b"crafted")
    assert durable.install_snapshot(exp) == sorted(
        ["experiment_state-2026-12-02_01.json", "searcher-state-2026-12-02_01.pkl", "tuner.pkl"]
    )
    assert (exp / "tuner.pkl").read_bytes() == b"tuner v1"
    assert (exp / "searcher-state-2026-12-02_01.pkl").read_bytes() == b"searcher v1"
    assert not (exp / "experiment_state-2026-12-02_02.json").exists()
    assert (exp / "study.json").read_text() == "{}"


def test_a_snapshot_holds_the_newest_state_of_each_kind_and_its_install_drops_the_older(key, tmp_path):
    """Each launch and resume writes its own experiment_state-<time>.json (and searcher state):
    every snapshot copied, hashed and signed all of them, one more per resume (an audit)."""
    exp = _study(tmp_path)
    (exp / "experiment_state-2026-12-02_02.json").write_text('{"v": 2}')  # a resume's
    _, snap = _snapshot(exp)
    assert sorted(p.name for p in snap.iterdir() if p.name not in (durable.MANIFEST, durable.SIGNATURE)) == [
        "experiment_state-2026-12-02_02.json",
        "searcher-state-2026-12-02_01.pkl",
        "tuner.pkl",
    ]
    durable.install_snapshot(exp)
    assert not (exp / "experiment_state-2026-12-02_01.json").exists()
    assert (exp / "experiment_state-2026-12-02_02.json").read_text() == '{"v": 2}'


def test_a_new_generation_replaces_the_old(key, tmp_path):
    exp = _study(tmp_path)
    d, first = _snapshot(exp)
    (exp / "tuner.pkl").write_bytes(b"tuner v2")
    d.saved = True
    second = d.snapshot()
    assert second != first and not first.exists()
    assert durable.current_snapshot(exp) == second
    names = sorted(p.name for p in (exp / durable.STATE_DIR).iterdir())
    assert names == sorted([second.name, durable.CURRENT])
    (exp / "tuner.pkl").write_bytes(b"later")
    durable.install_snapshot(exp)
    assert (exp / "tuner.pkl").read_bytes() == b"tuner v2"


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda snap: (snap / "tuner.pkl").write_bytes(b"crafted"), "differs from its signed sha256"),
        (lambda snap: (snap / "tuner.pkl").unlink(), "missing or differs"),
        (lambda snap: (snap / durable.MANIFEST).write_text('{"files": {}}'), "does not match"),
        (lambda snap: (snap / durable.SIGNATURE).write_text("0" * 64), "does not match"),
        (lambda snap: (snap / durable.SIGNATURE).unlink(), "does not match"),
        (lambda snap: (snap.parent / durable.CURRENT).write_text("../../etc"), "not a snapshot"),
        (lambda snap: (snap.parent / durable.CURRENT).unlink(), "holds no signed Ray state"),
    ],
)
def test_tampered_snapshots_are_refused(key, tmp_path, tamper, message):
    exp = _study(tmp_path)
    _, snap = _snapshot(exp)
    (exp / "tuner.pkl").write_bytes(b"current")
    tamper(snap)
    with pytest.raises(durable.UntrustedState, match=message):
        durable.install_snapshot(exp)
    assert (exp / "tuner.pkl").read_bytes() == b"current"  # nothing installed


def test_another_users_key_is_refused(key, tmp_path, monkeypatch):
    exp = _study(tmp_path)
    _snapshot(exp)
    other = tmp_path / "other.key"
    other.write_bytes(os.urandom(32))
    other.chmod(0o600)
    monkeypatch.setenv(durable.KEY_ENV, str(other))
    with pytest.raises(durable.UntrustedState, match="does not match"):
        durable.verify_snapshot(exp)


def test_study_json_goes_with_the_state_it_describes(key, tmp_path):
    """A kill after a snapshot and before study.json's rewrite: resume gets the snapshot's copy."""
    exp = _study(tmp_path)
    d = durable.Durability(exp)
    d.saved = True
    d.snapshot({"name": "study", "trials": {"t1": {"state": "COMPLETE"}}})
    behind = {"name": "study", "trials": {"t1": {"state": "RUNNING"}}}  # a loop step behind
    (exp / "study.json").write_text(json.dumps(behind))
    durable.install_snapshot(exp)
    assert json.loads((exp / "study.json").read_text())["trials"]["t1"]["state"] == "COMPLETE"


def _wrapped(inner: BaseException) -> BaseException:
    """``inner`` raised inside a handler that raised another error (as Ray wraps a callback's)."""
    try:
        try:
            raise inner
        except OSError as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize(
    ("exc", "full"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
        (_wrapped(OSError(errno.ENOSPC, "No space left on device")), True),
        (OSError(errno.EACCES, "Permission denied"), False),
        (_wrapped(OSError(errno.EIO, "I/O error")), False),
        (ValueError("bad"), False),
        (None, False),
    ],
)
def test_one_disk_full_predicate_for_driver_and_trials(exc, full):
    got = disk_full(exc)
    assert (got is not None) == full
    if full:
        assert got.errno in (errno.ENOSPC, errno.EDQUOT)


def test_another_studys_signed_state_is_refused(key, tmp_path):
    """A snapshot names its study: one put into another study's folder is refused."""
    import shutil

    exp = _study(tmp_path)
    _snapshot(exp)
    other = tmp_path / "other"
    shutil.copytree(exp, other)
    with pytest.raises(durable.UntrustedState, match="signed for study 'study', not 'other'"):
        durable.install_snapshot(other)
    durable.install_snapshot(exp)  # in its own folder: fine


def test_resume_removes_the_pickles_no_snapshot_signs(key, tmp_path):
    """Ray unpickles an errored trial's error.pkl when it builds the results; no snapshot signs
    it, so resume removes it (the trial's error.txt stays), unless --trust-folder."""
    from search import study_folder

    exp = _study(tmp_path)
    _snapshot(exp)
    trial = exp / "trial_abc"
    trial.mkdir()
    (trial / "error.pkl").write_bytes(b"crafted")
    (trial / "error.txt").write_text("Traceback ...")
    study_folder.install_state(exp, trust_folder=True)
    assert (trial / "error.pkl").exists()
    study_folder.install_state(exp, trust_folder=False)
    assert not (trial / "error.pkl").exists() and (trial / "error.txt").exists()


def test_resume_with_an_unusable_key_names_the_key_and_its_fix(key, tmp_path):
    """A key others could read made resume say the folder was untrusted and offer only
    --trust-folder; the fault is the key's, and chmod 600 is the fix."""
    from search import study_folder
    from search.errors import SpecError

    exp = _study(tmp_path)
    _snapshot(exp)
    key.chmod(0o644)
    with pytest.raises(SpecError, match=r"readable by others or not yours \(mode 644\).*Fix: chmod 600 "):
        study_folder.install_state(exp, trust_folder=False)
    study_folder.install_state(exp, trust_folder=True)  # --trust-folder: a warning, not a refusal
    key.unlink()
    with pytest.raises(SpecError, match="no signing key at .*Fix: launch a study, or resume with --trust"):
        study_folder.install_state(exp, trust_folder=False)


def test_resume_runs_only_in_the_folder_the_study_ran_in(tmp_path):
    """A copy's records point at the original (a resume of a copy wrote there, and --keep-top
    deleted the original's checkpoints); a moved folder's at where it was."""
    from types import SimpleNamespace

    from search.errors import SpecError
    from search.study_folder import refuse_elsewhere

    ran, copy = tmp_path / "runs" / "s", tmp_path / "copy" / "s"
    for d in (ran, copy):
        d.mkdir(parents=True)
        (d / "study.json").write_text("{}")
    spec = SimpleNamespace(experiment_dir=ran)
    refuse_elsewhere(spec, ran)
    with pytest.raises(SpecError, match=f"is a copy of the study in {ran}"):
        refuse_elsewhere(spec, copy)
    for d, uid in ((ran, "a1"), (copy, "a1")):  # the run map's uid names the study: the same
        (d / "mlflow_runs.json").write_text(json.dumps({"uid": uid}))
    with pytest.raises(SpecError, match=f"is a copy of the study in {ran}"):
        refuse_elsewhere(spec, copy)
    (ran / "mlflow_runs.json").write_text(json.dumps({"uid": "b2"}))  # another study took its place
    with pytest.raises(SpecError, match=f"moved here from {ran}, where another study lies now; .* anew"):
        refuse_elsewhere(spec, copy)
    (ran / "study.json").unlink()
    with pytest.raises(SpecError, match=f"moved here from {ran}; .* move it back"):
        refuse_elsewhere(spec, copy)
