"""CLI commands on a study's results: ``best``, ``promote``, ``export``, ``predict``, ``ui``.

:data:`COMMANDS` is their table, which ``search/cli.py`` registers on its parser; exit codes follow
``search.cli``: 0 ok, 2 bad input (``BadInput``/``SpecError``), 1 runtime failure or a refused
promotion, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from search import study as S
from search.commands import Command, add_name_args, user_path
from search.errors import BadInput

UI_START_TIMEOUT_S = 180.0


def _bad_input(exc: Exception) -> Exception:
    return BadInput(str(exc))


def _best_args(p: argparse.ArgumentParser) -> None:
    add_name_args(p)
    p.add_argument("--top", type=int, default=None, metavar="K", help="only the best K trials")
    p.add_argument("--json", action="store_true", help="print a JSON list of trial objects")


def _promote_args(p: argparse.ArgumentParser) -> None:
    add_name_args(p)
    p.add_argument("--model", required=True, help="registered model name")
    p.add_argument("--alias", default="champion", help="alias to point at the new version (default champion)")
    p.add_argument("--trial", default=None, metavar="ID", help="trial id (default: the best trial)")
    p.add_argument("--force", action="store_true", help="register even if it does not beat the base model")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _export_args(p: argparse.ArgumentParser) -> None:
    add_name_args(p)
    p.add_argument("--out", type=user_path, required=True, help="bundle folder (must not exist or be empty)")
    p.add_argument("--trial", default=None, metavar="ID", help="trial id (default: the best trial)")
    p.add_argument("--no-torchscript", action="store_true", help="skip the TorchScript export")
    p.add_argument(
        "--encrypt",
        action="store_true",
        help="encrypt the weights (AES-256-GCM) under the secret in the variable named by --key-env",
    )
    p.add_argument("--key-env", default=None, metavar="VAR", help="environment variable holding the secret")
    p.add_argument("--json", action="store_true", help="print model.yaml's content as JSON")


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=user_path, help="bundle folder from 'search export'")
    p.add_argument("images", type=user_path, nargs="+", metavar="IMAGE", help="image files")
    p.add_argument(
        "--out", type=user_path, default=None, help="write predictions.json, annotated images and masks here"
    )
    p.add_argument(
        "--min-score", type=float, default=0.3, help="drop detections below this score (default 0.3)"
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | mps (default cpu)")
    p.add_argument(
        "--key-env",
        default=None,
        metavar="VAR",
        help="environment variable holding an encrypted bundle's secret (default: the one model.yaml names)",
    )
    p.add_argument("--json", action="store_true", help="print the predictions as one JSON object")


def _ui_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "name", nargs="?", type=os.path.expanduser, help="experiment NAME or folder (default: ./runs's store)"
    )
    p.add_argument("--output-dir", type=user_path, default=None, help="where NAME lives (default ./runs)")
    p.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000; 0 = any free)")


# ---------------------------------------------------------------- best


def cmd_best(args: argparse.Namespace) -> int:
    from search import select

    if args.top is not None and args.top < 1:
        why = f"--top must be >= 1, but got {args.top}. Fix: --top 1 or more, or leave it out (every trial)."
        raise _bad_input(ValueError(why))
    try:
        exp_dir = select.find_experiment(args.name, args.output_dir)
        trials = select.best(exp_dir, args.top)
    except select.SelectError as exc:
        raise _bad_input(exc) from None
    if args.json:
        print(json.dumps(trials, default=str))
        return 0
    if not trials:
        print("no trial has a best metric yet")
        return 0
    from search.study import read_study

    st = read_study(exp_dir)
    metric = st.get("metric", "metric")
    base = trials[0].get("study_base_metric")
    print(
        f"study {st.get('name')}: {len(trials)} ranked trial(s) by best {metric} ({st.get('mode')}); "
        f"base model (epoch 0) {S.fmt(base)}"
        + (
            f", reference trial (torchvision recipe) {S.fmt(trials[0].get('reference_metric'))}"
            if trials[0].get("reference_metric") is not None
            else ""
        )
    )
    print(f"{'#':>2} {'trial':<13} {'state':<10} {metric:>8} {'epoch':>5} {'vs base':>8}  run id")
    for i, t in enumerate(trials, 1):
        imp = t.get("improvement")
        print(
            f"{i:>2} {t['id']:<13} {t.get('state') or '-':<10} {S.fmt(t.get('best_metric')):>8} "
            f"{S.fmt(t.get('epoch')):>5} {S.fmt(imp, sign=True):>8}  "
            f"{t.get('run_id') or '-'}"
        )
        params = S.params_text(t.get("params", {}))
        print(f"{'':>17}{params}")
        print(f"{'':>17}checkpoint {t.get('checkpoint') or '-'}")
        if note := S.recipe_text(t):
            print(f"{'':>17}{note}")
        if t.get("background_only"):
            print(f"{'':>17}{S.BACKGROUND_ONLY}")
        if t.get("stopped"):
            print(f"{'':>17}{S.stop_text(t['stopped'], metric, st.get('mode', 'max'))}")
    return 0


# ---------------------------------------------------------------- promote / export


def cmd_promote(args: argparse.Namespace) -> int:
    from search import promote, select
    from search.bundle import BundleError

    try:
        exp_dir = select.find_experiment(args.name, args.output_dir)
        out = promote.promote(exp_dir, args.model, alias=args.alias, trial_id=args.trial, force=args.force)
    except promote.Refused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    except (select.SelectError, BundleError) as exc:
        raise _bad_input(exc) from None
    if args.json:
        print(json.dumps(out, default=str))
        return 0
    forced = " (forced: it does not beat the base model)" if out["forced"] else ""
    print(f"registered {out['model']} version {out['version']} as {out['uri']}{forced}")
    print(
        f"  trial {out['trial']} (run {out['run_id']}): {out['metric']}={S.fmt(out['value'])}, base "
        f"{S.fmt(out['base_metric'])}, improvement {S.fmt(out['improvement'], sign=True)}"
    )
    if out["previous_version"] not in (None, out["version"]):
        print(f"  {out['model']}@{out['alias']} pointed at version {out['previous_version']} before")
    if out["study_best"]:
        top = out["study_best"]
        best_now = f"{top['trial']}: {out['metric']}={S.fmt(top['value'])}"
        print(
            f"  note: not the study's best trial ({best_now})"
            if args.trial
            else f"  note: the study ran on while promote read it: its best is now {best_now}"
        )
    if out["pending_records"]:
        from search.study_folder import resume_command
        from search.write_queue import PENDING_FILE

        print(
            f"  note: {out['pending_records']} record(s) of this trial's run wait in "
            f"{exp_dir / PENDING_FILE} (the store did not take them); send them with: "
            f"{resume_command(exp_dir)}"
        )
    print(f"  source {out['source']} on {out['tracking_uri']}")
    print(f"  fine-tune from it with  model.weights: {out['uri']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from search import guards, select
    from search.bundle import BundleError

    key_env = _encryption_key_env(args)
    try:
        exp_dir = select.find_experiment(args.name, args.output_dir)
        spec = select.load_study_spec(exp_dir)  # once: it reads the annotation files' classes
        guards.check_output(args.out, guards.spec_inputs(spec), "--out", folder=True)
        meta = select.export(
            exp_dir, args.out, args.trial, torchscript=not args.no_torchscript, key_env=key_env, spec=spec
        )
    except (select.SelectError, BundleError) as exc:
        raise _bad_input(exc) from None
    study = meta.get("study", {})
    if isinstance(study.get("improvement"), (int, float)) and study["improvement"] <= 0:  # exported all the
        best, base = S.fmt(study.get("best_metric")), S.fmt(study.get("base_metric"))  # same: promote refuses
        print(
            f"note: trial {study.get('trial')}'s best {study.get('metric')} {best} does not beat the base "
            f"model's epoch-0 {base}",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(meta, default=str))
        return 0
    ts = meta["torchscript"]
    print(
        f"bundle {args.out}: {meta['arch']} ({meta['task']}, {meta['num_classes'] - 1} "
        f"class{'es' if meta['num_classes'] != 2 else ''}) from trial "
        f"{study.get('trial')} epoch {meta['checkpoint']['epoch']} ({study.get('metric')}="
        f"{S.fmt(study.get('best_metric'))})"
    )
    print(f"  files: {', '.join(sorted(p.name for p in Path(args.out).iterdir()))}")  # model.yaml too
    print(f"  torchscript: {'ok (matches the eager model)' if ts.get('ok') else ts.get('error')}")
    needs = "torch and torchvision" if key_env is None else f"torch, torchvision, cryptography and ${key_env}"
    print(
        f"  load it: cd {shlex.quote(str(args.out))} && python -c "
        f"\"from load import load_bundle; model, meta = load_bundle('.')\" (needs {needs})"
    )
    return 0


def _encryption_key_env(args: argparse.Namespace) -> str | None:
    """``--encrypt``'s variable, checked before any work (exit 2 naming what is missing)."""
    from search.bundle_load import MIN_SECRET
    from search.errors import SpecError

    if args.key_env and not args.encrypt:
        raise _bad_input(SpecError("--key-env", "is only used with --encrypt.", "add --encrypt, or drop it."))
    if not args.encrypt:
        return None
    if not args.key_env:
        raise _bad_input(
            SpecError("--encrypt", "needs --key-env NAME.", "name the environment variable with the secret.")
        )
    if len(os.environ.get(args.key_env, "")) < MIN_SECRET:
        raise _bad_input(
            SpecError(
                "--key-env",
                f"environment variable {args.key_env} is unset or shorter than {MIN_SECRET} characters.",
                f"export {args.key_env}=<a secret of {MIN_SECRET}+ characters>, kept as safe as the weights.",
            )
        )
    return args.key_env


