"""A launch with nobody at its terminal: the ssh session closes (SIGHUP), the reader of its output
leaves (``| head``), HOME cannot be written. Each once ended or abandoned the study without
saying so. The tiny data of :mod:`tests.test_launcher`."""

from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from search import durable
from search import study as S
from search.errors import SpecError
from tests.test_launcher import _env, tiny_data, write_spec
from tests.test_launcher_processes import _stop_after_first_epoch


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_data(tmp_path_factory)


def _spec(data_dir: Path, name: str) -> Path:
    search = {"algorithm": "random", "scheduler": "none", "num_trials": 2, "max_concurrent": 1}
    space = {"optimizer": "sgd", "lr": {"low": 1e-3, "high": 3e-2, "log": True}}
    return write_spec(data_dir, name, space, search)


@pytest.mark.slow  # a launch, stopped, as the quick suite's SIGTERM tests do
def test_sighup_of_the_launch_group_stops_it_as_ctrl_c(data_dir):
    """ssh closing sends SIGHUP to the session's processes: the launch died at once (exit 129), no
    state saved, no resume command, MLflow's runs left RUNNING."""
    exp_dir = data_dir / "runs" / "hup"
    cmd = [sys.executable, "-m", "search", "launch", str(_spec(data_dir, "hup"))]
    before = signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as from a terminal (CI may run under nohup,
    try:  # whose ignored SIGHUP the launch inherits: it then rightly goes on)
        rc, out, err = _stop_after_first_epoch(cmd, data_dir, exp_dir, signal.SIGHUP, group=True)
    finally:
        signal.signal(signal.SIGHUP, before)
    assert rc == 130, err[-3000:]
    assert f"Resume with:\n  python -m search resume {exp_dir}\n" in out
    assert S.read_study(exp_dir)["status"] == "interrupted"


@pytest.mark.slow  # a whole tiny launch
def test_a_launch_whose_reader_leaves_runs_its_study_to_the_end(data_dir):
    """``launch ... | head -3``: the header's print raised BrokenPipeError, which the CLI took
    for `status | head` (exit 0): the study never ran. Mid-run the progress line's raised inside
    Ray (exit 1, a 1,400-character line). Output it can no longer write is dropped."""
    exp_dir = data_dir / "runs" / "piped"
    cmd = [sys.executable, "-m", "search", "launch", str(_spec(data_dir, "piped"))]
    proc = subprocess.Popen(cmd, cwd=data_dir, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()  # the reader leaves after one line
    err = proc.communicate(timeout=400)[1].decode(errors="replace")
    assert first and proc.returncode == 0, err[-3000:]
    state = S.read_study(exp_dir)
    assert state["status"] == "finished" and len(state["trials"]) == 2, state["status"]
    assert all(t["state"] == S.COMPLETE for t in state["trials"].values())


def test_output_nobody_reads_is_dropped_and_its_descriptor_silenced():
    from search.launch_text import _Tolerant

    r, w = os.pipe()
    stream = io.TextIOWrapper(os.fdopen(w, "wb"), write_through=False)
    tolerant = _Tolerant(stream)
    os.close(r)
    assert tolerant.write("progress\n") == len("progress\n")
    tolerant.flush()  # EPIPE: dropped, not raised
    assert tolerant.write("more\n") == 5 and os.readlink(f"/proc/self/fd/{w}") == os.devnull
    broken = _Tolerant(io.StringIO())
    with pytest.raises(OSError, match="other"):
        broken._drop(OSError(errno.ENOSPC, "other"))  # only a reader gone or a terminal hung up
    stream.close()


def test_a_signing_key_that_cannot_be_made_is_bad_input_before_ray(tmp_path, monkeypatch):
    """HOME unwritable: the launch failed after Ray started ('FileNotFoundError: /nonexistent'),
    leaving a study folder status could not read."""
    from search.launcher import _check_signing_key

    monkeypatch.setenv(durable.KEY_ENV, str(tmp_path / "file" / "sub" / "state.key"))
    (tmp_path / "file").write_text("not a folder")
    made = "SEARCH_STATE_KEY_FILE: cannot make the signing key .*state.key.*Fix: set SEARCH_STATE_KEY_FILE"
    with pytest.raises(SpecError, match=made):
        _check_signing_key()
    key = tmp_path / "shared.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o640)
    monkeypatch.setenv(durable.KEY_ENV, str(key))
    with pytest.raises(SpecError, match="readable by others or not yours [(]mode 640[)][.] Fix: chmod 600"):
        _check_signing_key()
    key.chmod(0o600)
    key.write_bytes(b"short")
    with pytest.raises(SpecError, match="too short.*Fix: remove it"):
        _check_signing_key()


def test_the_signing_key_check_makes_no_key(tmp_path, monkeypatch):
    """The preflight made the key: a resume refused by a later check (a read-only store) left
    another user a new key in their HOME. The study's state keeping makes it now, after the checks."""
    from search.launcher import _check_signing_key

    key = tmp_path / "config" / "search" / "state.key"
    monkeypatch.setenv(durable.KEY_ENV, str(key))
    _check_signing_key()
    assert not (tmp_path / "config").exists()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if p == tmp_path else real(p, mode, **kw))
    with pytest.raises(SpecError, match=f"cannot make the signing key .*{tmp_path} is not a folder this"):
        _check_signing_key()
    assert durable.signing_key() and key.is_file()  # made on first use


def test_export_of_a_running_study_reads_its_checkpoint_again(cli_study, tmp_path, monkeypatch):
    """Ray replaces a running trial's checkpoint between study.json naming it and export loading
    it: export failed 3 times in 4 during a launch ('FileNotFoundError: .../checkpoint_000002')."""
    import json
    import shutil

    from search import bundle, select

    exp_dir = tmp_path / "runs" / "cmds"
    shutil.copytree(cli_study["exp_dir"], exp_dir)
    state = json.loads((exp_dir / S.STUDY_FILE).read_text())
    (exp_dir / S.STUDY_FILE).write_text(json.dumps({**state, "status": "running"}))
    calls, build = [], bundle.build_bundle

    def replaced_once(cfg, ckpt, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # Ray replaced it under the reader
            raise FileNotFoundError(errno.ENOENT, "gone", str(ckpt))
        return build(cfg, ckpt, *args, **kwargs)

    monkeypatch.setattr(bundle, "build_bundle", replaced_once)
    meta = select.export(exp_dir, tmp_path / "b", torchscript=False)
    assert len(calls) == 2 and meta["study"]["trial"] and (tmp_path / "b" / "weights.pt").is_file()
    (exp_dir / S.STUDY_FILE).write_text(json.dumps(state))  # finished: read once more, then the error
    calls.clear()  # (--keep-top removes checkpoints after the study is marked finished)

    def gone_each_time(cfg, ckpt, *args, **kwargs):
        calls.append(1)
        raise FileNotFoundError(errno.ENOENT, "gone", str(ckpt))

    monkeypatch.setattr(bundle, "build_bundle", gone_each_time)
    with pytest.raises(select.CheckpointGone, match="went while it was read. Fix: run the command again"):
        select.export(exp_dir, tmp_path / "c", torchscript=False)
    assert len(calls) == 2
    calls.clear()  # a file that is not the checkpoint's is not retried, and not called one

    def other_file(*args, **kwargs):
        calls.append(1)
        return open(tmp_path / "no-such-image.png")

    (exp_dir / S.STUDY_FILE).write_text(json.dumps({**state, "status": "running"}))
    monkeypatch.setattr(bundle, "build_bundle", other_file)
    with pytest.raises(FileNotFoundError, match="no-such-image"):
        select.export(exp_dir, tmp_path / "d", torchscript=False)
    assert len(calls) == 1
