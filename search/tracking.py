"""MLflow recording of a study: one driver-side writer, a Ray Tune :class:`MlflowTracker` callback.

Trials never talk to MLflow. The tracker turns Tune events into MLflow records with the
``MlflowClient`` API and explicit run ids (never the fluent active-run stack):

- one MLflow experiment per study (``tracking.experiment``, default the spec's name); with the
  default store (``sqlite:///<output_dir>/mlflow.db``) its artifacts go to
  ``<output_dir>/mlartifacts/<experiment>``;
- a parent run per study: spec and search space as artifacts; tags for the git commit, package
  versions, seeds, base weights sha256 and dataset fingerprint; ``base_<metric>`` (the base
  model's epoch-0 metrics); ``best_<metric>`` stepped by the number of finished trials; a final
  ``summary.json`` and ``summary.*`` tags;
- one nested child run per trial (tag ``mlflow.parentRunId``): the sampled params under their
  spec names, per-epoch metrics with ``step = epoch`` (objective and other metrics, losses, lr,
  epoch_seconds, images_per_s; Ray's bookkeeping keys are left out), ``best_<metric>`` and
  ``best_epoch``; status FINISHED (``stopped_early=true`` and ``stopped_at_epoch`` when the
  scheduler or the time budget stopped it), FAILED for diverged/errored trials (``failure_reason``
  tag, ``traceback.txt`` artifact), KILLED when the study was interrupted before it finished.

Resume: ``<exp>/mlflow_runs.json`` maps trial id -> run id (atomic writes), so a restored study
continues the SAME runs (set RUNNING again, then closed): no duplicates, none left RUNNING.

Outages: every write goes through :class:`WriteQueue`, executed in order by one background
thread; a failed write is retried with exponential backoff (the queue waits, keeping the order)
and the queue catches up when the store answers again. Whatever is still unwritten when the study
ends (after ``flush_timeout`` seconds) is kept in ``<exp>/mlflow_pending.jsonl``, reported, and
replayed on the next ``resume`` (or by :func:`replay_pending`).

Credentials: MLflow reads ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``/``TOKEN`` itself; nothing here
logs or writes them, and user:password parts of URIs are redacted in every message and file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import subprocess
import threading
import time
import traceback
import uuid
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from search import study as S
from search.errors import SpecError
from search.study import RAY_KEYS, SPACE_FILE, SPEC_FILE, atomic_write_text
from trainables.files import sha256_file

try:  # the callback base class; everything else here also works without Ray
    from ray.tune import Callback as _Callback
except ImportError:  # pragma: no cover - ray is a dependency
    _Callback = object  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
RUNS_FILE = "mlflow_runs.json"
PENDING_FILE = "mlflow_pending.jsonl"
CHECK_TIMEOUT_S = 5.0
DISABLE_ENV = "SEARCH_NO_MLFLOW"  # "1": make_callback returns None (no MLflow records)
FLUSH_ENV = "SEARCH_MLFLOW_FLUSH_S"  # seconds to wait for the queue at the end of a study

# Result keys that are Ray's bookkeeping or our own plumbing: never MLflow metrics.
NOISE_KEYS = RAY_KEYS | frozenset(
    {
        "epoch",
        "base_metric",
        "diverged",
        "step",
        "trainable_params",
        "frozen_params",
    }
)
# MLflow limits (mlflow.utils.validation): key length, param value length, batch sizes.
MAX_KEY, MAX_PARAM_VALUE, MAX_TAG_VALUE = 250, 6000, 8000
MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH = 1000, 100
# MLflow error codes that retrying cannot fix.
PERMANENT_CODES = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "RESOURCE_DOES_NOT_EXIST",
        "RESOURCE_ALREADY_EXISTS",
        "INVALID_STATE",
        "BAD_REQUEST",
        "ENDPOINT_NOT_FOUND",
        "NOT_FOUND",
    }
)
_KEY_CHARS = re.compile(r"[^\w.\- /:]")


class RegistryError(ValueError):
    """A ``models:/`` or ``runs:/`` URI that cannot be resolved to a weights file."""


# ---------------------------------------------------------------- URIs and the store


def tracking_uri(spec: Any) -> str:
    """The study's tracking URI: ``tracking.uri`` or ``sqlite:///<output_dir>/mlflow.db``."""
    uri = getattr(getattr(spec, "tracking", None), "uri", None)
    return uri or default_uri(Path(spec.output_dir))


def default_uri(output_dir: Path) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / DB_FILE}"


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
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return (db.parent / ARTIFACTS_DIR / name).resolve().as_uri()
    return None


def client(uri: str) -> Any:
    """An ``MlflowClient`` on ``uri`` for tracking and the model registry."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


_WARMING: dict[str, threading.Thread] = {}  # uri -> thread creating the local store (warm_up)


def warm_up(spec: Any) -> None:
    """Start importing MLflow and creating the study's experiment in a local store (SQLite or a
    folder) in a background thread, so that this work overlaps ``ray.init`` instead of the trials'
    start. Call it only after validation. A failure here is ignored: the writer meets it again
    and reports it. No-op for an HTTP server (its retries must not outlive the process) or with
    ``SEARCH_NO_MLFLOW=1``."""
    uri = tracking_uri(spec)
    if os.environ.get(DISABLE_ENV) == "1" or is_http(uri) or uri in _WARMING:
        return
    name = experiment_name(spec)

    def run() -> None:
        try:
            get_or_create_experiment(client(uri), name, uri)
        except Exception as exc:  # noqa: BLE001 - the writer retries and reports
            log.debug("MLflow warm-up failed: %s", exc)

    _WARMING[uri] = thread = threading.Thread(target=run, name="mlflow-warm-up", daemon=True)
    thread.start()


def _warmed(uri: str, timeout: float = 120.0) -> None:
    """Wait for :func:`warm_up`'s thread on ``uri``, if any (no two threads create one store)."""
    thread = _WARMING.pop(uri, None)
    if thread is not None:
        thread.join(timeout)


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


