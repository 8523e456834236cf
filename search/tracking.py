"""MLflow recording of a study: one driver-side writer, a Ray Tune :class:`MlflowTracker` callback.

Trials never talk to MLflow. The tracker turns Tune events into MLflow records with the
``MlflowClient`` API and explicit run ids (never the fluent active-run stack), through the ordered,
retried :class:`~search.write_queue.WriteQueue` (outages, catch-up, the pending file), on the store
of :mod:`search.mlflow_store`:

- one MLflow experiment per study (``tracking.experiment``, default the spec's name);
- a parent run per study: spec and search space as artifacts; tags for the git commit, package
  versions, seeds, base weights sha256 and dataset fingerprint (:mod:`search.facts`);
  ``base_<metric>`` (the base model's epoch-0 metrics); ``best_<metric>`` stepped by the number of
  finished trials; a final ``summary.json`` and ``summary.*``/``search.trials.*`` tags;
- one nested child run per trial (tag ``mlflow.parentRunId``): the sampled params under their spec
  names, per-epoch metrics with ``step = epoch`` (Ray's bookkeeping keys are left out),
  ``best_<metric>`` and ``best_epoch``; status FINISHED (``stopped_early=true`` and ``stopped_at_epoch``
  when stopped early), FAILED for diverged/errored trials (``failure_reason`` tag, ``traceback.txt``
  artifact), KILLED when the study was interrupted.

Resume: the run map (``mlflow_runs.json``) and the ``search.run_key`` tag name the runs, so a restored
study continues the SAME runs (RUNNING again, then closed), and replayed epochs are logged once. A trial
Ray's saved state never held is re-run as a new trial (``StudySearch.replaces``) in its run."""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from search import study as S
from search.facts import parent_record, trial_tags
from search.failures import error_line, error_text, failure_reason, raised_itself
from search.mlflow_store import (
    DISABLE_ENV,
    check_tracking,
    experiment_name,
    is_http,
    limit_http_retries,
    redact,
    short_reason,
    tracking_uri,
)
from search.run_map import RunMap
from search.study import SPACE_FILE, SPEC_FILE
from search.write_queue import (
    MAX_TAG_VALUE,
    PENDING_FILE,
    WriteQueue,
    flatten_params,
    metric_values,
    text_value,
)

try:  # the callback base class; everything else here also works without Ray
    from ray.tune import Callback as _Callback
except ImportError:  # pragma: no cover - ray is a dependency
    _Callback = object  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

FLUSH_ENV = "SEARCH_MLFLOW_FLUSH_S"  # seconds to wait for the queue at the end of a study
_ENDINGS = ["stopped_early", "stopped_at_epoch", "failure_reason", "interrupted", "diverged"]  # rerun: drop


def _now_ms() -> int:
    return int(time.time() * 1000)


