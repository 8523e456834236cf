"""`python -m search` status / best / promote / export / predict / ui as real processes.

One tiny study (``tests/cli_study.py``: ssdlite320, random init, 4 images of 64 px, 2 trials of 1
epoch, recorded in the default SQLite MLflow store) is launched once per session through the CLI;
every command then runs against it in its own process: exit codes, the human output, the
``--json`` shape, and one bad input each (exit 2, one line on stderr naming the problem).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from search import local_server
from search import study as S
from search.guards import StudyLock
from tests.cli_study import NAME, ok_json, one_error_line, search
from tests.cli_study import cli_env as _env
from tests.tinydata import edited_study_copy

MODEL = "tiny-det"


@pytest.fixture
def study(cli_study):
    """The tiny study shared by the command tests (``tests/cli_study.py``)."""
    return cli_study


@pytest.fixture
def bundle(cli_bundle):
    return cli_bundle


# ---------------------------------------------------------------- status


def test_status_human_and_json(study):
    proc = search("status", NAME, *study["where"], cwd=study["root"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"study {NAME} (finished): ") and "objective map50 (max)" in lines[0]
    assert lines[1].split()[:5] == ["trial", "state", "epochs", "best", "disk"]
    obj = ok_json(search("status", NAME, *study["where"], "--json", cwd=study["root"]))
    assert {"name", "status", "metric", "mode", "trials", "best", "base_metric", "updated"} <= set(obj)
    assert obj["name"] == NAME and obj["status"] == "finished" and len(obj["trials"]) == 2
    for t in obj["trials"]:
        assert t["id"] in proc.stdout and t["state"] in ("COMPLETE", "PRUNED"), t
    assert f"best: {obj['best']['id']} map50=" in proc.stdout
    # the experiment folder's path works as NAME too
    assert ok_json(search("status", str(study["exp_dir"]), "--json", cwd=study["root"]))["name"] == NAME


def test_status_of_an_unknown_study_is_bad_input(study):
    one_error_line(search("status", "no-such-study", *study["where"], cwd=study["root"]), "no-such-study")


# ---------------------------------------------------------------- best


def test_best_human_and_json(study):
    ranked = ok_json(search("best", NAME, *study["where"], "--json", cwd=study["root"]))
    assert [t["id"] for t in ranked] == sorted(
        (t["id"] for t in ranked), key=lambda i: -next(r["best_metric"] for r in ranked if r["id"] == i)
    )
    assert len(ranked) == 2
    for t in ranked:  # the documented fields: params, epoch, checkpoint, run id, improvement
        assert {"id", "params", "epoch", "checkpoint", "run_id", "improvement", "best_metric"} <= set(t)
        assert t["epoch"] == 1 and t["params"]["optimizer"] == "sgd" and len(t["run_id"]) == 32
        assert t["improvement"] == pytest.approx(t["best_metric"] - t["study_base_metric"])
    top = ok_json(search("best", NAME, *study["where"], "--top", "1", "--json", cwd=study["root"]))
    assert [t["id"] for t in top] == [ranked[0]["id"]]
    proc = search("best", NAME, *study["where"], cwd=study["root"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"study {NAME}: 2 ranked trial(s) by best map50 (max); base model")
    assert lines[2].split()[:2] == ["1", ranked[0]["id"]] and ranked[0]["run_id"] in lines[2]
    assert f"checkpoint {ranked[0]['checkpoint']}" in proc.stdout
    # the reference trial (the recipe, lr clipped into the space) says so under its row, as in status
    (ref,) = [t for t in ranked if t["reference"]]
    row = next(i for i, ln in enumerate(lines) if ln.split()[1:2] == [ref["id"]])
    assert lines[row + 3].strip() == (
        "reference trial (the architecture's torchvision recipe, lr scaled to the batch by the linear rule)"
    )
    assert proc.stdout.count("reference trial (the architecture's") == 1


def test_best_says_why_a_trial_stopped(study, tmp_path):
    """A stopped trial's row in ``best`` carries the same words as in ``status`` (study.json as the
    launcher writes it, one trial marked stopped by the halving rule)."""
    tid, t = sorted(S.read_study(study["exp_dir"])["trials"].items())[0]
    value = t["history"][-1]["map50"]
    t["state"] = S.PRUNED
    t["stopped"] = {"epoch": 1, "value": value, "cut": 0.75, "group": "optimizer=sgd", "rule": "halving"}
    edited_study_copy(
        study["exp_dir"], tmp_path / "runs" / NAME, lambda state: state["trials"].update({tid: t})
    )
    where = ["--output-dir", str(tmp_path / "runs")]
    words = S.stop_text(t["stopped"], "map50")
    assert words.startswith(f"stopped at epoch 1 with map50 {S.fmt(value)}: below the rung's cut 0.75")
    status = search("status", NAME, *where, cwd=tmp_path)
    best = search("best", NAME, *where, cwd=tmp_path)
    for proc in (status, best):
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count(words) == 1, proc.stdout
    lines = best.stdout.splitlines()
    row = next(i for i, ln in enumerate(lines) if ln.split()[1:2] == [tid])
    assert words in "\n".join(lines[row : row + 5]) and lines[row].split()[2] == S.PRUNED


def test_status_of_a_study_whose_process_is_gone(study, tmp_path):
    """study.json says running but the process its lock file names has ended (killed): status
    says interrupted, and that the process is gone (it said "running" for ever); and running while
    a resume holds the lock of an interrupted study (before Ray's run marks it running)."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    exp_dir = edited_study_copy(
        study["exp_dir"], tmp_path / "runs" / NAME, lambda state: state.update(status="running")
    )
    (exp_dir / ".search.lock").write_text(f"host {socket.gethostname()} pid {int(gone.stdout)}\n")
    where = ["--output-dir", str(tmp_path / "runs")]
    obj = ok_json(search("status", NAME, *where, "--json", cwd=tmp_path))
    assert obj["status"] == "interrupted" and obj["process_gone"] is True
    text = search("status", NAME, *where, cwd=tmp_path).stdout.splitlines()[0]
    assert text.startswith(f"study {NAME} (interrupted; its launch or resume process is gone"), text
    (exp_dir / ".search.lock").write_text(f"host {socket.gethostname()} pid {os.getpid()}\n")  # alive
    assert ok_json(search("status", NAME, *where, "--json", cwd=tmp_path))["status"] == "running"
    S.write_study(exp_dir, S.read_study(exp_dir) | {"status": "interrupted"})
    assert ok_json(search("status", NAME, *where, "--json", cwd=tmp_path))["status"] == "interrupted"
    lock = StudyLock(exp_dir).acquire()  # a resume, seconds before Ray's run starts
    try:  # running for another process; the holder's own summary (launcher.summarize) as written
        assert ok_json(search("status", NAME, *where, "--json", cwd=tmp_path))["status"] == "running"
        assert S.status_object(exp_dir)["status"] == "interrupted"
        S.write_study(exp_dir, S.read_study(exp_dir) | {"status": "finished"})  # a finished one's resume
        assert ok_json(search("status", NAME, *where, "--json", cwd=tmp_path))["status"] == "running"
    finally:
        lock.release()