# ---------------------------------------------------------------- predict


def cmd_predict(args: argparse.Namespace) -> int:
    from search import guards
    from search.bundle import BundleError
    from search.bundle_predict import predict_files
    from search.errors import SpecError

    if not 0.0 <= args.min_score <= 1.0:
        raise _bad_input(
            SpecError(
                "--min-score", f"must be in [0, 1], but got {args.min_score}.", "pass a score in [0, 1]."
            )
        )
    try:
        guards.check_output(args.out, guards.protected(args.images, [args.bundle]), "--out", folder=True)
        out = predict_files(
            args.bundle,
            list(args.images),
            args.out,
            min_score=args.min_score,
            device=args.device,
            key_env=args.key_env,
        )
    except BundleError as exc:
        raise _bad_input(exc) from None
    if args.json:
        print(json.dumps(out, default=str))
        return 0
    _print_predictions(out, args.out)
    return 0


def _print_predictions(out: dict[str, Any], out_dir: Path | None) -> None:
    """A table per image: class, score, box (detection); pixels per class (semantic)."""
    scored = out["task"] != "semantic_segmentation"  # its pixels take the top class, no score
    cut = f", min score {out['min_score']:g}" if scored else ""
    print(f"{out['arch']} ({out['task']}), {len(out['images'])} image(s){cut}")
    for entry in out["images"]:
        print(f"\n{entry['image']} ({entry['width']}x{entry['height']})")
        if "pixels" in entry:
            total = sum(entry["pixels"].values()) or 1
            for name, n in entry["pixels"].items():
                print(f"  {name:<20} {n:>9} px  {100 * n / total:5.1f} %")
            continue
        dets = entry.get("detections") or []
        if not dets:
            print("  no detection above the min score")
            continue
        print(f"  {'class':<20} {'score':>6}  box (x1, y1, x2, y2)")
        for d in dets:
            box = ", ".join(f"{v:.1f}" for v in d["box"])
            print(f"  {str(d.get('class', d['label'])):<20} {d['score']:>6.3f}  ({box})")
    if out_dir is not None:
        print(f"\nwritten to {out_dir}: predictions.json, annotated images and masks")


