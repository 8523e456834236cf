"""Ordered, retried MLflow writes of a study, and what makes them durable.

Every write goes through :class:`WriteQueue`, executed in order by one background thread; a failed
write is retried with exponential backoff (the queue waits, keeping the order) and the queue
catches up when the store answers again. Whatever is still unwritten when the study ends is kept
in ``<exp>/mlflow_pending.jsonl`` and replayed on the next ``resume`` (or by
:func:`replay_pending`). ``<exp>/mlflow_runs.json`` (:class:`RunMap`) maps trial id -> run id
(atomic writes), so a restored study continues the SAME runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from search.mlflow_store import (
    client,
    get_or_create_experiment,
    redact,
    short_reason,
    store_moved_here,
    study_tracking,
    warmed,
)
from search.run_map import RunMap, read_pending, read_runs
from search.study import RAY_KEYS, atomic_write_text, number
from trainables.testhooks import pause_point

log = logging.getLogger(__name__)

PENDING_FILE = "mlflow_pending.jsonl"
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


def clean_key(key: str) -> str:
    """An MLflow-legal key (letters, digits, ``_ - . space / :``) of at most 250 characters."""
    key = _KEY_CHARS.sub("_", str(key)) or "_"
    if len(key) > MAX_KEY:
        key = key[: MAX_KEY - 9] + "~" + hashlib.sha1(key.encode()).hexdigest()[:8]
    return key


def text_value(value: Any) -> str:
    """A param or tag value as text (JSON for non-strings)."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def flatten_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts flattened with ``.``; values as text cut to MLflow's 6000 characters."""
    out: dict[str, str] = {}
    for k, v in (config or {}).items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_params(v, name + "."))
            continue
        text = text_value(v)
        out[clean_key(name)] = text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."
    return out


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