def _limit_http_retries() -> None:
    """MLflow's own HTTP retries (7, up to minutes) would stall the writer thread: the queue
    retries instead. Only defaults: values the user set are kept."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def _probe_http(uri: str, name: str, timeout: float) -> None:
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    resp = http_request(
        get_default_host_creds(uri),
        "/api/2.0/mlflow/experiments/get-by-name",
        "GET",
        max_retries=0,
        timeout=max(1, int(timeout)),
        params={"experiment_name": name},
        raise_on_status=False,
    )
    if resp.status_code in (401, 403):
        raise SpecError(
            "tracking.uri",
            f"the MLflow server {redact(uri)} refused the credentials (HTTP {resp.status_code}).",
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, "
            "or MLFLOW_TRACKING_TOKEN, in the environment.",
        )
    if resp.status_code not in (200, 404):
        raise SpecError(
            "tracking.uri",
            f"{redact(uri)} did not answer like an MLflow server (HTTP "
            f"{resp.status_code} for experiments/get-by-name).",
            "check the URL and that the server is an MLflow tracking server.",
        )


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


def check_tracking(spec: Any, timeout: float = CHECK_TIMEOUT_S) -> None:
    """Fail fast (SpecError on ``tracking.uri``, within about ``timeout`` seconds) when the tracking
    store cannot be used: an http(s) server that does not answer, refuses the credentials or is
    not MLflow; a SQLite file whose folder cannot be created."""
    uri = tracking_uri(spec)
    if os.environ.get(DISABLE_ENV) == "1":
        return
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpecError(
                "tracking.uri",
                f"cannot create the folder of the SQLite store {folder}: {exc.strerror or exc}.",
                "fix output_dir or tracking.uri.",
            ) from None
        if not os.access(folder, os.W_OK):
            raise SpecError(
                "tracking.uri",
                f"the folder of the SQLite store {folder} is not writable.",
                "fix output_dir or tracking.uri.",
            )
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
    box: dict[str, BaseException | None] = {}

    def probe() -> None:
        try:
            _probe_http(uri, experiment_name(spec), timeout)
            box["error"] = None
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=probe, daemon=True, name="mlflow-probe")
    worker.start()
    worker.join(timeout + 1.0)
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
        f"the MLflow server {redact(uri)} is {cause} ({_short_reason(reason)}).",
        "start the server, fix tracking.uri, or remove tracking.uri to record into the local SQLite store.",
    )


def _short_reason(text: str) -> str:
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
    return text[:160]


# ---------------------------------------------------------------- facts for the parent run


def base_weights_sha256(spec: Any) -> str:
    """sha256 of the base weights file; ``enum:<NAME>`` (with the hub cache file's sha256 when
    cached) for a torchvision weight name; ``none`` for random init."""
    weights = spec.model.weights
    if not weights:
        return "none"
    path = Path(weights)
    if path.is_file():
        return sha256_file(path)
    try:
        from torchvision.models import get_model_weights

        from trainables.models import hub_cache_path, resolve_enum

        cached = hub_cache_path(resolve_enum(get_model_weights(spec.model.arch), weights))
        if cached.is_file():
            return sha256_file(cached)
    except Exception:  # noqa: BLE001 - a fact for a tag, never a reason to fail
        pass
    return f"enum:{weights}"


def dataset_fingerprint(spec: Any) -> str:
    """sha256 over both splits: the annotation files' bytes and (file name, byte size) of every
    image they list. Changes when annotations or images are added, removed or replaced."""
    h = hashlib.sha256()
    for split_name in ("train", "val"):
        split = getattr(spec.data, split_name)
        ann = Path(split.annotations)
        h.update(f"{split_name}:{sha256_file(ann)}\n".encode())
        try:
            images = json.loads(ann.read_text(encoding="utf-8")).get("images", [])
        except (OSError, ValueError):
            images = []
        for rec in sorted(images, key=lambda r: str(r.get("file_name"))):
            p = Path(split.images) / str(rec.get("file_name"))
            size = p.stat().st_size if p.is_file() else -1
            h.update(f"{rec.get('file_name')}:{size}\n".encode())
    return h.hexdigest()


def git_commit() -> str:
    """The commit of the checkout holding this package (``+dirty`` with local changes), or
    ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("search", "torch", "torchvision", "ray", "optuna", "mlflow", "pycocotools"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def clean_key(key: str) -> str:
    """An MLflow-legal key (letters, digits, ``_ - . space / :``) of at most 250 characters."""
    key = _KEY_CHARS.sub("_", str(key)) or "_"
    if len(key) > MAX_KEY:
        key = key[: MAX_KEY - 9] + "~" + hashlib.sha1(key.encode()).hexdigest()[:8]
    return key


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def flatten_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts flattened with ``.``; values as text cut to MLflow's 6000 characters."""
    out: dict[str, str] = {}
    for k, v in (config or {}).items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_params(v, name + "."))
            continue
        text = _text(v)
        out[clean_key(name)] = text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if hasattr(value, "item") and callable(value.item):
            try:
                return _number(value.item())
            except (TypeError, ValueError):
                return None
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def metric_values(result: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numeric entries of a trial result that are real metrics (no Ray bookkeeping);
    nested dicts (e.g. per-class AP) become ``outer/inner``."""
    out: dict[str, float] = {}
    for k, v in result.items():
        if not prefix and k in NOISE_KEYS:
            continue
        if isinstance(v, dict):
            out.update(metric_values(v, f"{prefix}{k}/"))
            continue
        num = _number(v)
        if num is not None:
            out[clean_key(f"{prefix}{k}")] = num
    return out


def _better(a: float | None, b: float | None, mode: str) -> bool:
    if a is None:
        return False
    if b is None:
        return True
    return a > b if mode == "max" else a < b


def _now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------- persisted run map


class RunMap:
    """``<exp>/mlflow_runs.json``: experiment, parent and trial run ids and the tracker's progress
    (per-trial best so far, finished count). Thread-safe; every change is written atomically."""

    def __init__(self, exp_dir: Path):
        self.path = Path(exp_dir) / RUNS_FILE
        self.lock = threading.RLock()
        self.data: dict[str, Any] = {}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                log.warning("ignoring unreadable %s", self.path)
        self.data.setdefault("runs", {})  # key ("parent" or a trial id) -> run id
        self.data.setdefault("trials", {})  # trial id -> {best, best_epoch, last_epoch, done}
        self.data.setdefault("study", {"finished": 0, "best": None, "best_trial": None, "base": None})
        self.data.setdefault("uid", uuid.uuid4().hex[:12])

    def save(self) -> None:
        with self.lock:
            text = json.dumps(self.data, indent=1, default=str)
            atomic_write_text(self.path, text)

    def run_id(self, key: str) -> str | None:
        with self.lock:
            return self.data["runs"].get(key)

    def set_run(self, key: str, run_id: str) -> None:
        with self.lock:
            self.data["runs"][key] = run_id
            self.save()

    def trial(self, trial_id: str) -> dict[str, Any]:
        with self.lock:
            return self.data["trials"].setdefault(
                trial_id, {"best": None, "best_epoch": None, "last_epoch": None, "done": False}
            )


def read_runs(exp_dir: Path) -> dict[str, Any]:
    """The parsed ``mlflow_runs.json`` of an experiment ({} when the study was not tracked)."""
    path = Path(exp_dir) / RUNS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------- the write queue


class _Transient(Exception):
    """A write that may succeed later (store unreachable, busy)."""


class WriteQueue:
    """Ordered MLflow writes executed by one background thread.

    Ops are JSON-safe dicts (so unwritten ones can be saved and replayed); runs are named by keys
    (``parent`` or a trial id) resolved to run ids through the :class:`RunMap` when the op runs, so
    records queued while the store is down land in the right runs once it is back. A transient
    failure keeps the op at the head and retries after ``backoff`` seconds (doubling up to
    ``max_backoff``); a permanent one (MLflow rejects the data) is logged and set aside.
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        runs: RunMap,
        pending_path: Path,
        backoff: float = 0.5,
        max_backoff: float = 15.0,
    ):
        self.uri, self.experiment, self.runs = uri, experiment, runs
        self.pending_path = Path(pending_path)
        self.backoff0, self.max_backoff = backoff, max_backoff
        self.ops: deque[dict[str, Any]] = deque()
        self.rejected: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.written = 0
        self.failures = 0  # transient failures seen (retries)
        self.last_error: str | None = None
        self.down_since: float | None = None
        self._stop = False
        self._busy = False
        self._client: Any = None
        self._experiment_id: str | None = None
        self.thread = threading.Thread(target=self._loop, name="mlflow-writer", daemon=True)

    # -- producer side
    def start(self) -> None:
        self.thread.start()

    def put(self, op: dict[str, Any]) -> None:
        with self.cond:
            self.ops.append(op)
            self.cond.notify_all()

    def pending(self) -> int:
        with self.cond:
            return len(self.ops) + (1 if self._busy else 0)

    def flush(self, timeout: float) -> bool:
        """Wait until every queued op is written (True) or ``timeout`` passed (False)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.ops or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.5))
        return True

    def close(self, timeout: float) -> list[dict[str, Any]]:
        """Flush for up to ``timeout`` s, stop the thread, save what is left (and what was
        rejected) to the pending file; returns the unwritten ops."""
        self.flush(timeout)
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        self.thread.join(timeout=max(5.0, float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", 20)) + 5))
        with self.cond:
            left = list(self.ops) + self.rejected
            self.ops.clear()
        self.save_pending(left)
        return left

    def save_pending(self, ops: list[dict[str, Any]]) -> None:
        if not ops:
            self.pending_path.unlink(missing_ok=True)
            return
        text = "".join(json.dumps(op, default=str) + "\n" for op in ops)
        atomic_write_text(self.pending_path, text)

    def load_pending(self) -> int:
        """Queue the ops saved by an earlier run (first, in their order); returns how many."""
        if not self.pending_path.is_file():
            return 0
        ops = []
        for line in self.pending_path.read_text(encoding="utf-8").splitlines():
            try:
                op = json.loads(line)
            except ValueError:
                continue
            op.pop("error", None)
            ops.append(op)
        with self.cond:
            self.ops.extendleft(reversed(ops))
            self.cond.notify_all()
        return len(ops)

    # -- consumer side
    def _loop(self) -> None:
        delay = self.backoff0
        while True:
            with self.cond:
                while not self.ops and not self._stop:
                    self.cond.wait(1.0)
                if self._stop:
                    return
                op = self.ops[0]
                self._busy = True
            try:
                self._run(op)
            except _Transient as exc:
                self.failures += 1
                self.last_error = str(exc)
                if self.down_since is None:
                    self.down_since = time.time()
                    log.warning(
                        "MLflow store %s unavailable (%s); records are queued and retried",
                        redact(self.uri),
                        _short_reason(str(exc)),
                    )
                with self.cond:
                    self._busy = False
                    self.cond.notify_all()
                    if not self._stop:
                        self.cond.wait(delay)
                delay = min(self.max_backoff, delay * 2)
                continue
            except Exception as exc:  # noqa: BLE001 - MLflow rejected the record: set it aside
                log.warning(
                    "MLflow rejected a record (%s on %s): %s",
                    op.get("op"),
                    op.get("key"),
                    " ".join(str(exc).split())[:300],
                )
                with self.cond:
                    self.rejected.append({**op, "error": " ".join(str(exc).split())[:500]})
            else:
                self.written += 1
                if self.down_since is not None:
                    log.warning(
                        "MLflow store %s is back after %.0fs; catching up (%d queued)",
                        redact(self.uri),
                        time.time() - self.down_since,
                        len(self.ops) - 1,
                    )
                    self.down_since = None
            delay = self.backoff0
            with self.cond:
                if self.ops and self.ops[0] is op:
                    self.ops.popleft()
                self._busy = False
                self.cond.notify_all()

    def _mlc(self) -> Any:
        if self._client is None:
            _warmed(self.uri)
            self._client = client(self.uri)
        return self._client

    def _exp_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = get_or_create_experiment(self._mlc(), self.experiment, self.uri)
            with self.runs.lock:
                self.runs.data["experiment_id"] = self._experiment_id
                self.runs.save()
        return self._experiment_id

    def _run_id(self, key: str) -> str:
        run_id = self.runs.run_id(key)
        if run_id is None:
            raise RuntimeError(f"no MLflow run for {key!r} (its creation failed)")
        return run_id

    def _run(self, op: dict[str, Any]) -> None:
        try:
            self._execute(op)
        except Exception as exc:
            if _is_transient(exc):
                raise _Transient(" ".join(str(exc).split())[:500]) from exc
            raise

    def _execute(self, op: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        mlc, kind, key = self._mlc(), op["op"], op.get("key")
        if kind == "open_run":
            self._open_run(op)
        elif kind == "log":
            run_id = self._run_id(key)
            metrics = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in op.get("metrics", [])]
            params = [Param(k, v) for k, v in op.get("params", {}).items()]
            tags = [RunTag(k, v[:MAX_TAG_VALUE]) for k, v in op.get("tags", {}).items()]
            if (
                len(metrics) + len(params) + len(tags) <= MAX_METRICS_PER_BATCH
                and len(params) <= MAX_PARAMS_PER_BATCH
                and len(tags) <= MAX_PARAMS_PER_BATCH
            ):
                if metrics or params or tags:  # one request
                    mlc.log_batch(run_id, metrics=metrics, params=params, tags=tags)
                return
            for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                mlc.log_batch(run_id, metrics=metrics[i : i + MAX_METRICS_PER_BATCH])
            for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
                mlc.log_batch(run_id, params=params[i : i + MAX_PARAMS_PER_BATCH])
            for i in range(0, len(tags), MAX_PARAMS_PER_BATCH):
                mlc.log_batch(run_id, tags=tags[i : i + MAX_PARAMS_PER_BATCH])
        elif kind == "delete_tags":
            run_id = self._run_id(key)
            tags = mlc.get_run(run_id).data.tags
            for name in op["tags"]:
                if name in tags:
                    mlc.delete_tag(run_id, name)
        elif kind == "status":
            run_id = self._run_id(key)
            if op["status"] == "RUNNING":
                mlc.update_run(run_id, status="RUNNING")
            else:
                mlc.set_terminated(run_id, op["status"], end_time=op.get("ts"))
        elif kind == "text":
            mlc.log_text(self._run_id(key), op["text"], op["file"])
        elif kind == "artifact":
            path = Path(op["path"])
            if path.is_file():
                mlc.log_artifact(self._run_id(key), str(path), op.get("dir"))
        else:  # pragma: no cover - ops are made in this module
            raise ValueError(f"unknown op {kind!r}")

    def _open_run(self, op: dict[str, Any]) -> None:
        """Create the run of ``key`` (nested under ``parent`` when given), or reopen the one the
        run map already names (resume): set RUNNING, clear the tags of its last ending."""
        mlc, key = self._mlc(), op["key"]
        run_id = self.runs.run_id(key)
        if run_id is not None:
            try:
                run = mlc.get_run(run_id)
            except Exception as exc:
                if _is_transient(exc):
                    raise
                run = None
            if run is not None and run.info.lifecycle_stage != "deleted":
                if run.info.status != "RUNNING":
                    mlc.update_run(run_id, status="RUNNING")
                for name in op.get("reopen_clear", ()):
                    if name in run.data.tags:
                        mlc.delete_tag(run_id, name)
                return
            log.warning("MLflow run %s of %s is gone; starting a new one", run_id, key)
        exp_id = self._exp_id()
        tags = dict(op.get("tags", {}))
        run_key = f"{self.runs.data['uid']}:{key}"
        tags["search.run_key"] = run_key
        if op.get("parent"):
            tags["mlflow.parentRunId"] = self._run_id(op["parent"])
        if op.get("tried"):  # an earlier attempt may have created it before its answer was lost
            found = mlc.search_runs([exp_id], f"tags.`search.run_key` = '{run_key}'", max_results=1)
            if found:
                self.runs.set_run(key, found[0].info.run_id)
                return
        op["tried"] = True  # kept in the op (and the pending file): a retry looks before creating again
        run = mlc.create_run(exp_id, start_time=op.get("ts"), tags=tags, run_name=op.get("name"))
        self.runs.set_run(key, run.info.run_id)


def _is_transient(exc: BaseException) -> bool:
    """Whether a failed MLflow call may succeed later (unreachable or busy store)."""
    code = getattr(exc, "error_code", None)
    if code in PERMANENT_CODES:
        return False
    text = str(exc).lower()
    if code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "INTERNAL_ERROR", "DEADLINE_EXCEEDED"):
        return True
    markers = (
        "api request to",
        "connection",
        "timed out",
        "timeout",
        "database is locked",
        "unavailable",
        "max retries",
        "503",
        "502",
        "504",
        "temporarily",
    )
    if any(m in text for m in markers):
        return True
    return isinstance(exc, (ConnectionError, TimeoutError, OSError))


# ---------------------------------------------------------------- the callback


def _locked(method: Any) -> Any:
    """Run a hook holding the run map's lock (the writer thread saves the same dict)."""
    import functools

    @functools.wraps(method)
    def wrapper(self: MlflowTracker, *args: Any, **kwargs: Any) -> Any:
        if self.runs is None:
            return None
        with self.runs.lock:
            return method(self, *args, **kwargs)

    return wrapper