def test_best_top_zero_is_bad_input(study):
    one_error_line(search("best", NAME, *study["where"], "--top", "0", cwd=study["root"]), "--top", "0")


# ---------------------------------------------------------------- promote


@pytest.mark.slow  # a registration in a fresh process: about 25 s here
def test_promote_registers_the_best_trial_in_the_registry(study):
    from mlflow import MlflowClient

    out = ok_json(
        search("promote", NAME, *study["where"], "--model", MODEL, "--force", "--json", cwd=study["root"])
    )
    keys = {"model", "version", "alias", "uri", "source", "trial", "run_id", "metric", "value", "forced"}
    assert keys <= set(out) and out["uri"] == f"models:/{MODEL}@champion"
    ranked = ok_json(search("best", NAME, *study["where"], "--json", cwd=study["root"]))
    assert out["trial"] == ranked[0]["id"] and out["run_id"] == ranked[0]["run_id"]
    uri = f"sqlite:///{(study['runs'] / 'mlflow.db').resolve()}"
    version = MlflowClient(uri, registry_uri=uri).get_model_version_by_alias(MODEL, "champion")
    assert int(version.version) == out["version"] and version.run_id == out["run_id"]


@pytest.mark.slow  # a second registration (25-35 s here): the human form
def test_promote_human_output_names_the_new_version(study):
    proc = search(
        "promote",
        NAME,
        *study["where"],
        "--model",
        f"{MODEL}-h",
        "--alias",
        "next",
        "--force",
        cwd=study["root"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = proc.stdout.splitlines()[0]
    assert first.startswith(f"registered {MODEL}-h version 1 as models:/{MODEL}-h@next"), first
    assert f"fine-tune from it with  model.weights: models:/{MODEL}-h@next" in proc.stdout


def test_promote_of_an_unknown_trial_is_bad_input(study):
    proc = search("promote", NAME, *study["where"], "--model", MODEL, "--trial", "nosuch", cwd=study["root"])
    one_error_line(proc, "nosuch")


@pytest.mark.parametrize(
    "given, words",
    [
        ({"--alias": "v1"}, ["--alias", "'v1'", "reserved"]),
        ({"--alias": "bad alias!"}, ["--alias", "letters, digits"]),
        ({"--model": "bad/name"}, ["--model", "'bad/name'", "'/'"]),
    ],
    ids=["reserved-alias", "alias-characters", "model-slash"],
)
def test_promote_with_a_name_mlflow_refuses_is_bad_input_and_registers_nothing(study, given, words):
    from mlflow import MlflowClient

    args = {"--model": f"{MODEL}-bad", "--alias": "champion", **given}
    flags = [part for pair in args.items() for part in pair]
    proc = search("promote", NAME, *study["where"], *flags, "--force", cwd=study["root"])
    one_error_line(proc, *words)
    uri = f"sqlite:///{(study['runs'] / 'mlflow.db').resolve()}"
    names = {m.name for m in MlflowClient(uri, registry_uri=uri).search_registered_models()}
    assert args["--model"] not in names  # it once registered the version, then failed on the alias


# ---------------------------------------------------------------- export


def test_export_json_bundle(study, bundle):
    out, meta = bundle
    assert {"arch", "task", "num_classes", "files", "torchscript", "checkpoint", "study"} <= set(meta)
    assert meta["arch"] == "ssdlite320_mobilenet_v3_large" and meta["task"] == "detection"
    assert meta["num_classes"] == 3 and meta["torchscript"].get("ok") is True, meta["torchscript"]
    assert (
        meta["study"]["trial"] == ok_json(search("best", NAME, *study["where"], "--json", cwd=out))[0]["id"]
    )
    names = {p.name for p in out.iterdir()}
    assert {"model.yaml", "load.py", "SHA256SUMS"} <= names and set(meta["files"]) <= names
    record, metric = meta["study"], meta["study"]["metric"]
    assert metric not in record and f"base_{metric}" not in record  # not the MLflow tags' strings
    assert all(isinstance(record[k], (int, float)) for k in ("best_metric", "base_metric", "best_epoch"))
    params = meta["params"]  # what acted on this detector: no segmentation loss, no other optimizer's
    other = {"sgd": "beta1", "adamw": "momentum"}[params["optimizer"]]
    assert "loss.seg" not in params and other not in params and "lr" in params
    assert "loss.focal_gamma" not in params  # SSDlite's own loss (loss.cls default) is cross-entropy


def test_export_human_without_torchscript(study):
    out = study["root"] / "bundle-eager"
    proc = search("export", NAME, *study["where"], "--out", str(out), "--no-torchscript", cwd=study["root"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = proc.stdout.splitlines()[0]
    assert first.startswith(f"bundle {out}: ssdlite320_mobilenet_v3_large (detection, 2 classes) from trial ")
    assert "torchscript: " in proc.stdout and "ok (matches the eager model)" not in proc.stdout
    assert (out / "model.yaml").is_file() and (out / "SHA256SUMS").is_file()
    assert f"  files: {', '.join(sorted(p.name for p in out.iterdir()))}" in proc.stdout.splitlines()


def test_export_over_the_inputs_is_bad_input(study):
    data = study["root"] / "data"
    before = sorted(p.name for p in data.iterdir())
    proc = search("export", NAME, *study["where"], "--out", str(data), "--no-torchscript", cwd=study["root"])
    one_error_line(proc, "--out")
    assert sorted(p.name for p in data.iterdir()) == before  # nothing written into the data


def test_export_encrypted_bundle_needs_its_key(study, bundle):
    """export --encrypt: AES-GCM weights, no TorchScript, the secret in no file; predict and the
    bundle's load.py work with the key's variable only; a missing or wrong key is exit 2."""
    plain_out, _ = bundle
    out, root, where = study["root"] / "bundle-enc", study["root"], study["where"]
    secret = "correct horse battery staple"
    export = ("export", NAME, *where, "--out", str(out), "--encrypt")
    one_error_line(search(*export, cwd=root), "--encrypt", "--key-env")
    one_error_line(search(*export, "--key-env", "BUNDLE_KEY", cwd=root, BUNDLE_KEY="short"), "BUNDLE_KEY")
    assert not out.exists()
    meta = ok_json(search(*export, "--key-env", "BUNDLE_KEY", "--json", cwd=root, BUNDLE_KEY=secret))
    assert meta["weights_file"] == "weights.pt.enc" and meta["encryption"]["cipher"] == "AES-256-GCM"
    assert meta["encryption"]["key_env"] == "BUNDLE_KEY" and meta["torchscript"]["ok"] is False
    names = {p.name for p in out.iterdir()}
    assert "weights.pt.enc" in names and not names & {"weights.pt", "model.torchscript.pt"}
    assert all(secret.encode() not in p.read_bytes() for p in out.iterdir())
    image = str(study["images"][0])
    predict = ("predict", str(out), image, "--min-score", "0", "--json")
    keyed = ("--key-env", "X", "--json")
    plain_run = search("predict", str(plain_out), image, "--min-score", "0", *keyed, cwd=root)
    plain = ok_json(plain_run)  # a key for a plain bundle: said (it was taken without a word)
    assert f"note: --key-env X: {plain_out} is not encrypted (the key is not used)" in plain_run.stderr
    decrypted = ok_json(search(*predict, cwd=root, BUNDLE_KEY=secret))
    assert decrypted["images"][0]["detections"] == plain["images"][0]["detections"]
    assert ok_json(search(*predict, "--key-env", "OTHER", cwd=root, OTHER=secret))["images"]
    one_error_line(search(*predict, cwd=root), "encrypted", "BUNDLE_KEY")
    wrong = search(*predict, cwd=root, BUNDLE_KEY="a wrong secret, long enough")
    one_error_line(wrong, "BUNDLE_KEY", "wrong key")
    code = "from load import load_bundle; model, meta = load_bundle('.'); print(meta['encryption']['cipher'])"
    env = {**_env(), "BUNDLE_KEY": secret}
    done = subprocess.run([sys.executable, "-c", code], cwd=out, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "AES-256-GCM", done.stderr[-2000:]


# ---------------------------------------------------------------- predict


def test_predict_json_and_written_files(study, bundle):
    out, _ = bundle
    images = [str(p) for p in study["images"][:2]]
    pred = ok_json(search("predict", str(out), *images, "--min-score", "0", "--json", cwd=study["root"]))
    assert {"arch", "task", "images", "min_score"} <= set(pred) and pred["min_score"] == 0
    assert [Path(e["image"]).name for e in pred["images"]] == [Path(p).name for p in images]
    for entry in pred["images"]:
        assert entry["width"] == entry["height"] == 64 and isinstance(entry["detections"], list)
        for d in entry["detections"]:
            assert len(d["box"]) == 4 and 0.0 <= d["score"] <= 1.0
    dest = study["root"] / "pred"
    proc = search("predict", str(out), *images, "--out", str(dest), cwd=study["root"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        proc.stdout.splitlines()[0] == "ssdlite320_mobilenet_v3_large (detection), 2 image(s), min score 0.3"
    )
    assert f"written to {dest}: predictions.json" in proc.stdout
    written = json.loads((dest / "predictions.json").read_text())
    assert len(written["images"]) == 2
    (dest / "mine.txt").write_text("kept")  # the user's file in an earlier predict's folder
    proc = search("predict", str(out), images[0], "--out", "pred", "--min-score", "0", cwd=study["root"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((dest / "predictions.json").read_text())
    assert all(Path(e["annotated"]).is_absolute() for e in again["images"])  # were relative to the cwd
    listed = {Path(e["annotated"]).name for e in again["images"]}
    assert len(again["images"]) == 1 and {p.name for p in dest.glob("*.png")} == listed  # no stale image
    assert (dest / "mine.txt").read_text() == "kept"


def test_predict_min_score_out_of_range_is_bad_input(study, bundle):
    out, _ = bundle
    proc = search("predict", str(out), str(study["images"][0]), "--min-score", "2", cwd=study["root"])
    one_error_line(proc, "--min-score", "2")


@pytest.mark.parametrize(
    "case, words",
    [
        ("not-an-image", ["notes.txt", "not an image"]),
        ("device", ["--device", "'tpu'", "cpu"]),
        ("cuda-index", ["--device", "'cuda:99'", "CUDA device(s) here", "cpu"]),
        ("out-holds-other-files", ["--out", "not an earlier predict's"]),
        ("folder", ["IMAGE", "a folder, not an image file", "Fix:"]),
        ("missing", ["IMAGE", "not found", "gone.png", "Fix: check the paths"]),
        ("device", ["--device", "'tpu'", "Fix: use cpu"]),
    ],
    ids=["not-an-image", "device", "cuda-index", "out-holds-other-files", "folder", "missing", "device-fix"],
)
def test_predict_bad_image_or_device_is_bad_input(study, bundle, tmp_path, case, words):
    """A file that is no image, a device torch does not know (they were exit 1 with PIL's and
    torch's own exceptions), an --out folder of other files: one line, exit 2, nothing written."""
    out, _ = bundle
    text = tmp_path / "notes.txt"
    text.write_text("not a picture\n")
    args = {
        "not-an-image": [str(text)],
        "device": [str(study["images"][0]), "--device", "tpu"],
        "cuda-index": [str(study["images"][0]), "--device", "cuda:99"],
        "out-holds-other-files": [str(study["images"][0])],
        "folder": [str(study["images"][0].parent)],
        "missing": [str(tmp_path / "gone.png")],
    }[case]
    dest = tmp_path if case == "out-holds-other-files" else tmp_path / "pred"  # tmp_path has notes.txt
    proc = search("predict", str(out), *args, "--out", str(dest), cwd=study["root"])
    one_error_line(proc, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no pred/, notes.txt alone


# ---------------------------------------------------------------- ui


def test_ui_port_in_use_is_bad_input(study):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = search("ui", NAME, *study["where"], "--port", str(port), cwd=study["root"])
    one_error_line(proc, f"port {port}", "in use")
    port = local_server.free_port()  # free, but another `search ui` is starting its server on it
    claim = local_server.claim_port(port)
    try:
        assert claim is not None and local_server.claim_port(port) is None  # the lock is per process
        proc = search("ui", NAME, *study["where"], "--port", str(port), cwd=study["root"])
    finally:
        os.close(claim)
    one_error_line(proc, f"port {port}", "in use")


def test_ui_port_left_in_time_wait_is_free():
    """A connection of an earlier UI that the server closed first (TIME_WAIT) holds the port
    for a minute; `ui --port` on it again must start, as the MLflow server binds with SO_REUSEADDR."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            conn, _ = server.accept()
            conn.close()  # the server closes first: its side goes to TIME_WAIT
            assert client.recv(1) == b""
        assert not local_server.port_free(port)  # still listening
    with socket.socket() as plain:  # the state this test is about: a plain bind is refused
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
    assert local_server.port_free(port)


def _ps(*args: str) -> str:
    return subprocess.run(["ps", *args], capture_output=True, text=True, check=True).stdout


@pytest.mark.slow  # an MLflow server starts in 10-40 s on a busy 2-core box
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP])  # kill; a closed terminal
def test_ui_serves_the_study_and_stops_on_sigterm(study, stop):
    """SIGHUP (its terminal closed) killed ui and left its server running."""
    port = local_server.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "search", "ui", NAME, *study["where"], "--port", str(port)],
        cwd=study["root"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),  # as at a terminal, not nohup's
    )
    try:
        url = proc.stdout.readline().strip()  # printed once /health answered 200
        assert url.startswith(f"http://127.0.0.1:{port}/#/experiments/"), (url, proc.stderr.read()[-2000:])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as resp:
            assert resp.status == 200
        server = _ps("--ppid", str(proc.pid), "-o", "pid=").split()[0]  # `mlflow server`, a session leader
        session = _ps("-s", server, "-o", "args=")
        assert "uvicorn" in session and "huey" not in session  # no job runner for a UI
        proc.send_signal(stop)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    with socket.socket() as s:  # the server went with it: nothing listens on the port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT connection is no server
        s.bind(("127.0.0.1", port))
        s.listen(1)


def test_semantic_predictions_print_pixels_and_no_min_score(capsys):
    from search.commands_tracking import _print_predictions

    image = {"image": "a.png", "width": 2, "height": 2, "pixels": {"background": 1, "nucleus": 3}}
    out = {
        "arch": "lraspp_mobilenet_v3_large",
        "task": "semantic_segmentation",
        "min_score": 0.3,
        "images": [image],
    }
    _print_predictions(out, None)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "lraspp_mobilenet_v3_large (semantic_segmentation), 1 image(s)"
    assert [line.split() for line in lines[3:5]] == [
        ["background", "1", "px", "25.0", "%"],
        ["nucleus", "3", "px", "75.0", "%"],
    ]


def test_resume_json_is_one_object(study):
    """``resume --json`` of the finished study: stdout parses as one JSON object, the same study."""
    proc = search("resume", NAME, *study["where"], "--json", cwd=study["root"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads(proc.stdout)
    assert again["name"] == NAME and again["best"]["id"] == study["summary"]["best"]["id"]
    assert "resuming study" in proc.stderr


def test_a_study_without_any_result_ends_with_one_error_line(capsys):
    """Every trial failed: exit 1 had only the summary's "no trial produced a result." on stdout,
    not the one stderr line README gives a runtime failure."""
    from search.cli import _finish

    assert _finish({"best": None, "counts": {"FAILED": 2}, "interrupted": False}, as_json=False) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: no trial produced a result (2 trials: 2 failed)"], err
    assert _finish({"best": {"id": "a"}, "counts": {"COMPLETE": 1}}, as_json=False) == 0
    assert not capsys.readouterr().err


def test_status_of_a_study_that_ended_without_a_result_expects_none(tmp_path, capsys):
    """'best: none yet' under a finished study whose every trial failed: none is coming."""
    from search.cli import main

    folder = tmp_path / "runs" / "s"
    folder.mkdir(parents=True)
    (folder / S.SPEC_FILE).write_text("name: s\n")
    state = S.new_study("s", "map50", "max") | {"trials": {"t1": {"id": "t1", "state": S.FAILED}}}
    for status, said in (
        ("running", "best: none yet"),
        ("finished", "best: none (no trial produced a result)"),
    ):
        S.write_study(folder, state | {"status": status})
        assert main(["status", str(folder)]) == 0
        assert said in capsys.readouterr().out.splitlines()