# ---------------------------------------------------------------- ui


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def ui_store(name: str | None, output_dir: Path | None) -> tuple[str, str | None, Path]:
    """(tracking URI, experiment name or None, folder for the UI's log) of a study or of
    ``<output_dir>/mlflow.db``."""
    from search import mlflow_store, select

    if name:
        try:
            exp_dir = select.find_experiment(name, output_dir)
            uri, experiment = select.study_store(exp_dir)  # not an empty store made where it was
        except select.SelectError as exc:
            raise _bad_input(exc) from None
        return uri, experiment, exp_dir.parent
    folder = Path(output_dir or "runs").resolve()
    if not (folder / mlflow_store.DB_FILE).is_file():
        raise _bad_input(
            ValueError(
                f"no MLflow store at {folder / mlflow_store.DB_FILE}: pass a study NAME or "
                "--output-dir with the spec's output_dir."
            )
        )
    return mlflow_store.default_uri(folder), None, folder


def cmd_ui(args: argparse.Namespace) -> int:
    from search import local_server, mlflow_store

    uri, experiment, folder = ui_store(args.name, args.output_dir)
    if mlflow_store.is_http(uri):  # the page on stdout, as for a local UI
        print(
            f"this study records to the MLflow server {mlflow_store.redact(uri)}: open it there",
            file=sys.stderr,
        )
        print(mlflow_store.experiment_page(uri, experiment or ""), flush=True)
        return 0
    port = args.port or local_server.free_port()
    claim = local_server.claim_port(port) if 0 < port < 65536 else None  # against another `ui` starting
    if claim is not None and not local_server.port_free(port):
        os.close(claim)
        claim = None
    if claim is None:
        raise _bad_input(
            ValueError(f"port {port} on 127.0.0.1 is in use or invalid; pass another --port (0 = any).")
        )
    extra: list[str] = []
    with contextlib.ExitStack() as temporary:
        temporary.callback(os.close, claim)
        if (db := mlflow_store.sqlite_file(uri)) is not None:
            extra, uri = _ui_store_args(db, uri, temporary)
        logs = folder  # or, in a read-only archive or another user's study, a temporary folder
        if not os.access(folder, os.W_OK):
            logs = Path(temporary.enter_context(tempfile.TemporaryDirectory(prefix="search-ui-")))
        return _serve_ui(uri, port, extra, logs / "mlflow-ui.log", experiment)


