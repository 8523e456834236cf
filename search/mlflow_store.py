"""The MLflow store of a study: its URI, the client, the experiment, and the fail-fast check.

``tracking.uri`` (default ``sqlite:///<output_dir>/mlflow.db``; artifacts then go to
``<output_dir>/mlartifacts/<experiment>``). Credentials come from MLflow's own environment
variables; user:password parts of URIs are redacted (:func:`redact`) in every message and file.
"""

from __future__ import annotations

import glob
import importlib.metadata
import logging
import os
import re
import socket
import sqlite3
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from search.errors import SpecError
from search.failures import exception_line
from search.spec.schema import SQLITE, sqlite_file
from search.store_files import ARTIFACTS_DIR, mend_moved, store_writable  # noqa: F401 (mend_moved: re-exported)
from search.study import SPEC_FILE
from trainables.files import pid_alive

log = logging.getLogger(__name__)

DB_FILE = "mlflow.db"
CHECK_TIMEOUT_S = 5.0
DISABLE_ENV = "SEARCH_NO_MLFLOW"  # "1": make_callback returns None (no MLflow records)


def tracking_uri(spec: Any) -> str:
    """The study's tracking URI: ``tracking.uri`` or ``sqlite:///<output_dir>/mlflow.db``."""
    uri = getattr(getattr(spec, "tracking", None), "uri", None)
    return uri or default_uri(Path(spec.output_dir))


def default_db(output_dir: Path) -> Path:
    """The default SQLite store's file for studies under ``output_dir``."""
    return Path(output_dir).resolve() / DB_FILE


def default_uri(output_dir: Path) -> str:
    return f"{SQLITE}{default_db(output_dir)}"


def uses_default_store(exp_dir: Path) -> bool:
    """Whether a study folder's spec names no store: its records go to the default store beside
    it (which moves with the output folder)."""
    return study_tracking(exp_dir)[0] == default_uri(Path(exp_dir).resolve().parent)


def store_moved_here(recorded_uri: str, exp_dir: Path) -> bool:
    """Whether a study folder that uses the default store (:func:`uses_default_store`) recorded
    the default store of the folder it ran in, and now lies (moved or copied with its output
    folder) beside a default store of its own, which is then its store."""
    ran, here = sqlite_file(recorded_uri), default_db(Path(exp_dir).resolve().parent)
    if ran is None or not uses_default_store(exp_dir):
        return False
    return ran.name == DB_FILE and ran.resolve() != here and here.is_file()


def missing_sqlite(uri: str) -> Path | None:
    """The file of a SQLite store that is not there (MLflow would create an empty one), or None."""
    path = sqlite_file(uri)
    return path if path is not None and not path.is_file() else None


def experiment_name(spec: Any) -> str:
    return getattr(getattr(spec, "tracking", None), "experiment", None) or spec.name


def is_http(uri: str) -> bool:
    return uri.split(":", 1)[0].lower() in ("http", "https")