def _locked(method: Any) -> Any:
    """Run a hook holding the run map's lock (the writer thread saves the same dict)."""

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
        expected: int = 0,
        flush_timeout: float | None = None,
    ):
        self.exp_dir = Path(exp_dir)
        self.uri, self.experiment, self.name = uri, experiment, name
        self.metric, self.mode, self.epochs = metric, mode, int(epochs)
        self.parent_tags, self.parent_params = dict(parent_tags), dict(parent_params)
        self.resume, self.expected = resume, expected  # expected: the trials the study makes
        env_flush = os.environ.get(FLUSH_ENV)
        self.flush_timeout = float(flush_timeout if flush_timeout is not None else env_flush or 60.0)
        self.max_backoff = 15.0  # seconds between retries while the store is down (at most)
        self._init_runtime()

    def _init_runtime(self) -> None:
        self.runs: RunMap | None = None
        self.queue: WriteQueue | None = None
        self.report: dict[str, Any] | None = None
        self._active: set[str] = set()
        self.study_state: Any = None  # the launcher's progress.StudyState: study.json as it is now

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for k in ("runs", "queue", "report", "_active", "study_state"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

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
            once=key != "parent" and (self.resume or bool(self.runs.trial(key).get("replay"))),
            same=key == "parent",  # its step-0 figures, said at each end: a value once (a new one wins)
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
            "git_commit": self.parent_tags.get("git_commit", "unknown"),  # a resume's trials: its own
        }
        searcher = getattr(self.study_state, "searcher", None)
        lost = None if reopened else getattr(searcher, "replaces", lambda _: None)(tid)
        if lost:  # it re-runs a trial the killed driver had started: that trial's run is its run
            self.runs.data["trials"].pop(lost, None)
            self._put(op="adopt_run", key=tid, old=lost, tags={**tags, "search.rerun_of": lost})
        self._put(
            op="open_run", key=tid, name=tid, parent="parent", ts=_now_ms(), tags=tags, reopen_clear=_ENDINGS
        )
        if not reopened:
            self._log(tid, params=flatten_params(dict(trial.config or {})))
        else:
            self._log(tid, tags={"resumed": "true", **self._resumed_with()})

    def _resumed_with(self) -> dict[str, str]:
        return {"resumed_git_commit": self.parent_tags.get("git_commit", "unknown")}

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
            if status == "FINISHED" and S.better(st.get("best"), study.get("best"), self.mode):
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
            limit_http_retries()
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
        if resumed:  # its tags stay the launch's; the code that goes on with it is said beside them
            self._log("parent", tags={"resumed": "true", **self._resumed_with()})
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
        epoch = S.number(result.get("epoch"))
        if epoch is None:
            return
        epoch = int(epoch)
        st = self.runs.trial(tid)
        st["last_epoch"] = epoch
        counts = {
            k: float(result[k])
            for k in ("trainable_params", "frozen_params")
            if S.number(result.get(k)) is not None
        }
        if counts and not st.get("counts"):  # the same at every report: once per run
            self._log(tid, metrics=counts, step=0)
            st["counts"] = True
        if result.get("diverged"):
            st["diverged"] = epoch
            losses = {k: v for k, v in metric_values(result, finite=False).items() if k != self.metric}
            self._log(tid, metrics=losses, step=epoch, tags={"diverged": "true"})
            self.runs.save()
            return
        values = metric_values(result)
        if epoch >= 1:
            value = S.number(result.get(self.metric))
            if value is not None and S.better(value, st.get("best"), self.mode):
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
            and not study.get("base_plain")  # also over the stand-in of an interrupted run (below)
            and S.number(result.get(self.metric)) is not None
        ):
            study["base"], study["base_plain"] = S.number(result.get(self.metric)), True
            base = {f"base_{k}": v for k, v in values.items()}
            self._log(
                "parent", metrics=base, step=0, tags={"base_metric": repr(study["base"]), "base_trial": tid}
            )
        self.runs.save()

    @_locked
    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        st = self.runs.trial(trial.trial_id)
        if st.get("diverged") is not None:
            reason = f"diverged: non-finite loss in epoch {st['diverged']}"
            tags = {"failure_reason": reason, "diverged": "true", **self._study_tags(trial.trial_id)}
            self._close_trial(trial, "FAILED", tags)
            return
        last = st.get("last_epoch")
        tags = {}
        if last is None or last < self.epochs:
            tags = {"stopped_early": "true", "stopped_at_epoch": str(last if last is not None else 0)}
        tags.update(self._study_tags(trial.trial_id))
        self._close_trial(trial, "FINISHED", tags)

    def _study(self) -> dict[str, Any]:
        """study.json as the study-state callback (it runs first) has it: in memory while the
        launcher runs (the file follows a loop step later), else the file ({} if unreadable)."""
        if self.study_state is not None:
            return self.study_state.state
        try:
            return S.read_study(self.exp_dir)
        except (OSError, ValueError):
            return {}

    def _study_tags(self, tid: str) -> dict[str, str]:
        """:func:`~search.facts.trial_tags` of the trial's record in :meth:`_study`."""
        return trial_tags(self._study().get("trials", {}).get(tid) or {})

    @_locked
    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        text = error_text(trial)
        line = error_line(text) or "the trial raised (no error text)"
        self._close_trial(
            trial, "FAILED", {"failure_reason": line[:MAX_TAG_VALUE], **self._study_tags(trial.trial_id)}
        )
        if text:
            self._put(op="text", key=trial.trial_id, text=text, file="traceback.txt")

    @_locked
    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if raised_itself(self.exp_dir, trial.trial_id):  # no retry: its restart fails at once
            return
        self.runs.trial(trial.trial_id)["replay"] = True  # its retry repeats epochs since its checkpoint
        tries, why = int(getattr(trial, "num_failures", 0) or 0), failure_reason(trial) or ""
        self._log(trial.trial_id, tags={"retries": str(tries), "last_error": why[:MAX_TAG_VALUE]})

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
            unfinished.append(tid)  # study tags: it may not have reported, so say reference/recipe here
            self._kill(tid, self._study_tags(tid))
            self._active.discard(tid)
        # a trial a killed driver had started and no trial re-ran (the time budget ran out first): its
        # Optuna trial stays RUNNING for a later resume; its run (if any, maybe only tagged) ends KILLED
        known = {t.trial_id for t in trials}
        for tid, st in list(self.runs.data["trials"].items()):
            if tid not in known and not st.get("done"):
                self._kill(tid, {})
        deadline = getattr(self.study_state, "deadline", None)
        if len(trials) < self.expected and (deadline is None or time.time() < deadline):
            unfinished.append("")  # trials not created yet: interrupted, as the launcher counts it
        study = self.runs.data["study"]
        written = self._study()  # the study-state callback's record: states, reference, epoch 0s
        ended = {**written, "status": "interrupted" if unfinished else "finished"}  # as finish() writes
        base = S.study_base_metric(ended)  # the number status shows (finished: maybe a stand-in)
        if not study.get("base_plain") and base != study.get("base"):
            study["base"] = base
            if base is not None:
                said = {"base_metric": repr(base)}
                self._log("parent", metrics={f"base_{self.metric}": base}, step=0, tags=said)
        summary = self._summary(trials, unfinished, written)
        text = json.dumps(summary, indent=1, default=str)
        self._put(op="text", key="parent", text=text, file="summary.json")
        tags = {f"summary.{k}": text_value(v) for k, v in summary.items() if not isinstance(v, dict)}
        tags.update({"best_trial": summary["best_trial"]} if summary["best_trial"] else {})  # (finish order)
        every = {k: summary["trials"].get(k, 0) for k in S.STATES}  # 0s replace a resumed run's old counts
        tags.update({f"summary.trials.{k}": str(v) for k, v in every.items()})
        tags.update({f"search.trials.{k}": str(v) for k, v in every.items()})
        if unfinished:
            tags["interrupted"] = "true"
        names = (f"reference_{self.metric}", "best_vs_reference")
        ref = {k: summary[k] for k in names if summary.get(k) is not None}
        self._log("parent", tags=tags, **({"metrics": ref, "step": 0} if ref else {}))
        self._put(op="status", key="parent", status="KILLED" if unfinished else "FINISHED", ts=_now_ms())
        self.runs.save()

    def _kill(self, tid: str, tags: dict[str, str]) -> None:
        """End an unfinished trial's run KILLED, ``interrupted``, PENDING; a run neither named in the
        run map nor opened here (a killed driver's) is looked up by its run key, if it exists."""
        find = self.runs.run_id(tid) is None and tid not in self._active
        said = {**tags, "interrupted": "true", "search.state": S.PENDING}
        self._put(op="log", key=tid, tags=said, find=find)
        self._put(op="status", key=tid, status="KILLED", ts=_now_ms(), find=find)

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
                "by the next resume of this study (python -m search resume %s; also once it has finished)",
                len(left),
                redact(self.uri),
                short_reason(self.queue.left_reason()),
                self.exp_dir / PENDING_FILE,
                self.exp_dir,
            )
        else:
            where = (redact(self.uri), self.experiment, self.runs.run_id("parent"))
            log.info(
                "MLflow: %d records written to %s (experiment %s, parent run %s)", self.queue.written, *where
            )

    def _summary(self, trials: list, unfinished: list[str], written: dict[str, Any]) -> dict[str, Any]:
        """The parent's summary; ``written`` is study.json as the study-state callback left it (a tie
        for best goes to the first proposed trial, as in status)."""
        study = self.runs.data["study"]
        known = written.get("trials", {})
        states: dict[str, int] = {}
        for trial in trials:
            state = (known.get(trial.trial_id) or {}).get("state") or S.PENDING
            if trial.trial_id in unfinished:  # resume continues it
                state = S.PENDING
            states[state] = states.get(state, 0) + 1
        # the best ended trial, as best_<metric> (an interrupted one's id went with another's value)
        ended = [t for k, t in known.items() if t.get("state") in S.ENDED_RUNS and k not in unfinished]
        best_id = (S.best_trial(ended, self.mode) or {}).get("id") or study.get("best_trial")
        best, base, ref = study.get("best"), study.get("base"), S.reference_summary(written) or {}
        return {
            "reference_trial": ref.get("id"),
            f"reference_{self.metric}": ref.get("best_metric"),
            "best_vs_reference": S.gain(best, ref.get("best_metric"), self.mode),
            "status": "interrupted" if unfinished else "finished",
            "metric": self.metric,
            "mode": self.mode,
            "best_trial": best_id,
            "best_run_id": self.runs.run_id(best_id or ""),
            f"best_{self.metric}": best,
            f"base_{self.metric}": base,
            "improvement": S.gain(best, base, self.mode),
            "trials_finished": study.get("finished"),
            "trials": states,
        }


def make_callback(spec: Any, exp_dir: Path, resume: bool, expected: int = 0) -> MlflowTracker | None:
    """The study's MLflow tracker (None when ``SEARCH_NO_MLFLOW=1``; ``expected``: the trials the study
    makes, fewer at the end = interrupted). Checks the store first (SpecError on ``tracking.uri``)."""
    if os.environ.get(DISABLE_ENV) == "1":
        return None
    check_tracking(spec)
    tags, params = parent_record(spec, exp_dir)
    return MlflowTracker(
        exp_dir=Path(exp_dir).resolve(),
        uri=tracking_uri(spec),
        experiment=experiment_name(spec),
        name=spec.name,
        metric=spec.objective.metric,
        mode=spec.objective.mode,
        epochs=spec.train.epochs,
        parent_tags=tags,
        parent_params=flatten_params(params),
        resume=resume,
        expected=expected,
    )