def metric_values(result: dict[str, Any], prefix: str = "", finite: bool = True) -> dict[str, float]:
    """The finite numeric entries of a trial result that are real metrics (no Ray bookkeeping);
    nested dicts (e.g. per-class AP) become ``outer/inner``. ``finite=False`` keeps NaN and
    infinities too (a diverged step's losses: MLflow stores NaN, and infinity as the largest float)."""
    out: dict[str, float] = {}
    for k, v in result.items():
        if not prefix and k in NOISE_KEYS:
            continue
        if isinstance(v, dict):
            out.update(metric_values(v, f"{prefix}{k}/", finite))
            continue
        num = number(v)
        if num is None and not finite and isinstance(v, float):
            num = v
        if num is not None:
            out[clean_key(f"{prefix}{k}")] = num
    return out


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
        self._closed = False
        self._busy = False
        self._client: Any = None
        self._experiment_id: str | None = None
        # (run id, metric, with values) -> the steps, or (step, value) points, in the store
        self._logged: dict[tuple[str, str, bool], set[Any]] = {}
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
        rejected) to the pending file; returns the unwritten ops. Once: a second close (a stop
        that saves MLflow's records after Ray's own clean-up closed the queue) finds nothing to
        write and leaves the pending file as the first one wrote it."""
        if self._closed:
            return []
        self._closed = True
        if self.down_since is not None and self.pending():  # the wait would pass in silence
            log.warning(
                "MLflow store %s still unavailable: waiting up to %.0fs for it, then %d record(s) are kept "
                "for the next resume", redact(self.uri), timeout, self.pending()
            )  # fmt: skip
        with self.cond:
            waiting = list(self.ops) + self.rejected
        if waiting:  # kept before the wait: a SIGKILL in it (a pod's grace period ending) loses none
            self.save_pending(waiting)
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

    def left_reason(self) -> str:
        """Why records are left: the store's error while it is down, else a rejection's, else no
        answer in time (an error from an outage that ended is not the reason)."""
        if self.last_error and self.down_since is not None:
            return self.last_error
        return self.rejected[0]["error"] if self.rejected else "the store did not answer within the wait"

    def save_pending(self, ops: list[dict[str, Any]]) -> None:
        if not ops:
            self.pending_path.unlink(missing_ok=True)
            return
        text = "".join(json.dumps(op, default=str) + "\n" for op in ops)
        atomic_write_text(self.pending_path, text)

    def load_pending(self) -> int:
        """Queue the ops saved by an earlier run (first, in their order); returns how many."""
        ops = read_pending(self.pending_path)
        for op in ops:
            op.pop("error", None)
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
                        short_reason(str(exc)),
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
            warmed(self.uri)
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
        if op.get("find") and self.runs.run_id(key) is None and self._tagged_run(key) is None:
            return  # a run a killed driver may have made before it saved the run map: there is none
        if kind == "open_run":
            self._open_run(op)
        elif kind == "adopt_run":
            self._adopt_run(op)
        elif kind == "log":
            run_id = self._run_id(key)
            metrics = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in op.get("metrics", [])]
            if op.get("once"):  # a resumed trial replays epochs the killed run had logged
                metrics = self._not_logged(run_id, metrics, with_value=False)
            if op.get("same"):  # the parent's end figures, said again by a pending replay or a resume
                metrics = self._not_logged(run_id, metrics, with_value=True)
            params = [Param(k, v) for k, v in op.get("params", {}).items()]
            tags = [RunTag(k, v[:MAX_TAG_VALUE]) for k, v in op.get("tags", {}).items()]
            if (
                len(metrics) + len(params) + len(tags) <= MAX_METRICS_PER_BATCH
                and len(params) <= MAX_PARAMS_PER_BATCH
                and len(tags) <= MAX_PARAMS_PER_BATCH
            ):
                if metrics or params or tags:  # one request
                    mlc.log_batch(run_id, metrics=metrics, params=params, tags=tags)
                    pause_point("mlflow_write")  # test hook: written, not yet taken off the queue
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

    def _not_logged(self, run_id: str, metrics: list, with_value: bool) -> list:
        """The metrics whose step (``with_value``: whose step and value) the run does not hold yet,
        read from the store once per run and metric."""
        out = []
        for m in metrics:
            seen = self._logged.get((run_id, m.key, with_value))
            if seen is None:
                history = self._mlc().get_metric_history(run_id, m.key)
                seen = {(h.step, h.value) if with_value else h.step for h in history}
                self._logged[(run_id, m.key, with_value)] = seen
            point = (m.step, m.value) if with_value else m.step
            if point not in seen:
                seen.add(point)
                out.append(m)
        return out

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
        tags = {**op.get("tags", {}), "search.run_key": self._run_key(key)}
        if op.get("parent"):
            tags["mlflow.parentRunId"] = self._run_id(op["parent"])
        # an earlier attempt (or a process killed before it saved the run map) may have created it
        if self._tagged_run(key) is not None:
            return
        run = mlc.create_run(self._exp_id(), start_time=op.get("ts"), tags=tags, run_name=op.get("name"))
        pause_point("mlflow_create")  # test hook: the run exists, the run map does not name it yet
        self.runs.set_run(key, run.info.run_id)

    def _run_key(self, key: str) -> str:
        """The ``search.run_key`` tag of ``key``'s run: this study's uid and the key."""
        return f"{self.runs.data['uid']}:{key}"

    def _tagged_run(self, key: str) -> str | None:
        """The id of the active run tagged with ``key``'s run key, if one exists (then named in the
        run map as ``key``'s: a run the map lacked because a killed driver never saved it)."""
        query = f"tags.`search.run_key` = '{self._run_key(key)}'"
        found = self._mlc().search_runs([self._exp_id()], query, max_results=1)
        if not found:
            return None
        self.runs.set_run(key, found[0].info.run_id)
        return found[0].info.run_id

    def _adopt_run(self, op: dict[str, Any]) -> None:
        """Give ``key`` the run of ``old``: a trial a killed driver had started (its run created,
        maybe named in the run map, maybe only by its ``search.run_key`` tag) that Ray's saved state
        never held, so that ``resume`` re-runs it as ``key`` (same parameters and Optuna number).
        The run is renamed and re-tagged (``op["tags"]``); without one, ``key`` gets a new run."""
        from mlflow.entities import RunTag

        mlc, key, old = self._mlc(), op["key"], op["old"]
        if self.runs.run_id(key) is not None:
            return
        run_id = self.runs.run_id(old) or self._tagged_run(old)
        if run_id is None:
            return
        tags = {**op.get("tags", {}), "search.run_key": self._run_key(key)}
        mlc.update_run(run_id, name=key)
        mlc.log_batch(run_id, tags=[RunTag(k, v[:MAX_TAG_VALUE]) for k, v in tags.items()])
        self.runs.move_run(old, key, run_id)


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


def recorded_store(exp_dir: Path) -> tuple[str, str]:
    """(tracking URI, experiment) a study's records went to: the run map's (credentials come from
    the environment), else its ``spec.yaml``'s (:func:`~search.mlflow_store.study_tracking`); for
    a folder moved or copied with its default store, the store beside it."""
    uri, experiment = study_tracking(exp_dir)
    recorded = read_runs(exp_dir)
    then = recorded.get("tracking_uri")
    if then and "***@" not in then and not store_moved_here(then, exp_dir):
        uri = then
    return uri, recorded.get("experiment") or experiment


def replay_pending(exp_dir: Path, timeout: float = 60.0) -> dict[str, int]:
    """Write the records a study left in ``mlflow_pending.jsonl`` (the store was unreachable);
    returns ``{"written", "left"}``."""
    exp_dir = Path(exp_dir)
    uri, experiment = recorded_store(exp_dir)
    queue = WriteQueue(uri, experiment, RunMap(exp_dir), exp_dir / PENDING_FILE)
    n = queue.load_pending()
    queue.start()
    left = queue.close(timeout)
    return {"written": n - len(left), "left": len(left)}