def _ui_store_args(db: Path, uri: str, temporary: contextlib.ExitStack) -> tuple[list[str], str]:
    """The server's artifact arguments and the store it serves: ``db`` mended when it moved, or a
    mended temporary copy when it is read-only (it named the artifacts of the folder it ran in)."""
    from search import mlflow_store, store_files

    art = db.parent / mlflow_store.ARTIFACTS_DIR
    extra = ["--no-serve-artifacts", "--default-artifact-root", art.resolve().as_uri()]
    if mlflow_store.store_writable(db):
        mlflow_store.mend_moved(db)  # a moved or copied store: its own artifacts, not the old folder's
        return extra, uri
    copy = store_files.readable_copy(db)
    temporary.callback(shutil.rmtree, copy.parent, ignore_errors=True)
    print(f"{db} is read-only: the UI shows a copy (what you change there is not kept)", file=sys.stderr)
    return extra, f"sqlite:///{copy}"


def _serve_ui(uri: str, port: int, extra: list[str], log_path: Path, experiment: str | None) -> int:
    """The MLflow server on ``uri`` until Ctrl-C or SIGTERM (``ui``)."""
    from search import local_server, mlflow_store

    url = f"http://{local_server.HOST}:{port}"
    print(
        f"starting the MLflow UI on {mlflow_store.redact(uri)} (log: {log_path}) ...",
        file=sys.stderr,
        flush=True,
    )
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            local_server.server_command(uri, port, *extra),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=local_server.server_env(),
        )
    from search.cluster import stop_signals

    # `kill` and a closed terminal (SIGHUP) stop the server too, and remove a temporary store
    old = {sig: signal.signal(sig, _interrupt) for sig in stop_signals()}
    try:
        local_server.wait_healthy(proc, port, UI_START_TIMEOUT_S, log_path)
        page = url
        if experiment:
            try:
                exp = mlflow_store.client(uri).get_experiment_by_name(experiment)
                if exp is not None:
                    page = f"{url}/#/experiments/{exp.experiment_id}/runs"  # the runs table
            except Exception:  # noqa: BLE001 - the plain URL still works
                pass
        print(page, flush=True)
        print("MLflow UI running on 127.0.0.1 only; Ctrl-C stops it", file=sys.stderr, flush=True)
        proc.wait()
        return 0 if proc.returncode in (0, -signal.SIGTERM) else 1
    except KeyboardInterrupt:
        return 0
    finally:
        local_server.stop(proc, port)
        for sig, handler in old.items():
            signal.signal(sig, handler)


COMMANDS: dict[str, Command] = {
    "best": Command("a study's trials ranked by best-epoch objective", _best_args, cmd_best),
    "promote": Command(
        "register a trial's model in the MLflow Model Registry under an alias", _promote_args, cmd_promote
    ),
    "export": Command("write a self-contained deployment bundle of a trial", _export_args, cmd_export),
    "predict": Command("run an exported bundle on images", _predict_args, cmd_predict),
    "ui": Command("start the MLflow UI on a study's tracking store (127.0.0.1)", _ui_args, cmd_ui),
}