def redact(uri: str) -> str:
    """``uri`` without a user:password part (safe for messages, tags and files)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparseable uri>"
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


def artifact_location(uri: str, name: str) -> str | None:
    """Where a new experiment keeps its artifacts: ``<db folder>/mlartifacts/<name>`` for a SQLite
    store; None (the server's default) otherwise."""
    db = sqlite_file(uri)
    return None if db is None else (db.parent / ARTIFACTS_DIR / name).resolve().as_uri()


def client(uri: str) -> Any:
    """An ``MlflowClient`` on ``uri`` for tracking and the model registry (a SQLite store that does
    not exist yet is made whole first: :func:`make_sqlite_store`)."""
    from mlflow import MlflowClient

    if (db := sqlite_file(uri)) is not None:
        make_sqlite_store(db)
        mend_moved(db)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


CREATING = ".creating"  # the suffix of a SQLite store still being made (make_sqlite_store)


def make_sqlite_store(db: Path) -> None:
    """Create a missing SQLite store whole or not at all. MLflow makes its tables in seconds of
    migrations; a process killed meanwhile left a store MLflow then refused for good ("table ...
    already exists"). The tables are made in a hidden file beside it, which is then linked into
    place unless another process made the store first. Leftovers of killed makers on this host
    are removed."""
    folder, host = db.parent, socket.gethostname()
    for left in folder.glob(f".{db.name}.{glob.escape(host)}.*{CREATING}*") if folder.is_dir() else ():
        pid = left.name.split(CREATING)[0].rsplit(".", 2)[-2]  # SQLite's "-journal" beside it too
        if not (pid.isdigit() and pid_alive(int(pid))):
            left.unlink(missing_ok=True)
    if db.exists() or not folder.is_dir():
        return  # no folder: MLflow's own error says so
    from mlflow import MlflowClient

    tmp = folder / f".{db.name}.{host}.{os.getpid()}.{threading.get_ident()}{CREATING}"
    try:
        maker = MlflowClient(tracking_uri=f"{SQLITE}{tmp}")
        maker.search_experiments(max_results=1)  # makes every table (the registry's too)
        engine = getattr(getattr(maker._tracking_client, "store", None), "engine", None)
        if engine is not None:
            engine.dispose()
        try:
            os.link(tmp, db)
        except FileExistsError:
            pass  # another process made it first: it is whole too
        except OSError:  # a file system without hard links: in place, as MLflow would
            if not db.exists():
                os.replace(tmp, db)
    finally:
        for extra in ("", "-journal"):
            tmp.with_name(tmp.name + extra).unlink(missing_ok=True)


_WARMING: dict[str, threading.Thread] = {}  # uri -> thread creating the local store (warm_up)


def warm_up(spec: Any) -> None:
    """Start importing MLflow and making a local store (SQLite or a folder: its tables) in a
    background thread, so that this work overlaps ``ray.init`` instead of the trials' start. The
    study's experiment is left to the writer, after the cluster's checks: a launch they refuse
    leaves a shared store as it was. Call it only after validation. A failure here is ignored:
    the writer meets it again and reports it. No-op for an HTTP server (its retries must not
    outlive the process) or with ``SEARCH_NO_MLFLOW=1``."""
    uri = tracking_uri(spec)
    if os.environ.get(DISABLE_ENV) == "1" or is_http(uri) or uri in _WARMING:
        return

    def run() -> None:
        try:
            client(uri).search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - the writer retries and reports
            log.debug("MLflow warm-up failed: %s", exc)

    _WARMING[uri] = thread = threading.Thread(target=run, name="mlflow-warm-up", daemon=True)
    thread.start()


def warmed(uri: str, timeout: float = 120.0) -> None:
    """Wait for :func:`warm_up`'s thread on ``uri``, if any (no two threads create one store)."""
    thread = _WARMING.pop(uri, None)
    if thread is not None:
        thread.join(timeout)


def new_default_store(spec: Any) -> Path | None:
    """The default SQLite store's file when it does not exist yet (a launch's :func:`warm_up`
    would create it), else None."""
    if getattr(spec.tracking, "uri", None) or os.environ.get(DISABLE_ENV) == "1":
        return None
    db = default_db(spec.output_dir)
    return None if db.exists() else db


def remove_unused_store(db: Path) -> None:
    """Delete a SQLite store :func:`warm_up` created for a launch refused before it wrote anything
    (nothing is left of a refused launch), unless a run is in it by now (another launch's)."""
    import shutil

    warmed(default_uri(db.parent))
    if not db.is_file():
        return
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            runs = con.execute("SELECT count(*) FROM runs").fetchone()[0]
    except sqlite3.Error:
        return  # not what warm_up makes: leave it
    if runs:
        return
    for extra in ("", "-journal", "-wal", "-shm"):
        db.with_name(db.name + extra).unlink(missing_ok=True)
    artifacts = db.parent / ARTIFACTS_DIR
    if artifacts.is_dir() and not any(p.is_file() for p in artifacts.rglob("*")):
        shutil.rmtree(artifacts, ignore_errors=True)


def get_or_create_experiment(mlc: Any, name: str, uri: str) -> str:
    """The experiment id of ``name`` (created, or restored when deleted)."""
    exp = mlc.get_experiment_by_name(name)
    if exp is None:
        try:
            return mlc.create_experiment(name, artifact_location=artifact_location(uri, name))
        except Exception:  # created concurrently: look it up again
            exp = mlc.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        mlc.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def limit_http_retries() -> None:
    """MLflow's own HTTP retries (7, up to minutes) would stall the writer thread: the queue
    retries instead. Only defaults: values the user set are kept. Nor does MLflow print (to stdout,
    under the progress lines or a --json object) and look up each run's URL as it ends."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def _probe_http(uri: str, name: str, timeout: float, write: bool = True, again: str | None = None) -> None:
    """One read of the experiment (the server answers, is MLflow, takes the credentials) and, when
    the experiment exists already (perhaps another user's), one harmless write to it (``write``)."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds, wait = get_default_host_creds(uri), max(1, int(timeout))

    def call(endpoint: str, method: str, **kw: Any) -> Any:
        path = f"/api/2.0/mlflow/{endpoint}"
        return http_request(creds, path, method, max_retries=0, timeout=wait, raise_on_status=False, **kw)

    resp = call("experiments/get-by-name", "GET", params={"experiment_name": name})
    if resp.status_code in (401, 403):
        given = os.environ.get("MLFLOW_TRACKING_USERNAME") or os.environ.get("MLFLOW_TRACKING_TOKEN")
        user = None if given else urlsplit(uri).username  # MLflow does not read the URI's user
        then = f", then {again}" if again else ""
        raise SpecError(
            "tracking.uri",
            f"the MLflow server {redact(uri)} refused the credentials (HTTP {resp.status_code})"
            + (": MLflow takes the user name from the environment, not from the URI." if user else "."),
            f"set MLFLOW_TRACKING_USERNAME={user} (and MLFLOW_TRACKING_PASSWORD) in the environment{then}."
            if user
            else f"{'check' if given else 'set'} MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or "
            f"MLFLOW_TRACKING_TOKEN, in the environment{then}.",
        )
    found = _json(resp)
    # a missing experiment is MLflow's 404 with its error code; another 404 (a path, a proxy) is not MLflow
    if not (resp.status_code == 200 and "experiment" in found) and found.get("error_code") != MISSING:
        raise SpecError(
            "tracking.uri",
            f"{redact(uri)} did not answer like an MLflow server (HTTP {resp.status_code} for "
            "experiments/get-by-name).",
            f"make the MLflow server the study used answer at this address, then {again}."
            if again
            else "check the URL (and the path a proxy serves MLflow under) and that it is an MLflow server.",
        )
    if write and resp.status_code == 200:
        tag = {
            "experiment_id": found["experiment"].get("experiment_id"),
            "key": "search.checked",
            "value": "1",
        }
        if call("experiments/set-experiment-tag", "POST", json=tag).status_code in (401, 403):
            raise SpecError(
                "tracking.experiment",
                f"the MLflow server {redact(uri)} lets this user read the experiment {name!r}, not write it.",
                f"ask its owner for edit permission, then {again}."
                if again
                else "ask its owner for edit permission, or set tracking.experiment to one of your own.",
            )


MISSING = "RESOURCE_DOES_NOT_EXIST"  # MLflow's error code for an experiment that does not exist


def experiment_page(uri: str, name: str, timeout: float = 5.0) -> str:
    """The web page of experiment ``name``'s runs on the MLflow server ``uri`` (credentials from
    the environment, never in the text); the server's root where it does not answer in time."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    root = redact(uri).rstrip("/")
    try:
        resp = http_request(
            get_default_host_creds(uri),
            "/api/2.0/mlflow/experiments/get-by-name",
            "GET",
            params={"experiment_name": name},
            max_retries=0,
            timeout=max(1, int(timeout)),
            raise_on_status=False,
        )
        exp_id = _json(resp).get("experiment", {}).get("experiment_id") if resp.status_code == 200 else None
    except Exception:  # noqa: BLE001 - the root still leads there
        exp_id = None
    return f"{root}/#/experiments/{exp_id}/runs" if exp_id else root


def _json(resp: Any) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


# Schemes MLflow's own tracking stores accept ("" is a plain path: a file store).
_STORE_SCHEMES = (
    "",
    "file",
    "sqlite",
    "postgresql",
    "mysql",
    "mssql",
    "http",
    "https",
    "databricks",
    "databricks-uc",
)


def _plugin_schemes() -> set[str]:
    """Schemes of tracking-store plugins installed through MLflow's entry points."""
    eps = importlib.metadata.entry_points()
    return {ep.name for ep in eps.select(group="mlflow.tracking_store")}


def check_tracking(spec: Any, timeout: float = CHECK_TIMEOUT_S, again: str | None = None) -> None:
    """Fail fast (SpecError on ``tracking.uri``, within about ``timeout`` seconds) when the tracking
    store cannot be used: an http(s) server that does not answer, refuses the credentials or is
    not MLflow; a SQLite file whose folder cannot be created."""
    uri = tracking_uri(spec)
    if os.environ.get(DISABLE_ENV) == "1":
        return
    if (db := sqlite_file(uri)) is not None:
        # the folder can be made, and is made only for the check (a launch refused later leaves
        # nothing; the launch's lock makes it for good)
        folder = db.parent
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpecError(
                "tracking.uri",
                f"cannot create the folder of the SQLite store {folder}: {exc.strerror or exc}.",
                "fix output_dir or tracking.uri.",
            ) from None
        writable = os.access(folder, os.W_OK)
        for made in missing:  # deepest first
            try:
                made.rmdir()
            except OSError:
                break  # something appeared in it meanwhile: keep it and what holds it
        fix = "fix output_dir or tracking.uri." if again is None else f"make it writable, then {again} again."
        if not writable:
            raise SpecError("tracking.uri", f"the folder of the SQLite store {folder} is not writable.", fix)
        if db.is_file() and not store_writable(db):  # its records waited, unwritten, for a resume
            why = f"the SQLite store {db} is read-only (the study writes to it)."
            raise SpecError("tracking.uri", why, f"make it writable, or {fix}" if again is None else fix)
        return
    if not is_http(uri):
        scheme = urlsplit(uri).scheme.split("+")[0].lower()
        if scheme not in _STORE_SCHEMES and scheme not in _plugin_schemes():
            raise SpecError(
                "tracking.uri",
                f"MLflow has no tracking store for the scheme {scheme!r} in {redact(uri)!r}.",
                f"use one of: {', '.join(s or '<a path>' for s in _STORE_SCHEMES)} (or leave it unset for "
                "the default SQLite store).",
            )
        return  # other stores (file:, databases) are checked by the first write
    check_server(uri, experiment_name(spec), timeout, again)


def check_server(
    uri: str, experiment: str, timeout: float = CHECK_TIMEOUT_S, again: str | None = None, write: bool = True
) -> None:
    """An http(s) tracking server answers as MLflow within about ``timeout`` s and takes this
    user's credentials (and writes: ``write``); else a SpecError whose fix ends in ``again`` (a
    command that cannot change the store, e.g. "resume") or, for a launch, names the spec's keys."""
    box: dict[str, BaseException | None] = {}

    def probe() -> None:
        try:
            _probe_http(uri, experiment, timeout, write, again)
            box["error"] = None
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=probe, daemon=True, name="mlflow-probe")
    worker.start()
    worker.join(timeout * (2 if write else 1) + 1.0)  # a read, and a write when the experiment exists
    err = box.get("error", TimeoutError(f"no answer within {timeout:.0f}s"))
    if err is None:
        return
    if isinstance(err, SpecError):
        raise err
    reason = " ".join(str(err).split())
    reason = re.sub(r"https?://\S+@", "***@", reason)
    cause = "no answer" if "timed out" in reason.lower() or isinstance(err, TimeoutError) else "unreachable"
    raise SpecError(
        "tracking.uri",
        f"the MLflow server {redact(uri)} is {cause} ({short_reason(reason)}).",
        f"start the server (or make it reachable), then {again}."
        if again
        else "start the server, fix tracking.uri, or remove tracking.uri to record into the local store.",
    )


def short_reason(text: str) -> str:
    if "SSL" in text:  # the cause is at the end of MLflow's and urllib3's text, past what is kept
        cause = re.search(r"\[SSL: ([A-Z_]+)\]|(certificate verify failed[^')]*)", text)
        what = (cause.group(1) or cause.group(2)) if cause else "SSL error"
        hint = {"WRONG_VERSION_NUMBER": " (https:// to a plain http server?)"}.get(what, "")
        if "CERTIFICATE_VERIFY_FAILED" in what or "certificate verify failed" in what:
            hint = " (MLFLOW_TRACKING_SERVER_CERT_PATH names the CA that signed the server's certificate)"
        return f"TLS failed: {what}{hint}"
    for key in (
        "Connection refused",
        "Name or service not known",
        "timed out",
        "No route to host",
        "Temporary failure in name resolution",
        "Connection reset",
    ):
        if key.lower() in text.lower():
            return key
    if "(sqlite3." in text or "[SQL:" in text:  # the driver's words, not the statement (cut before them)
        return exception_line(Exception(text)).removeprefix("Exception: ")
    return text[:160]


def study_tracking(exp_dir: Path) -> tuple[str, str]:
    """(tracking URI, experiment name) of an experiment folder, from its ``spec.yaml`` (the
    default store is ``<exp_dir>/../mlflow.db``)."""
    import yaml

    exp_dir = Path(exp_dir).resolve()
    raw: dict[str, Any] = {}
    path = exp_dir / SPEC_FILE
    if path.is_file():
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            raw = {}
    tracking = raw.get("tracking") or {}
    uri = tracking.get("uri") or default_uri(exp_dir.parent)
    return uri, tracking.get("experiment") or raw.get("name") or exp_dir.name
