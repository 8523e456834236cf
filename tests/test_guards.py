"""Trust guards (issue 14, items 2, 5, 7 in part, 8 in part): secrets in tracking URIs, one writer
per study folder, YAML and values that would hurt (outputs over the inputs: test_guards_outputs)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from search import guards
from search import study as S
from search.errors import SpecError
from search.spec import load_spec
from tests.tinydata import make_tiny_coco, write_tiny_spec

ROOT = Path(__file__).resolve().parents[1]
DET = ROOT / "spaces/det.yaml"


def run(*args: str, cwd: Path = ROOT, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    return subprocess.run(
        [sys.executable, "-m", "search", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


# ---------------------------------------------------------------- secrets


@pytest.mark.parametrize(
    ("uri", "refused"),
    [
        ("http://bob:hunter2@mlflow.example.com/", True),
        ("https://bob:hunter2@mlflow.example.com:8443/x", True),
        ("postgresql://app:hunter2@db/mlflow", True),
        ("http://mlflow.example.com/?token=hunter2", True),
        ("https://b.s3.amazonaws.com/?X-Amz-Signature=hunter2&X-Amz-Expires=60", True),
        ("databricks://bob:hunter2@workspace", True),
        ("http://mlflow.example.com/?experiment=3&page=2", False),
        ("http://bob@mlflow.example.com/", False),  # a user name alone is not a secret
        ("http://mlflow.example.com:5000", False),
        ("sqlite:////tmp/x/mlflow.db", False),
    ],
)
def test_credentials_in_tracking_uri(uri, refused):
    if not refused:
        guards.check_uri_secrets(uri)
        return
    with pytest.raises(SpecError) as err:
        guards.check_uri_secrets(uri)
    line = str(err.value)
    assert err.value.key == "tracking.uri" and "hunter2" not in line
    assert ("MLFLOW_TRACKING_PASSWORD" in line) == uri.startswith("http")
    assert ("DATABRICKS_TOKEN" in line) == uri.startswith("databricks")
    assert ":8443" in line or ":8443" not in uri  # the server named with its port (it was dropped)


def test_launch_with_a_password_in_the_uri_exits_2_and_writes_nothing(tmp_path):
    make_tiny_coco(tmp_path / "data", n_images=4, size=64)
    spec = write_tiny_spec(tmp_path, "sec", space={"lr": 0.01}, search={"num_trials": 1}, epochs=1)
    done = run("launch", str(spec), "--set", "tracking.uri=http://u:s3cr3tPW@127.0.0.1:9/", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "s3cr3tPW" not in done.stdout + done.stderr and "MLFLOW_TRACKING_PASSWORD" in done.stderr
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- one writer per study


def test_study_lock_names_the_holder_and_goes_with_the_process(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from search.guards import StudyLock; StudyLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(guards.StudyLocked) as err:
            guards.StudyLock(tmp_path).acquire()
        assert f"pid {holder.pid}" in str(err.value)
    finally:
        holder.kill()
        holder.wait()
    killed = f"host {socket.gethostname()} pid {holder.pid}\n"
    assert (tmp_path / guards.LOCK_FILE).read_text() == killed and guards.lock_holder_alive(tmp_path) is False
    lock = guards.StudyLock(tmp_path).acquire()  # the holder died: the lock went with it
    assert f"pid {os.getpid()}" in (tmp_path / guards.LOCK_FILE).read_text()
    lock.release(restore=True)  # a resume refused before it took over: the killed holder is named again
    assert (tmp_path / guards.LOCK_FILE).read_text() == killed and guards.lock_holder_alive(tmp_path) is False
    guards.StudyLock(tmp_path).acquire().release()
    assert f"pid {os.getpid()}" in (tmp_path / guards.LOCK_FILE).read_text()


def test_second_launch_of_a_study_exits_2_naming_the_holder(tmp_path):
    make_tiny_coco(tmp_path / "data", n_images=4, size=64)
    spec = write_tiny_spec(tmp_path, "twice", space={"lr": 0.01}, search={"num_trials": 1}, epochs=1)
    exp = tmp_path / "runs" / "twice"
    lock = guards.StudyLock(exp).acquire()  # a first launch holding the folder
    try:
        done = run("launch", str(spec), cwd=tmp_path)
    finally:
        lock.release()
    assert done.returncode == 2, done.stderr
    assert "in use by another launch or resume" in done.stderr and f"pid {os.getpid()}" in done.stderr
    assert not (exp / "study.json").exists()


def test_a_held_or_unbegun_folder_says_what_to_do(tmp_path, monkeypatch):
    """A resume refused by the lock is not told to launch with --name; a launch into a running
    study is not told to resume it; a folder holding the lock alone is a launch starting or killed."""
    from search import study_folder
    from search.launcher import RUNNING_FIX

    exp = tmp_path / "runs" / "held"
    lock = guards.StudyLock(exp).acquire()
    try:
        with pytest.raises(guards.StudyLocked) as err:
            guards.StudyLock(exp, fix=RUNNING_FIX).acquire()  # another descriptor: refused as a process
        assert err.value.fix == RUNNING_FIX and "--name" not in str(err.value)
        with pytest.raises(S.StudyStarting, match="holds no study yet: its launch is starting"):
            S.resolve_experiment(exp)  # the lock alone, held: a launch between lock and spec.yaml
        # status polls it as starting, exit 0 (it was exit 2, "error: ... wait"); best still waits
        shown = run("status", str(exp), "--json", cwd=tmp_path)
        assert shown.returncode == 0 and json.loads(shown.stdout)["status"] == "starting", shown.stderr
        assert json.loads(shown.stdout)["trials"] == [] and json.loads(shown.stdout)["name"] == "held"
        assert json.loads(shown.stdout)["metric"] is None  # the keys of a study's object, not yet known
        shown = run("status", "held", cwd=tmp_path)
        assert shown.returncode == 0 and "study held (starting): no trials yet" in shown.stdout
        ranked = run("best", "held", cwd=tmp_path)
        assert ranked.returncode == 2 and "its launch is starting" in ranked.stderr, ranked.stderr
        (exp / S.SPEC_FILE).write_text("name: held\n")  # spec.yaml written, no study.json yet
        with pytest.raises(S.StudyStarting):
            S.status_object(exp)
        (exp / S.SPEC_FILE).unlink()
        (exp / S.STUDY_FILE).write_text("{}")
        with pytest.raises(study_folder.ExperimentExists, match="A launch or resume of it is running now"):
            study_folder.refuse_existing(exp)
        with pytest.raises(study_folder.ExperimentExists, match="Resume it with"):
            study_folder.refuse_existing(exp, ours=True)  # the launch's own check under its lock
    finally:
        lock.release()
    (exp / S.STUDY_FILE).unlink()
    with pytest.raises(S.ExperimentNotFound, match="holds no study: its launch stopped before"):
        S.resolve_experiment(exp)  # the lock alone, released: a launch killed before its spec.yaml
    (exp / S.SPEC_FILE).write_text("name: held\n")
    with pytest.raises(S.ExperimentNotFound, match="has no study.json .its launch stopped before") as err:
        S.status_object(exp)  # killed before its first study.json: not starting
    assert not isinstance(err.value, S.StudyStarting)


# ---------------------------------------------------------------- input that would hurt


def _spec_text(extra: str) -> str:
    return DET.read_text() + textwrap.dedent(extra)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("name: again\n", "name: is given twice, at line 3 and line "),  # YAML keeps the last silently
        ("extra:\n  a: 1\n  a: 2\n", "extra.a: is given twice"),  # named by its key path
        (
            "x0: &a [1,1,1,1,1,1,1,1,1,1]\n"
            + "".join(
                f"x{i + 1}: &a{i + 1} [" + ",".join([f"*{'a' if i == 0 else f'a{i}'}"] * 10) + "]\n"
                for i in range(7)
            ),
            "alias bomb",
        ),
        ("deep: " + "[" * 3000 + "]" * 3000 + "\n", "nested deeper"),
        ("huge: " + "9" * 5000 + "\n", "cannot be read"),
        ("huge: 0o" + "7" * 5000 + "\n", "cannot be read"),  # Python limits base 10 only
    ],
)
def test_yaml_that_would_hurt_is_refused_fast(tmp_path, text, words):
    """Refused with a short message naming the danger. The thread join is only a did-not-hang
    guard (an expanded alias bomb or a recursing parser would run for minutes), not a speed claim."""
    import threading

    path = tmp_path / "s.yaml"
    path.write_text(_spec_text("") + text)
    box: dict = {}

    def load() -> None:
        try:
            box["spec"] = load_spec(path)
        except SpecError as exc:
            box["error"] = exc

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=300)
    assert not worker.is_alive(), "load_spec did not return within 300 s"
    assert "spec" not in box, "the spec was accepted"
    err = box["error"]
    assert words in str(err) and len(str(err)) < 300 and "\n" not in str(err)


@pytest.mark.parametrize(
    ("sets", "key"),
    [
        (["search.seed=4294967296"], "search.seed"),
        (["train.seed=18446744073709551616"], "train.seed"),
        (["name=" + "a" * 101], "name"),
        (
            ["search.algorithm=grid", "space={lr: {choices: [0.1]}, step_epochs: {low: 1, high: 4}}"],
            "space.step_epochs",
        ),
        (
            [
                "search.algorithm=grid",
                "space={lr: {low: 0.0001, high: 1.0, step: 0.0001}, warmup_epochs: {choices: [0, 1]}}",
            ],
            "space",
        ),
    ],
)
def test_values_a_launch_cannot_use_are_refused(sets, key):
    with pytest.raises(SpecError) as err:
        load_spec(DET, sets)
    assert err.value.key == key


# ---------------------------------------------------------------- data that lies


def _tiny(tmp_path: Path, change) -> tuple[Path, Path]:
    images, ann = make_tiny_coco(tmp_path / "d", n_images=3, size=64)
    data = json.loads(ann.read_text())
    change(data, images)
    ann.write_text(json.dumps(data))
    return images, ann


def _rle_counts(data, images):
    a = data["annotations"][0]
    a["segmentation"] = {"size": [64, 64], "counts": [10, 20, 30]}  # sums to 60, not 4096


def _crowd_string(data, images):
    data["annotations"][0]["iscrowd"] = "0"


def _link_to_root(data, images):
    (images / "root").symlink_to("/")
    data["images"][0]["file_name"] = "root/etc/hostname"


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (_rle_counts, "summing to height x width = 4096"),
        (_crowd_string, "iscrowd must be 0 or 1"),
        (_link_to_root, "outside the image root"),
    ],
)
def test_data_that_lies_is_refused(tmp_path, change, words):
    from trainables.coco import DatasetError, load_coco

    images, ann = _tiny(tmp_path, change)
    with pytest.raises(DatasetError, match=words):
        load_coco(ann, images)


def test_pixel_cap_below_pil_is_settable(tmp_path, monkeypatch):
    from trainables import coco, data

    images, ann = make_tiny_coco(tmp_path / "d", n_images=2, size=64)
    assert coco.max_pixels() == 40_000_000 < __import__("PIL.Image").Image.MAX_IMAGE_PIXELS
    monkeypatch.setenv(coco.MAX_PIXELS_ENV, "1000")  # 64 x 64 = 4096 pixels: too many now
    with pytest.raises(coco.DatasetError, match="exceeds the limit of 1,000"):
        coco.load_coco(ann, images)
    with pytest.raises(coco.DatasetError, match="exceeds the limit"):
        data.read_image(next(images.glob("*.png")))  # the header is checked before decoding
    monkeypatch.setenv(coco.MAX_PIXELS_ENV, "5000")
    assert coco.load_coco(ann, images).num_classes >= 1


@pytest.mark.slow
def test_no_secret_is_written_anywhere(tmp_path):
    """A real MLflow server; the credentials go where they are accepted (the environment: the URI
    refuses them); afterwards no byte written by the study (experiment folder, the server's store
    and artifacts, stdout, stderr) holds them."""
    from search import local_server
    from tests.mlflow_server import start_server, stop_server

    port = local_server.free_port()
    secret_pw, secret_token = "pw-Zq81xY7c", "tok-Hh3kP0aa"
    server = start_server(port, tmp_path / "srv", timeout=120)
    try:
        make_tiny_coco(tmp_path / "data", n_images=4, size=64)
        spec = write_tiny_spec(
            tmp_path,
            "secret",
            space={"lr": {"low": 0.001, "high": 0.01, "log": True}},
            search={"num_trials": 2, "max_concurrent": 2},
            epochs=1,
            tracking={"uri": f"http://127.0.0.1:{port}"},
        )
        env = dict(
            os.environ,
            RAY_AUTH_MODE="disabled",
            MLFLOW_TRACKING_USERNAME="alice",
            MLFLOW_TRACKING_PASSWORD=secret_pw,
            MLFLOW_TRACKING_TOKEN=secret_token,
        )
        done = subprocess.run(
            [sys.executable, "-m", "search", "launch", str(spec)],
            cwd=tmp_path,
            capture_output=True,
            timeout=600,
            env=env,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        ui = subprocess.run(  # a server's study: the page of its runs there (it printed the root)
            [sys.executable, "-m", "search", "ui", "secret", "--output-dir", "runs"],
            cwd=tmp_path,
            capture_output=True,
            timeout=120,
            env=env,
        )
        assert ui.returncode == 0, ui.stderr[-2000:]
        page = ui.stdout.decode().strip()
        assert re.fullmatch(rf"http://127\.0\.0\.1:{port}/#/experiments/[0-9]+/runs", page), page
    finally:
        stop_server(server)
    written = [done.stdout, done.stderr, ui.stdout, ui.stderr]
    for root in (tmp_path / "runs", tmp_path / "srv"):
        written += [p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    assert len(written) > 20  # the study, its checkpoints, the server's store and artifacts
    for blob in written:
        assert secret_pw.encode() not in blob and secret_token.encode() not in blob


@pytest.mark.parametrize("answer", [b"HTTP/1.1 400 Bad Request\r\n\r\n", None])
def test_an_address_that_is_not_ray_fails_fast(tmp_path, answer):
    """A TCP server of another protocol (or a silent one) at --address: exit 2 naming the address,
    after one probe connection (the probe's own timeout ends the silent case; before: ray.init
    waited on it for minutes), nothing created."""
    import socket
    import threading

    make_tiny_coco(tmp_path / "data", n_images=4, size=64)
    spec = write_tiny_spec(tmp_path, "notray", space={"lr": 0.01}, search={"num_trials": 1}, epochs=1)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    accepted = []

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            accepted.append(conn)
            if answer is not None:
                conn.recv(100)
                conn.sendall(answer)
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        done = run("launch", str(spec), "--address", f"127.0.0.1:{port}", cwd=tmp_path, timeout=120)
    finally:
        srv.close()
    assert done.returncode == 2, done.stderr
    assert f"127.0.0.1:{port}" in done.stderr and "not a Ray head node" in done.stderr
    assert len(accepted) == 1  # one probe, no ray.init retrying against it
    assert not (tmp_path / "runs").exists()


def test_resume_refuses_a_folder_others_can_write(tmp_path):
    """resume unpickles Ray's state: a study folder (or a pickle in it) writable by the group or
    others is refused before anything is read, unless --trust-folder."""
    exp = tmp_path / "shared"
    exp.mkdir(mode=0o755)
    (exp / "spec.yaml").write_text("name: x\n")
    (exp / "tuner.pkl").write_bytes(b"not read")
    os.chmod(exp / "tuner.pkl", 0o644)
    guards.check_folder_trust(exp)  # yours, not writable by others: fine
    os.chmod(exp / "tuner.pkl", 0o666)
    with pytest.raises(SpecError, match="tuner.pkl.*writable by others"):
        guards.check_folder_trust(exp)
    os.chmod(exp / "tuner.pkl", 0o644)
    os.chmod(exp, 0o775)
    with pytest.raises(SpecError, match="writable by its group"):
        guards.check_folder_trust(exp)
    os.chmod(exp, 0o755)
    (exp / "trial_a").mkdir(mode=0o777)  # Ray writes (and reads back) pickles in a trial's folder
    os.chmod(exp / "trial_a", 0o777)
    with pytest.raises(SpecError, match="trial_a.*writable by others"):
        guards.check_folder_trust(exp)
    os.chmod(exp, 0o775)
    done = run("resume", str(exp))
    assert done.returncode == 2 and "--trust-folder" in done.stderr
    done = run("resume", str(exp), "--trust-folder")  # the check is skipped; Ray's own reading fails later
    assert "--trust-folder" not in done.stderr


@pytest.mark.parametrize(
    ("device", "gpu", "refused"),
    [
        ("cuda", 0, "sees 0 GPU(s) under Ray"),  # Ray hides every GPU from a trial that reserves none
        ("cuda:1", 1, "sees 1 GPU(s) under Ray"),  # a trial's GPUs are numbered from 0
        ("cuda:0", 0.5, None),
        ("cuda:1", 2, None),
        ("auto", 0, None),
        ("cpu", 0, None),
    ],
)
def test_a_device_no_trial_will_see_is_refused(device, gpu, refused):
    """A study's spec (validate, launch, resume, dry run) is checked against the GPUs Ray gives a
    trial; ``trial``, which runs without Ray, only against this machine's."""
    sets = [f"train.device={device}", f"resources.gpu={gpu}"]
    if refused is None:
        load_spec(DET, sets)
    else:
        with pytest.raises(SpecError) as err:
            load_spec(DET, sets)
        assert refused in str(err.value) and err.value.key == "train.device"
    load_spec(DET, sets, study=False)  # a single trial: Ray does not hide this machine's GPUs


def test_validate_and_trial_refuse_a_device_that_is_not_there(tmp_path):
    done = run("validate", str(DET), "--quick", "--set", "train.device=cuda")
    assert done.returncode == 2 and "train.device" in done.stderr and "resources.gpu" in done.stderr
    done = run("trial", str(DET), "--set", "train.device=cuda:999", "--out", str(tmp_path / "t"))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "CUDA device(s) on this machine" in lines[0]
    assert not (tmp_path / "t").exists()


def test_an_unreachable_address_is_named_without_its_password():
    import socket

    from search.cluster import ClusterError, check_reachable

    with socket.socket() as s:  # a free port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for address in (f"bob:hunter2@127.0.0.1:{port}", f"ray://bob:hunter2@127.0.0.1:{port}"):
        with pytest.raises(ClusterError) as err:  # unreachable; a Ray Client address (refused)
            check_reachable(address, timeout=2)
        assert "hunter2" not in str(err.value) and f"127.0.0.1:{port}" in str(err.value)
