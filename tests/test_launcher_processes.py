"""The launcher in separate processes, with a real local Ray: Ctrl-C then resume from the signed
state, a real 2-node cluster on this machine, a worker process reused after a scheduler stop, and
a worker's SIGTERM at shutdown printing nothing. The tiny data of :mod:`tests.test_launcher`."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from search import durable, local_server
from search import study as S
from tests.test_launcher import _env, optuna_trials, tiny_data, write_spec
from tests.tinydata import make_tiny_coco


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_data(tmp_path_factory)


# ---------------------------------------------------------------- Ctrl-C, then resume (subprocesses)


class _Payload:
    """A pickle that, when loaded, creates ``marker`` (what a crafted state file would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _signed_state_checks(exp_dir: Path, cmd: list[str], cwd: Path) -> None:
    """resume checks the signed snapshot of Ray's state before anything starts: a changed file in
    it, or another user's key, is exit 2 with the folder left as it was."""
    snap = durable.current_snapshot(exp_dir)
    assert snap is not None and (snap / "tuner.pkl").is_file() and (snap / durable.SIGNATURE).is_file()
    good = (snap / "tuner.pkl").read_bytes()
    (snap / "tuner.pkl").write_bytes(good + b"x")
    done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "differs from its signed sha256" in done.stderr, done.stderr[-2000:]
    (snap / "tuner.pkl").write_bytes(good)
    other = cwd / "other-user.key"
    other.write_bytes(os.urandom(32))
    other.chmod(0o600)
    env = {**_env(), durable.KEY_ENV: str(other)}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "does not match" in done.stderr, done.stderr[-2000:]
    assert S.read_study(exp_dir)["status"] == "interrupted"  # nothing ran


def _stop_after_first_epoch(cmd: list[str], cwd: Path, exp_dir: Path, sig: int, group: bool = False):
    """Run ``cmd`` until a trial of ``exp_dir`` has reported an epoch, then send it ``sig`` (with
    ``group``, to its process group, as ``timeout`` does); its (returncode, stdout, stderr)."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=group,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            state = S.read_study(exp_dir) if (exp_dir / S.STUDY_FILE).exists() else {}
            if any(t.get("epochs", 0) >= 1 for t in state.get("trials", {}).values()):
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the study ended before the first epoch was reported"
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


def test_sigint_then_resume(data_dir):
    path = write_spec(
        data_dir,
        "sigint",
        {"optimizer": {"choices": ["sgd", "adamw"]}, "lr": {"low": 1e-3, "high": 3e-2, "log": True}},
        # the default scheduler: its resume rebuilds its curves from study.json (restore_history);
        # ASHA's interrupted resume is test_select's
        {"algorithm": "tpe", "scheduler": "auto", "num_trials": 2, "max_concurrent": 1},
    )
    exp_dir = data_dir / "runs" / "sigint"
    cmd = [sys.executable, "-m", "search", "launch", str(path)]
    rc, out, err = _stop_after_first_epoch(cmd, data_dir, exp_dir, signal.SIGINT)
    assert rc == 130, err[-3000:]
    assert f"python -m search resume {exp_dir}" in out
    assert "Tuner.restore" not in out + err  # Ray's own hint would skip our checks and callbacks
    state = S.read_study(exp_dir)
    assert state["status"] == "interrupted"
    assert [t["state"] for t in state["trials"].values()] == [S.PAUSED]  # trial 2 not started yet

    cmd = [sys.executable, "-m", "search", "resume", "sigint", "--output-dir", str(data_dir / "runs")]
    _signed_state_checks(exp_dir, cmd, data_dir)
    marker = data_dir / "payload-ran"
    (exp_dir / "tuner.pkl").write_bytes(pickle.dumps(_Payload(marker)))  # a crafted pickle in the folder
    done = subprocess.run(cmd, cwd=data_dir, env=_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not marker.exists(), "resume unpickled a file it had not signed"
    state = S.read_study(exp_dir)
    assert state["status"] == "finished" and len(state["trials"]) == 2
    assert all(t["state"] in (S.COMPLETE, S.PRUNED) for t in state["trials"].values())
    assert [t.get("reference") for t in sorted(state["trials"].values(), key=lambda t: t["index"])] == [
        True,
        False,
    ]  # the reference trial ran first and is still known as such after the resume
    ot = optuna_trials(exp_dir, "sigint")
    assert len(ot) == 2 and all(t.state.name in ("COMPLETE", "PRUNED") for t in ot)
    assert sorted(t.user_attrs["ray_trial_id"] for t in ot) == sorted(state["trials"])


@pytest.mark.parametrize("group", [False, True], ids=["the-launch", "its-process-group"])
def test_sigterm_stops_as_one_ctrl_c_and_the_resume_command_keeps_keep_top(data_dir, group):
    """``kill``/``timeout``/a pod's deletion send SIGTERM: it stops the study gracefully (it was
    Ray's C++ dump and exit 1 or 134), and the printed resume command carries ``--keep-top``.
    ``timeout`` (systemd, Slurm) signals every process of the launch, Ray's GCS and raylet too:
    they block SIGTERM as Ray blocks SIGINT in them (the launch hung a minute, then exit 1)."""
    name = "sigterm-group" if group else "sigterm"
    path = write_spec(
        data_dir,
        name,
        {"optimizer": "sgd", "lr": {"low": 1e-3, "high": 3e-2, "log": True}},
        {"algorithm": "random", "scheduler": "none", "num_trials": 2, "max_concurrent": 1},
    )
    exp_dir = data_dir / "runs" / name
    cmd = [sys.executable, "-m", "search", "launch", str(path), "--keep-top", "1"]
    rc, out, err = _stop_after_first_epoch(cmd, data_dir, exp_dir, signal.SIGTERM, group)
    assert rc == 130, err[-3000:]
    assert "SIGTERM received" not in err, err[-3000:]
    assert f"Resume with:\n  python -m search resume {exp_dir} --keep-top 1\n" in out
    assert "--keep-top 1: nothing removed (interrupted; resume with --keep-top)" in out
    assert S.read_study(exp_dir)["status"] == "interrupted"


def test_a_resumed_study_has_the_rest_of_its_time_budget(data_dir):
    """Ray restored its saved stopper over the one resume passed, with the launch's deadline: after
    a stop longer than the budget, every trial stopped at its first report of the resume, the
    time budget not spent (an audit: 16.8 s of 40). The budget counts the study's running time."""
    budget = 30
    path = write_spec(
        data_dir,
        "budget-resumed",
        {"lr": {"choices": [0.01, 0.02]}},
        {"algorithm": "grid", "scheduler": "none", "num_trials": 2, "max_concurrent": 1, "time_budget": 30},
        epochs=3,
    )
    exp_dir = data_dir / "runs" / "budget-resumed"
    started = time.time()
    cmd = [sys.executable, "-m", "search", "launch", str(path)]
    rc, _, err = _stop_after_first_epoch(cmd, data_dir, exp_dir, signal.SIGTERM)
    assert rc == 130, err[-3000:]
    time.sleep(max(0.0, started + budget + 2 - time.time()))  # the launch's deadline has passed
    cmd = [sys.executable, "-m", "search", "resume", "budget-resumed", "--output-dir", str(data_dir / "runs")]
    done = subprocess.run(cmd, cwd=data_dir, env=_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    state = S.read_study(exp_dir)
    cut = [t for t in state["trials"].values() if t["state"] == S.PRUNED]  # no scheduler: the budget only
    assert all(t.get("stopped_by") == "time_budget" for t in cut), [t.get("stopped_by") for t in cut]
    # a trial is cut by the budget only once the study has run that long (on a slow machine it may)
    assert not cut or state["elapsed_s"] >= budget - 1, (state["elapsed_s"], [t["epochs"] for t in cut])
    assert state["budget_reached"] == bool(cut) and state["status"] == "finished"
    assert not cut or "(time budget reached)" in done.stdout


def test_sigterm_after_ray_started_and_before_the_run_is_a_ctrl_c(data_dir, tmp_path):
    """ray.init makes SIGTERM ``sys.exit(15)``: from Ray's start to the study's run (the header,
    the searcher, the Tuner) a SIGTERM to the launch's group ended it with exit 15 and Ray's C++
    dump, not the documented 130 (a crash-fuzz audit). The study is launched again after."""
    from trainables.testhooks import PAUSE_AT_ENV, PAUSE_DIR_ENV, PAUSED_FILE

    search = {"algorithm": "random", "num_trials": 1}
    cmd = [sys.executable, "-m", "search", "launch", str(write_spec(data_dir, "sigterm-early", {}, search))]
    env = {**_env(), PAUSE_AT_ENV: "launch_header", PAUSE_DIR_ENV: str(tmp_path)}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    proc = subprocess.Popen(cmd, cwd=data_dir, env=env, start_new_session=True, **pipes)
    try:
        deadline = time.time() + 180
        while not (tmp_path / PAUSED_FILE).is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert (tmp_path / PAUSED_FILE).is_file(), proc.communicate()[1][-3000:]
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "SIGTERM received" not in err, err[-3000:]
    assert err.rstrip().endswith("interrupted"), err[-3000:]
    again = subprocess.Popen(cmd, cwd=data_dir, env=_env(), start_new_session=True, **pipes)
    err = again.communicate(timeout=300)[1]
    assert again.returncode == 0, err[-3000:]
    # and it leaves no process behind: Ray's agents (raylet's children, SIGTERM blocked) outlived it 1-2 min
    time.sleep(1)
    left = [(p.parent.name, p.read_text().split(")")[0]) for p in _session_stats(again.pid)]
    assert not left, left


def _session_stats(sid: int) -> list[Path]:
    """The /proc stat files of the live processes of session ``sid`` (zombies aside)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(stat)
    return out


def test_sigterm_is_a_ctrl_c_even_when_sigint_is_ignored():
    """A background job of a script runs with SIGINT ignored: SIGTERM must still stop the study
    (it raised a SIGINT nobody heard), and the handlers are put back after."""
    from search.launcher import _sigterm_as_ctrl_c

    heard, before = [], (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    try:
        signal.signal(signal.SIGINT, lambda *_: heard.append("int"))
        with _sigterm_as_ctrl_c():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
        assert heard == ["int"]  # Tune's SIGINT handler is what a SIGTERM reaches
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with pytest.raises(KeyboardInterrupt), _sigterm_as_ctrl_c():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert signal.getsignal(signal.SIGTERM) is before[1]
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


# ---------------------------------------------------------------- a real 2-node cluster on this machine


@pytest.mark.slow
def test_two_node_cluster(data_dir, tmp_path):
    ray_bin = str(Path(sys.executable).with_name("ray"))
    port = local_server.free_port()
    temp = Path(f"/tmp/rt{os.getpid()}")  # short: Ray's unix socket paths must stay < 108 chars
    env = _env(SEARCH_NO_MLFLOW="1")
    common = ["--num-cpus", "1", "--block"]
    procs = []
    try:
        head = [
            ray_bin,
            "start",
            "--head",
            "--port",
            str(port),
            "--include-dashboard=false",
            "--temp-dir",
            str(temp),
            *common,
        ]
        procs.append(
            subprocess.Popen(
                head, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        )
        for _ in range(60):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(1)
        worker = [ray_bin, "start", "--address", f"127.0.0.1:{port}", *common]
        procs.append(
            subprocess.Popen(
                worker, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        )
        time.sleep(10)
        space = {"optimizer": "sgd", "lr": {"low": 1e-3, "high": 3e-2, "log": True}}
        path = write_spec(
            data_dir,
            "cluster",
            space,
            {"algorithm": "random", "scheduler": "none", "num_trials": 4},
            epochs=1,
        )
        proc = subprocess.run(
            [sys.executable, "-m", "search", "launch", str(path), "--address", f"127.0.0.1:{port}"],
            cwd=data_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        state = S.read_study(data_dir / "runs" / "cluster")
        assert "2 node(s) on 1 host(s)" in proc.stdout
        assert len(state["trials"]) == 4
        assert len({t["node_id"] for t in state["trials"].values()}) == 2  # trials ran on both nodes
    finally:
        for p in reversed(procs):  # SIGTERM to `ray start --block` stops the processes it started
            if p.poll() is None:
                p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def test_process_reused_after_a_scheduler_stop(ray_local, tmp_path):
    """reuse_actors=True: after the scheduler stops a trial, Tune gives its process to the next
    trial (reset: a new working directory, trial id and config); the next trial must run normally
    there, reading the base evaluation the first one stored. A scheduler stops the first trial at
    epoch 1 for sure; 1 trial at a time, so the process can only be reused."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    from search.launcher import _trainable
    from search.spec import load_spec

    class StopFirstAtEpoch1(FIFOScheduler):
        def __init__(self):
            super().__init__()
            self.first = None

        def on_trial_result(self, tune_controller, trial, result):
            self.first = self.first or trial.trial_id
            if trial.trial_id == self.first and result.get("epoch") == 1:
                return TrialScheduler.STOP
            return TrialScheduler.CONTINUE

    make_tiny_coco(tmp_path / "data", n_images=6, size=100)
    spec = load_spec(
        write_spec(tmp_path, "reuse", {"optimizer": "sgd", "lr": 0.01}, {"algorithm": "random"}, epochs=3)
    )
    exp_dir = tmp_path / "runs" / "reuse"
    exp_dir.mkdir(parents=True)
    tuner = tune.Tuner(
        _trainable(spec, exp_dir),
        param_space={"optimizer": "sgd", "lr": tune.grid_search([0.01, 0.02])},
        tune_config=tune.TuneConfig(
            scheduler=StopFirstAtEpoch1(),
            metric="map50",
            mode="max",
            max_concurrent_trials=1,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(name="reuse", storage_path=str(tmp_path / "runs")),
    )
    t0 = time.time()
    grid = tuner.fit()
    took = time.time() - t0
    results = sorted(grid, key=lambda r: r.config["lr"])
    assert grid.num_errors == 0, [r.error for r in results]
    first, second = results
    assert first.metrics["epoch"] == 1 and second.metrics["epoch"] == 3  # stopped, then a full trial
    assert first.metrics["pid"] == second.metrics["pid"]  # the second trial ran in the first's process
    assert first.metrics["trial_id"] != second.metrics["trial_id"]
    assert Path(first.path).name != Path(second.path).name
    rows = {
        r.config["lr"]: [json.loads(x) for x in (Path(r.path) / "result.json").read_text().splitlines()]
        for r in results
    }
    assert [r["epoch"] for r in rows[0.01]] == [0, 1] and [r["epoch"] for r in rows[0.02]] == [0, 1, 2, 3]
    assert rows[0.02][0]["map50"] == rows[0.01][0]["map50"] == rows[0.02][0]["base_metric"]
    assert len(list((exp_dir / S.BASE_EVAL_DIR).glob("*.json"))) == 1  # evaluated once, by the first
    print(f"two trials in one reused process: {took:.0f}s")


def test_a_workers_sigterm_in_a_gc_callback_prints_nothing(tmp_path):
    """Ray's SIGTERM handler raises SystemExit; landing in a weakref callback as ``ray.shutdown``
    stops idle workers, Python printed "Exception ignored ... SystemExit: 1" with a traceback after
    the launch's summary. The worker's hook drops exactly that; other unraisables still print."""
    code = (
        "import os, signal, sys, weakref\n"
        "from search.worker import _quiet_exit_in_callbacks\n"
        "sys.unraisablehook = _quiet_exit_in_callbacks\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # as Ray's worker handler\n"
        "class A: pass\n"
        "def on_sigterm(_ref): os.kill(os.getpid(), signal.SIGTERM)\n"
        "def on_error(_ref): raise ValueError('a real bug')\n"
        "a, b = A(), A()\n"
        "r1, r2 = weakref.ref(a, on_sigterm), weakref.ref(b, on_error)\n"
        "del a, b\n"
        "print('alive')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "alive", proc
    assert "SystemExit" not in proc.stderr, proc.stderr
    assert "ValueError: a real bug" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_a_study_folder_deleted_under_the_launch_stops_it_in_one_line(data_dir):
    """rm -rf of the study folder mid-launch: every later trial failed on Ray's storage, the study
    ended 'finished, all failed' after 500 lines and 8 tracebacks, and its folder, made again by Ray,
    passed for a study. The launch now stops at the next trial event and says what happened."""
    import shutil

    path = write_spec(
        data_dir,
        "removed",
        {"lr": {"low": 1e-3, "high": 3e-2, "log": True}},
        {"algorithm": "random", "scheduler": "none", "num_trials": 4, "max_concurrent": 1},
        epochs=3,
    )
    exp_dir = data_dir / "runs" / "removed"
    cmd = [sys.executable, "-m", "search", "launch", str(path)]
    proc = subprocess.Popen(
        cmd, cwd=data_dir, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            trials = (
                (S.read_study(exp_dir) or {}).get("trials", {}) if (exp_dir / S.STUDY_FILE).is_file() else {}
            )
            if any((t.get("epochs") or 0) >= 1 for t in trials.values()):
                break
            time.sleep(0.5)
        shutil.rmtree(exp_dir, ignore_errors=True)  # Ray writes in it meanwhile: what it made may stay
        (exp_dir / S.SPEC_FILE).unlink(missing_ok=True)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-3000:]
    assert f"error: the study folder {exp_dir} was removed while the study ran" in err, err[-3000:]
    assert err.rstrip().endswith("launch the spec again to start over."), err[-3000:]
    assert "finished" not in (out.strip().splitlines() or [""])[-1], out[-2000:]