class MlflowTracker(_Callback):
    """Ray Tune callback: the study's only MLflow writer (see the module docstring).

    Pickle-safe (Ray pickles callbacks into ``tuner.pkl``): the queue and its thread are made in
    :meth:`setup`. ``resume`` is a hint: whenever ``mlflow_runs.json`` names runs, they continue.
    """

    def __init__(
        self,
        *,
        exp_dir: Path,
        uri: str,
        experiment: str,
        name: str,
        metric: str,
        mode: str,
        epochs: int,
        parent_tags: dict[str, str],
        parent_params: dict[str, str],
        resume: bool = False,
        flush_timeout: float | None = None,
    ):
        self.exp_dir = Path(exp_dir)
        self.uri, self.experiment, self.name = uri, experiment, name
        self.metric, self.mode, self.epochs = metric, mode, int(epochs)
        self.parent_tags, self.parent_params = dict(parent_tags), dict(parent_params)
        self.resume = resume
        env_flush = os.environ.get(FLUSH_ENV)
        self.flush_timeout = float(flush_timeout if flush_timeout is not None else env_flush or 60.0)
        self.max_backoff = 15.0  # seconds between retries while the store is down (at most)
        self._init_runtime()

    def _init_runtime(self) -> None:
        self.runs: RunMap | None = None
        self.queue: WriteQueue | None = None
        self.report: dict[str, Any] | None = None
        self._active: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for k in ("runs", "queue", "report", "_active"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    # -- helpers
    def _put(self, **op: Any) -> None:
        if self.queue is not None:
            self.queue.put(op)

    def _log(
        self,
        key: str,
        metrics: dict[str, float] | None = None,
        step: int = 0,
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        ts = _now_ms()
        self._put(
            op="log",
            key=key,
            metrics=[[k, v, ts, step] for k, v in (metrics or {}).items()],
            params=params or {},
            tags=tags or {},
        )

    def _open_trial(self, trial: Any) -> None:
        tid = trial.trial_id
        if tid in self._active:
            return
        self._active.add(tid)
        st = self.runs.trial(tid)
        reopened = self.runs.run_id(tid) is not None
        if st.get("done"):  # restarted after it ended (resume --restart-errored): count it once
            study = self.runs.data["study"]
            study["finished"] = max(0, int(study.get("finished") or 0) - 1)
        if st.get("status") == "FAILED":  # an errored trial restarts from scratch: a fresh best
            st.update(best=None, best_epoch=None, last_epoch=None)
            st.pop("diverged", None)
        st["done"] = False
        self.runs.save()
        tags = {
            "search.study": self.name,
            "search.trial_id": tid,
            "search.trial_dir": str(getattr(trial, "path", "")),
            "search.state": S.RUNNING,
        }
        self._put(
            op="open_run",
            key=tid,
            name=tid,
            parent="parent",
            ts=_now_ms(),
            tags=tags,
            reopen_clear=["stopped_early", "stopped_at_epoch", "failure_reason", "interrupted", "diverged"],
        )
        if not reopened:
            self._log(tid, params=flatten_params(dict(trial.config or {})))
        else:
            self._log(tid, tags={"resumed": "true"})

    def _close_trial(self, trial: Any, status: str, tags: dict[str, str]) -> None:
        tid = trial.trial_id
        if tid not in self._active and self.runs.run_id(tid) is None:
            self._open_trial(trial)
        self._active.discard(tid)
        st = self.runs.trial(tid)
        if tags:
            self._log(tid, tags=tags)
        self._put(op="status", key=tid, status=status, ts=_now_ms())
        st["status"] = status
        if not st.get("done"):
            st["done"] = True
            study = self.runs.data["study"]
            study["finished"] = int(study.get("finished") or 0) + 1
            metrics = {"trials_finished": float(study["finished"])}
            if status == "FINISHED" and _better(st.get("best"), study.get("best"), self.mode):
                study["best"], study["best_trial"] = st["best"], tid
            if study.get("best") is not None:
                metrics[f"best_{self.metric}"] = study["best"]
            self._log(
                "parent",
                metrics=metrics,
                step=study["finished"],
                tags={"best_trial": str(study.get("best_trial"))} if study.get("best_trial") else None,
            )
        self.runs.save()

    # -- Ray hooks
    def setup(self, **info: Any) -> None:
        if is_http(self.uri):
            _limit_http_retries()
        self.exp_dir.mkdir(parents=True, exist_ok=True)
        self.runs = RunMap(self.exp_dir)
        self.runs.data["tracking_uri"] = redact(self.uri)
        self.runs.data["experiment"] = self.experiment
        self.runs.save()
        self.queue = WriteQueue(
            self.uri, self.experiment, self.runs, self.exp_dir / PENDING_FILE, max_backoff=self.max_backoff
        )
        replayed = self.queue.load_pending()
        if replayed:
            log.info("MLflow: replaying %d records left unwritten by the last run", replayed)
        self.queue.start()
        resumed = self.runs.run_id("parent") is not None
        self._put(
            op="open_run",
            key="parent",
            name=self.name,
            ts=_now_ms(),
            tags={**self.parent_tags, "search.study": self.name},
            reopen_clear=["interrupted"],
        )
        if resumed:
            self._log("parent", tags={"resumed": "true"})
        else:
            self._log("parent", params=self.parent_params)
            for fname in (SPEC_FILE, SPACE_FILE):
                self._put(op="artifact", key="parent", path=str(self.exp_dir / fname), dir=None)

    @_locked
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._open_trial(trial)

    @_locked
    def on_trial_restore(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._open_trial(trial)

    @_locked
    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._open_trial(trial)
        tid = trial.trial_id
        epoch = _number(result.get("epoch"))
        if epoch is None:
            return
        epoch = int(epoch)
        st = self.runs.trial(tid)
        st["last_epoch"] = epoch
        counts = {
            k: float(result[k])
            for k in ("trainable_params", "frozen_params")
            if _number(result.get(k)) is not None
        }
        if counts:
            self._log(tid, metrics=counts, step=0)
        if result.get("diverged"):
            st["diverged"] = epoch
            losses = {k: v for k, v in metric_values(result).items() if k != self.metric}
            self._log(tid, metrics=losses, step=epoch, tags={"diverged": "true"})
            self.runs.save()
            return
        values = metric_values(result)
        if epoch >= 1:
            value = _number(result.get(self.metric))
            if value is not None and _better(value, st.get("best"), self.mode):
                st["best"], st["best_epoch"] = value, epoch
            if st.get("best") is not None:
                values[f"best_{self.metric}"] = st["best"]
                values["best_epoch"] = float(st["best_epoch"])
        self._log(tid, metrics=values, step=epoch)
        study = self.runs.data["study"]
        plain = S.keeps_base(getattr(trial, "config", None) or {})  # the unmodified base model's score
        if (
            epoch == 0
            and plain
            and study.get("base") is None
            and _number(result.get(self.metric)) is not None
        ):
            study["base"] = _number(result.get(self.metric))
            base = {f"base_{k}": v for k, v in values.items()}
            self._log(
                "parent", metrics=base, step=0, tags={"base_metric": repr(study["base"]), "base_trial": tid}
            )
        self.runs.save()

    @_locked
    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        st = self.runs.trial(trial.trial_id)
        if st.get("diverged") is not None:
            epoch = st["diverged"]
            self._close_trial(
                trial,
                "FAILED",
                {
                    "failure_reason": f"diverged: non-finite loss in epoch {epoch}",
                    "diverged": "true",
                    **self._study_tags(trial.trial_id),
                },
            )
            return
        last = st.get("last_epoch")
        tags = {}
        if last is None or last < self.epochs:
            tags = {"stopped_early": "true", "stopped_at_epoch": str(last if last is not None else 0)}
        tags.update(self._study_tags(trial.trial_id))
        self._close_trial(trial, "FINISHED", tags)

    def _study_tags(self, tid: str) -> dict[str, str]:
        """``search.reference`` and the ``search.stopped.*`` record of a trial, from study.json
        (written by the study-state callback, which runs before this one)."""
        try:
            t = S.read_study(self.exp_dir).get("trials", {}).get(tid) or {}
        except (OSError, ValueError):
            return {}
        tags = {"search.reference": "true" if t.get("reference") else "false"}
        if t.get("state") in S.STATES:
            tags["search.state"] = t["state"]
        for k, v in (t.get("stopped") or {}).items():
            tags[f"search.stopped.{k}"] = _text(v)
        return tags

    @_locked
    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        text = _error_text(trial)
        line = _error_line(text) or "the trial raised (no error text)"
        self._close_trial(
            trial, "FAILED", {"failure_reason": line[:MAX_TAG_VALUE], **self._study_tags(trial.trial_id)}
        )
        if text:
            self._put(op="text", key=trial.trial_id, text=text, file="traceback.txt")

    @_locked
    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        tries = int(getattr(trial, "num_failures", 0) or 0)
        self._log(
            trial.trial_id,
            tags={
                "retries": str(tries),
                "last_error": (_error_line(_error_text(trial)) or "")[:MAX_TAG_VALUE],
            },
        )

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.runs is None or self.queue is None:
            return
        with self.runs.lock:
            self._end_records(trials)
        left = self.queue.close(self.flush_timeout)
        self._final_report(left)

    def _end_records(self, trials: list) -> None:
        unfinished = []
        for trial in trials:
            tid = trial.trial_id
            st = self.runs.data["trials"].get(tid)
            if st is not None and st.get("done"):
                continue
            if st is None:
                if str(trial.status) not in ("TERMINATED", "ERROR"):
                    unfinished.append(tid)  # never started: the study is not complete
                continue
            unfinished.append(tid)
            if self.runs.run_id(tid) is not None or tid in self._active:
                self._log(tid, tags={"interrupted": "true", "search.state": S.PENDING})
                self._put(op="status", key=tid, status="KILLED", ts=_now_ms())
            self._active.discard(tid)
        study = self.runs.data["study"]
        try:  # the study-state callback's record (it runs first): states, reference, epoch 0s
            written = S.read_study(self.exp_dir)
        except (OSError, ValueError):
            written = {}
        if study.get("base") is None:  # no trial kept the base as built: the best epoch 0 (as status)
            base = S.study_base_metric(written)
            if base is not None:
                study["base"] = base
                self._log(
                    "parent", metrics={f"base_{self.metric}": base}, step=0, tags={"base_metric": repr(base)}
                )
        summary = self._summary(trials, unfinished, written)
        self._put(
            op="text", key="parent", text=json.dumps(summary, indent=1, default=str), file="summary.json"
        )
        tags = {f"summary.{k}": _text(v) for k, v in summary.items() if not isinstance(v, dict)}
        every = {k: summary["trials"].get(k, 0) for k in S.STATES}  # 0s replace a resumed run's old counts
        tags.update({f"summary.trials.{k}": str(v) for k, v in every.items()})
        tags.update({f"search.trials.{k}": str(v) for k, v in every.items()})
        if unfinished:
            tags["interrupted"] = "true"
        ref = {
            k: summary[k]
            for k in (f"reference_{self.metric}", "best_vs_reference")
            if summary.get(k) is not None
        }
        self._log("parent", tags=tags, **({"metrics": ref, "step": 0} if ref else {}))
        self._put(op="status", key="parent", status="KILLED" if unfinished else "FINISHED", ts=_now_ms())
        self.runs.save()

    def _final_report(self, left: list[dict[str, Any]]) -> None:
        self.report = {
            "tracking_uri": redact(self.uri),
            "experiment": self.experiment,
            "parent_run": self.runs.run_id("parent"),
            "trial_runs": len([k for k in self.runs.data["runs"] if k != "parent"]),
            "written": self.queue.written,
            "unwritten": len(left),
            "pending_file": str(self.exp_dir / PENDING_FILE) if left else None,
            "last_error": self.queue.last_error,
        }
        if left:
            log.warning(
                "MLflow: %d records could not be written to %s (%s); they are kept in %s and written "
                "on the next resume of this study (or with search.tracking.replay_pending)",
                len(left),
                redact(self.uri),
                _short_reason(self.queue.last_error or "rejected"),
                self.exp_dir / PENDING_FILE,
            )
        else:
            log.info(
                "MLflow: %d records written to %s (experiment %s, parent run %s)",
                self.queue.written,
                redact(self.uri),
                self.experiment,
                self.runs.run_id("parent"),
            )

    def _summary(self, trials: list, unfinished: list[str], written: dict[str, Any]) -> dict[str, Any]:
        """The parent's summary; ``written`` is study.json as the study-state callback left it."""
        study = self.runs.data["study"]
        known = written.get("trials", {})
        states: dict[str, int] = {}
        for trial in trials:
            state = (known.get(trial.trial_id) or {}).get("state") or S.PENDING
            if trial.trial_id in unfinished:  # resume continues it
                state = S.PENDING
            states[state] = states.get(state, 0) + 1
        best, base = study.get("best"), study.get("base")
        improvement = None
        if best is not None and base is not None:
            improvement = best - base if self.mode == "max" else base - best
        ref = S.reference_summary(written)
        return {
            "reference_trial": ref["id"] if ref else None,
            f"reference_{self.metric}": ref["best_metric"] if ref else None,
            "best_vs_reference": ref["best_vs_reference"] if ref else None,
            "status": "interrupted" if unfinished else "finished",
            "metric": self.metric,
            "mode": self.mode,
            "best_trial": study.get("best_trial"),
            "best_run_id": self.runs.run_id(study.get("best_trial") or ""),
            f"best_{self.metric}": best,
            f"base_{self.metric}": base,
            "improvement": improvement,
            "trials_finished": study.get("finished"),
            "trials": states,
        }


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _error_text(trial: Any) -> str:
    """The trial's error file (Ray's traceback text), without terminal colour codes."""
    path = getattr(trial, "error_file", None)
    try:
        if path and Path(path).is_file():
            text = Path(path).read_text(errors="replace")
        else:
            text = str(trial.get_error() or "")
    except Exception:  # noqa: BLE001 - the error file is a nicety
        return ""
    return _ANSI.sub("", text)


def _error_line(text: str) -> str | None:
    """The exception line of a traceback (``Type: message``), one line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if (
            head
            and head.replace(".", "").replace("_", "").isalnum()
            and head.endswith(("Error", "Exception", "Interrupt", "Diverged"))
        ):
            return " ".join(ln.split())[:500]
    return " ".join(lines[-1].split())[:500] if lines else None


def make_callback(spec: Any, exp_dir: Path, resume: bool) -> MlflowTracker | None:
    """The study's MLflow tracker (None when ``SEARCH_NO_MLFLOW=1``). Checks the store first
    (:func:`check_tracking`: SpecError on ``tracking.uri``)."""
    if os.environ.get(DISABLE_ENV) == "1":
        return None
    check_tracking(spec)
    uri = tracking_uri(spec)
    versions = package_versions()
    commit = git_commit()
    tags = {
        "git_commit": commit,
        "mlflow.source.git.commit": commit.removesuffix("+dirty"),
        "seed": str(spec.train.seed),
        "search_seed": str(spec.search.seed),
        "base_weights_sha256": base_weights_sha256(spec),
        "dataset_fingerprint": dataset_fingerprint(spec),
        "search.experiment_dir": str(Path(exp_dir).resolve()),
        **{f"version.{k}": v for k, v in versions.items()},
    }
    s = spec.search
    params = {
        "task": spec.task,
        "arch": spec.model.arch,
        "weights": str(spec.model.weights or "none"),
        "metric": spec.objective.metric,
        "mode": spec.objective.mode,
        "algorithm": s.algorithm,
        "scheduler": s.scheduler,
        "reference_trial": json.dumps(spec.reference_params(), sort_keys=True),
        "num_trials": str(s.num_trials),
        "max_concurrent": str(s.max_concurrent),
        "epochs": str(spec.train.epochs),
        "batch_size": str(spec.train.batch_size),
        "image_size": str(spec.data.image_size),
        "seed": str(spec.train.seed),
    }
    return MlflowTracker(
        exp_dir=Path(exp_dir).resolve(),
        uri=uri,
        experiment=experiment_name(spec),
        name=spec.name,
        metric=spec.objective.metric,
        mode=spec.objective.mode,
        epochs=spec.train.epochs,
        parent_tags=tags,
        parent_params=flatten_params(params),
        resume=resume,
    )


def replay_pending(exp_dir: Path, timeout: float = 60.0) -> dict[str, int]:
    """Write the records a study left in ``mlflow_pending.jsonl`` (the store was unreachable);
    returns ``{"written", "left"}``."""
    exp_dir = Path(exp_dir)
    runs = RunMap(exp_dir)
    uri, experiment = study_tracking(exp_dir)
    recorded = runs.data.get("tracking_uri")
    if recorded and "***@" not in recorded:  # the store the records belong to (credentials come from env)
        uri, experiment = recorded, runs.data.get("experiment") or experiment
    queue = WriteQueue(uri, experiment, runs, exp_dir / PENDING_FILE)
    n = queue.load_pending()
    queue.start()
    left = queue.close(timeout)
    return {"written": n - len(left), "left": len(left)}


# ---------------------------------------------------------------- reading a study's store


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


# ---------------------------------------------------------------- registry URIs as base weights

WEIGHT_FILES = ("weights.pt", "model.pt", "best.pt")


def _parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, alias, version)."""
    rest = uri[len("models:/") :].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        return name, alias, None
    name, _, version = rest.rpartition("/")
    if not name or not version.isdigit():
        raise RegistryError(f"{uri!r} is not models:/NAME@ALIAS or models:/NAME/VERSION")
    return name, None, version


def resolve_model_uri(uri: str, tracking: str, cache_dir: Path | None = None) -> Path:
    """A local weights file for ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or
    ``runs:/RUN_ID/PATH`` on the store ``tracking``.

    The artifact is downloaded once into ``cache_dir`` (default ``~/.cache/search/registry``), under
    a folder per tracking store (a hash of its URI without credentials);
    a folder (a bundle from ``promote``) yields its ``weights.pt`` (a full state_dict), checked
    against the bundle's ``SHA256SUMS``. Raises :class:`RegistryError` with a one-line reason.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    cache = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "search" / "registry"
    # one cache per tracking store: the same name and version on two stores are different models
    cache = cache / hashlib.sha256(redact(tracking).encode()).hexdigest()[:16]
    mlc = client(tracking)
    try:
        if uri.startswith("models:/"):
            name, alias, version = _parse_models_uri(uri)
            mv = (
                mlc.get_model_version_by_alias(name, alias) if alias else mlc.get_model_version(name, version)
            )
            source, dest = mv.source, cache / "models" / clean_key(name).replace("/", "_") / f"v{mv.version}"
        elif uri.startswith("runs:/"):
            source = uri
            dest = cache / "runs" / uri[len("runs:/") :].strip("/").replace("/", "__")
        else:
            raise RegistryError(f"{uri!r} is not a models:/ or runs:/ URI")
        if not (dest / ".source").is_file():
            import shutil

            import mlflow.artifacts

            shutil.rmtree(dest, ignore_errors=True)
            tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            got = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=source, dst_path=str(tmp), tracking_uri=tracking
                )
            )
            (tmp / ".source").write_text(f"{got.relative_to(tmp)}\n")
            os.replace(tmp, dest)
    except RegistryError:
        raise
    except Exception as exc:  # noqa: BLE001 - one line for the spec error
        reason = " ".join(str(exc).split())[:300]
        raise RegistryError(f"cannot resolve {uri} on {redact(tracking)}: {reason}") from None
    rel = (dest / ".source").read_text().strip() if (dest / ".source").is_file() else "."
    got = dest / rel
    if got.is_file():
        return got
    for fname in WEIGHT_FILES:
        if (got / fname).is_file():
            _check_sums(got, fname)
            return got / fname
    found = sorted(p for p in got.rglob("*") if p.suffix in (".pt", ".pth"))
    if len(found) == 1:
        return found[0]
    raise RegistryError(f"{uri} holds no single weights file (looked for {', '.join(WEIGHT_FILES)})")


def _check_sums(folder: Path, fname: str) -> None:
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        return
    for line in sums.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if name.strip() == fname and sha256_file(folder / fname) != digest.strip():
            raise RegistryError(f"{folder / fname} does not match its SHA256SUMS entry (damaged download)")


def format_exception(exc: BaseException) -> str:  # pragma: no cover - debugging aid
    return "".join(traceback.format_exception(exc))
