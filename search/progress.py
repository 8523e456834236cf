"""Driver-side Ray Tune callbacks: ``study.json`` (:class:`StudyState`) and the progress lines
and table (:class:`Progress`). They are the only writers of the experiment's driver-side state.

Both are pickled by Ray (inside ``tuner.pkl``) when the Tuner is created; runtime references
(the searcher, the clock) are dropped from the pickle and set again by the launcher.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from ray.tune import Callback

from search import study as S
from search.failures import failure_reason, raised_itself
from search.run_map import RUNS_FILE
from search.study import group_of
from trainables.testhooks import pause_point


def _plain_params(config: dict[str, Any]) -> dict[str, Any]:
    return {
        str(k): v for k, v in sorted(config.items()) if isinstance(v, (str, int, float, bool)) or v is None
    }


# Driver-side files this project writes at the experiment root. Ray's restore copies every *.json
# and *.pkl of that root into its driver staging folder and later syncs that folder back: stale
# copies of these would overwrite the live files during a resumed run.
OWN_FILES = (S.STUDY_FILE, RUNS_FILE)


def forget_restored_copies(exp_dir: Path) -> list[str]:
    """Delete Ray's staged copies of :data:`OWN_FILES` for this experiment (after a restore they
    are the state saved at the interrupt). Returns the deleted paths. A no-op without Ray."""
    try:
        from ray.train.constants import _get_ray_train_session_dir

        root = Path(_get_ray_train_session_dir())
    except Exception:  # noqa: BLE001 - Ray not initialised (tests of the callback alone)
        return []
    gone = []
    for name in OWN_FILES:
        for path in root.glob(f"*/{Path(exp_dir).name}/driver_artifacts/{name}"):
            path.unlink(missing_ok=True)
            gone.append(str(path))
    return gone


def superseded_checkpoints(state: dict[str, Any], delete: bool = False) -> list[Path]:
    """The checkpoint folders of each trial older than its latest one, other than its best: Ray
    keeps every checkpoint (``num_to_keep=None``, launcher), as it would delete the one its newest
    signed state still names for a resume before that state is signed. Run (``delete``) once a
    snapshot holding ``state``'s latest checkpoints is current; a newer folder (an epoch being
    handed over) is never touched."""
    out = []
    for t in state.get("trials", {}).values():
        latest, best = t.get("latest_checkpoint"), t.get("checkpoint")
        if not latest or not t.get("trial_dir") or t.get("checkpoints_removed"):
            continue
        keep = {Path(latest).parent.name, Path(best).parent.name if best else None}
        newest = Path(latest).parent.name
        for folder in Path(t["trial_dir"]).glob("checkpoint_*"):
            if folder.name < newest and folder.name not in keep and folder.is_dir():
                out.append(folder)
                if delete:
                    shutil.rmtree(folder, ignore_errors=True)
    return out


def working_dir(trial: Any) -> Path | None:
    """``trial``'s Ray working directory on this node (``/tmp/ray/session_*/artifacts/<time>/<study>/
    working_dirs/<trial>``, outside the study folder), where its worker keeps its epoch checkpoints,
    the copies it hands to Ray and a restored checkpoint. Ray never deletes it; the worker empties
    it when the trial's function ends (search.worker), but a trial Ray stops waits in its report
    until its process is killed, its clean-up never run. None without Ray's storage context."""
    try:
        return Path(trial.storage.trial_working_directory)
    except Exception:  # noqa: BLE001 - a stand-in trial (tests of the callback alone)
        return None


def empty(folder: Path) -> None:
    """Delete what ``folder`` holds, not the folder."""
    for item in folder.glob("*"):
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)


class FolderGone(RuntimeError):
    """The experiment folder was deleted under a running study (its spec.yaml gone): the trials
    would each fail on their storage and the study end 'finished', all failed."""


class StudyState(Callback):
    """Keeps ``<exp>/study.json`` (DESIGN.md shape) up to date on every trial event.

    ``epochs`` is a full trial's epoch count; ``deadline`` (``time.time()``) tells a trial stopped
    by the time budget from one stopped by the scheduler. On resume the launcher passes the
    previous state (``previous``) so history and elapsed time carry over.
    """

    def __init__(
        self,
        exp_dir: Path,
        name: str,
        metric: str,
        mode: str,
        epochs: int,
        previous: dict[str, Any] | None = None,
    ):
        self.exp_dir = Path(exp_dir)
        self.metric, self.mode, self.epochs = metric, mode, int(epochs)
        self.state = previous or S.new_study(name, metric, mode)
        self.state.setdefault("trials", {})
        self.searcher: Any = None
        self.scheduler: Any = None
        self.deadline: float | None = None
        self.durable: Any = None  # a search.durable.Durability while Ray runs (not pickled)
        self.gone: FolderGone | None = None  # raised at a save: the folder was deleted under the study
        self._dirty = False
        self._t0 = time.time()
        self._elapsed0 = float(self.state.get("elapsed_s") or 0.0)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["searcher"] = None
        state["scheduler"] = None
        state["durable"] = None
        state["_dirty"] = False
        return state

    # -- helpers
    def elapsed(self) -> float:
        return self._elapsed0 + (time.time() - self._t0)

    def save(self, snapshot: bool = False, again: bool = False) -> None:
        """Rewrite study.json; with ``snapshot``, first sign Ray's state saved in this loop step
        together with this content (search.durable), so study.json is never ahead of it;
        ``again``: sign it although Ray saved nothing since (the study's own record changed)."""
        if self.durable is not None and not (self.exp_dir / S.SPEC_FILE).is_file():  # Ray runs it
            self.gone = FolderGone(
                f"the study folder {self.exp_dir} was removed while the study ran, so it stopped (what Ray "
                "wrote there since is no study: delete it); launch the spec again to start over."
            )
            raise self.gone
        self.state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.state["elapsed_s"] = round(self.elapsed(), 1)
        made = None
        if snapshot and self.durable is not None:
            made = self.durable.snapshot(self.state, again=again)
            pause_point("study_write")  # test hook: signed, study.json not yet rewritten
        S.write_study(self.exp_dir, self.state)
        if made is not None or (snapshot and self.durable is None):
            superseded_checkpoints(self.state, delete=True)

    def entry(self, trial: Any) -> dict[str, Any]:
        trials = self.state["trials"]
        t = trials.get(trial.trial_id) or self._restarted_here(trial.trial_id)
        if t is None:
            t = trials[trial.trial_id] = {
                "id": trial.trial_id,
                "index": len(trials),
                "state": S.PENDING,
                "epochs": 0,
                "best_metric": None,
                "best_epoch": None,
                "params": _plain_params(trial.config or {}),
                "checkpoint": None,
                "latest_checkpoint": None,
                "history": [],
                "error": None,
                "optuna_number": None,
                "node_id": None,
                "retries": 0,
                "disk_bytes": 0,
                "trial_dir": getattr(trial, "path", None),
            }
        if t.get("optuna_number") is None and self.searcher is not None:
            t["optuna_number"] = self.searcher.optuna_number(trial.trial_id)
        if not t.get("reference") and self.searcher is not None:
            t["reference"] = getattr(self.searcher, "reference_id", None) == trial.trial_id
        if t.get("recipe") is None and hasattr(self.searcher, "recipe_of"):
            t["recipe"] = self.searcher.recipe_of(trial.trial_id)
        lost = getattr(self.searcher, "replaces", lambda _: None)(trial.trial_id)
        if lost:  # it re-runs a trial a killed driver had started (MLflow: tag search.rerun_of)
            t["rerun_of"] = lost
        return t

    def _stop_record(self, trial: Any, t: dict[str, Any], by: str) -> dict[str, Any]:
        """Why a trial stopped early: the scheduler's record, or the time budget's."""
        record = None
        if by == "scheduler" and self.scheduler is not None and hasattr(self.scheduler, "stop_record"):
            record = self.scheduler.stop_record(trial.trial_id)
            by = getattr(self.scheduler, "stop_rule", by)
        if record is None:
            last = next((r for r in reversed(t.get("history") or []) if self.metric in r), {})
            record = {
                "epoch": int(t.get("epochs") or 0),
                "value": S.number(last.get(self.metric)),
                "cut": None,
                "group": group_of(t.get("params") or {})
                if getattr(self.scheduler, "grouped", True)
                else "all trials",
                "rule": by,
            }
        return dict(record)

    def _checkpoints(self, trial: Any, t: dict[str, Any]) -> None:
        try:
            manager = trial.run_metadata.checkpoint_manager
            best, latest = manager.best_checkpoint_result, manager.latest_checkpoint_result
        except AttributeError:  # pragma: no cover - Ray internals moved
            return
        if t.get("checkpoints_removed"):  # --keep-top deleted them; Ray's restored record still lists them
            best = latest = None
        if best is not None and best.checkpoint is not None and t.get("best_metric") is not None:
            t["checkpoint"] = str(Path(best.checkpoint.path) / S.MODEL_FILE)
        if latest is not None and latest.checkpoint is not None:
            t["latest_checkpoint"] = str(Path(latest.checkpoint.path) / S.MODEL_FILE)
        if t.get("trial_dir"):
            t["disk_bytes"] = S.dir_size(Path(t["trial_dir"]))

    # -- Ray hooks
    def setup(self, **info: Any) -> None:
        forget_restored_copies(self.exp_dir)
        self.state["status"] = "running"
        self._t0 = time.time()
        self.save()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        for each in trials:  # numbered as Ray created them (the searcher's order, the reference
            self.entry(each)  # first), not as they happen to start: two start in the same second
        t = self.entry(trial)
        t["state"] = S.RUNNING
        if t.pop("failure", None) is not None and t.get("error"):  # a restarted trial: not failed now
            t["last_error"], t["error"] = t["error"], None
        self._changed()
        pause_point("trial_start")  # test hook: a trial started, Ray has not saved that yet

    def _renumbered(self, t: dict[str, Any]) -> None:
        """The trial's Optuna number as the searcher has it now: a trial restarted after an error
        (``resume --restart-errored``) is a new Optuna trial, under its own id or a new one."""
        number = self.searcher.optuna_number(t["id"]) if self.searcher is not None else None
        if number is not None:
            t["optuna_number"] = number

    def _restarted_here(self, trial_id: str) -> dict[str, Any] | None:
        """``resume --restart-errored`` set the errored trials aside (``restarted_errored``), as
        Ray restarts them under new ids; one that Ray continues under its own id from its
        checkpoint (a worker that died) comes back with its history, no longer failed."""
        aside = self.state.get("restarted_errored") or []
        t = next((r for r in aside if r.get("id") == trial_id), None)
        if t is None:
            return None
        aside.remove(t)
        t.update(state=S.PENDING, optuna_number=None)  # on_trial_start clears its failure
        self.state["trials"][trial_id] = t
        return t

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        t = self.entry(trial)
        self._renumbered(t)
        t["state"] = S.RUNNING
        epoch = result.get("epoch")
        if result.get("node_id"):
            t["node_id"] = result["node_id"]
        row = {k: v for k, v in result.items() if k not in S.RAY_KEYS and not isinstance(v, (dict, list))}
        if isinstance(epoch, (int, float)):
            rows = [r for r in t["history"] if r.get("epoch") != epoch] + [row]
            t["history"] = sorted(rows, key=lambda r: r.get("epoch", 0))  # epoch 0 may come late
            t["epochs"] = max(int(epoch), int(t.get("epochs") or 0))
        value = S.number(result.get(self.metric))
        if result.get("diverged"):
            t["diverged"] = True
        elif epoch == 0:
            t["base_metric"] = S.number(result.get("base_metric", value))
            self.state["base_metric"] = S.study_base_metric(self.state)
        elif value is not None and S.better(value, t.get("best_metric"), self.mode):
            t["best_metric"], t["best_epoch"] = value, int(epoch)
        self._changed()

    def on_trial_save(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        t = self.entry(trial)
        self._checkpoints(trial, t)
        self._changed()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        t = self.entry(trial)
        self._checkpoints(trial, t)
        if t.get("diverged"):
            t["state"], t["failure"] = S.FAILED, S.DIVERGED
        elif t["epochs"] >= self.epochs:
            t["state"] = S.COMPLETE
        else:
            t["state"] = S.PRUNED
            t["stopped_by"] = (
                "time_budget" if self.deadline is not None and time.time() >= self.deadline else "scheduler"
            )
            t["stopped"] = self._stop_record(trial, t, t["stopped_by"])
        if self.searcher is not None:
            t["optuna_state"] = self.searcher.outcome(trial.trial_id)
        self._renumbered(t)
        self._changed()
        self._drop_work(trial)
        pause_point("trial_complete")  # test hook: Optuna was told, Ray has not saved the end yet

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        t = self.entry(trial)
        self._checkpoints(trial, t)
        t["state"], t["failure"] = S.FAILED, S.ERROR
        t["error"] = failure_reason(trial)
        if not raised_itself(self.exp_dir, trial.trial_id):
            t["retries"] = max(0, int(getattr(trial, "num_failures", 1)) - 1)
        if self.searcher is not None:
            t["optuna_state"] = self.searcher.outcome(trial.trial_id)
        self._changed()
        self._drop_work(trial)

    def _drop_work(self, trial: Any) -> None:
        """Empty the ended trial's working directory on this node (:func:`working_dir`): its
        checkpoints are in the study folder; a stopped trial's worker, blocked in its report,
        writes nothing. The folder stays: it is the current directory of the trial's process,
        which Ray may reuse for another trial (whose start reads it)."""
        if (work := working_dir(trial)) is not None:
            empty(work)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if raised_itself(self.exp_dir, trial.trial_id):  # no retry: its restart fails at once
            return
        t = self.entry(trial)
        t["retries"] = int(t.get("retries") or 0) + 1
        t["last_error"] = failure_reason(trial)  # MLflow's tag too; "error" is a failed trial's only
        t["state"] = S.PENDING
        self._changed()

    def _changed(self) -> None:
        """Save now, or (under a :class:`~search.durable.Durability`) once Ray's state holds the
        change: Ray saves it synchronously in this loop step, and :meth:`on_step_end` follows."""
        if self.durable is None:
            self.save()
            return
        self._dirty = True
        self.durable.request()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self._dirty:
            self._dirty = False
            self.save(snapshot=True)

    def finish(self, status: str) -> None:
        """Mark the study finished/interrupted; unfinished trials become PAUSED when interrupted."""
        self.state["status"] = status
        for t in self.state["trials"].values():
            if t["state"] in (S.RUNNING, S.PENDING) and status == "interrupted":
                t["state"] = S.PAUSED
            if t.get("trial_dir") and Path(t["trial_dir"]).is_dir():  # a trial stopped mid-epoch: not 0 B
                t["disk_bytes"] = S.dir_size(Path(t["trial_dir"]))
        self._dirty = False
        self.save(snapshot=True)  # with Ray's last save, at the end of fit


class Progress(Callback):
    """One line per trial event, and the table (trial, state, epoch, metric, best so far, key
    params) every ``table_every`` seconds and when a trial ends (:meth:`_ended`)."""

    def __init__(
        self,
        study: StudyState,
        num_trials: int,
        key_params: list[str],
        table_every: float = 60.0,
        stream: TextIO | None = None,
    ):
        shown = sorted(key_params, key=lambda n: (n != "lr", n not in S.STRUCTURAL, key_params.index(n)))
        self.study, self.num_trials, self.key_params = study, num_trials, shown[:6]  # lr, structure first
        self.table_every = table_every
        self._last_table = time.time()
        self._stream = stream

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_stream"] = None
        return state

    @property
    def out(self) -> TextIO:
        return self._stream or sys.stdout

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def _best(self) -> dict[str, Any] | None:
        return S.best_trial(list(self.study.state["trials"].values()), self.study.mode)

    def _params(self, t: dict[str, Any]) -> str:
        out = []
        for name in self.key_params:
            if name in t.get("params", {}):
                v = t["params"][name]
                out.append(f"{name}={S.fmt(v)}")  # as status and best print them
        return " ".join(out)

    def _line(self, t: dict[str, Any], what: str, result: dict[str, Any] | None = None) -> None:
        """One line; for a result, its own epoch and value (a shared base evaluation may arrive
        after epoch 1: it is still epoch 0)."""
        metric = self.study.metric
        last = t["history"][-1] if t.get("history") else {}
        epoch = t.get("epochs", 0)
        if result is not None and isinstance(result.get("epoch"), (int, float)):
            last, epoch = result, int(result["epoch"])
        value = S.number(last.get(metric))
        best = self._best()
        best_txt = f"{S.fmt(best['best_metric'])} ({best['id']})" if best else "-"
        val_txt = S.fmt(value) if value is not None else ("diverged" if last.get("diverged") else "-")
        self._print(
            f"[{_clock(self.study.elapsed())}] trial {t['index'] + 1}/{self.num_trials} {t['id']} "
            f"{what:<10} epoch {epoch}/{self.study.epochs} {metric}={val_txt} "
            f"best={best_txt} | {self._params(t)}"
        )

    def table(self) -> None:
        """Print the progress table now."""
        trials = sorted(self.study.state["trials"].values(), key=lambda t: t["index"])
        metric, width = self.study.metric, 12
        best = self._best()
        self._print(f"{'trial':<13} {'state':<10} {'epoch':>5} {metric:>{width}} {'best':>{width}}  params")
        for t in trials:
            last = t["history"][-1] if t.get("history") else {}
            value = S.number(last.get(metric))
            mark = " *" if best is not None and t["id"] == best["id"] else ""
            self._print(
                f"{t['id']:<13} {t['state']:<10} {t.get('epochs', 0):>5} "
                f"{S.fmt(value):>{width}} "
                f"{(S.fmt(t.get('best_metric'))):>{width}}  {self._params(t)}{mark}"
            )
        self._last_table = time.time()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        t = self.study.state["trials"].get(trial.trial_id)
        if t and not raised_itself(self.study.exp_dir, trial.trial_id):  # (Ray's restart of a
            self._line(t, "started")  # trial that raised only fails: its error line follows)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        t = self.study.state["trials"].get(trial.trial_id)
        if t:
            self._line(t, "diverged" if result.get("diverged") else "result", result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        t = self.study.state["trials"].get(trial.trial_id)
        if t:
            self._line(t, t["state"].lower())
            if t.get("stopped"):
                self._print(f"    {S.stop_text(t['stopped'], self.study.metric, self.study.mode)}")
            self._ended()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        t = self.study.state["trials"].get(trial.trial_id)
        if t:
            self._line(t, "error")
            self._print(f"    error: {t.get('error')}")
            self._ended()

    def _ended(self) -> None:
        """The table after a trial ended, unless one was printed in the last quarter of
        ``table_every`` (36 short trials printed 37 tables) or this was the study's last trial (the
        summary's table follows)."""
        ended = sum(t["state"] in S.FINISHED_STATES for t in self.study.state["trials"].values())
        if ended < self.num_trials and time.time() - self._last_table >= self.table_every / 4:
            self.table()

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        t = self.study.state["trials"].get(trial.trial_id)
        if t and not raised_itself(self.study.exp_dir, trial.trial_id):
            self._print(
                f"[{_clock(self.study.elapsed())}] trial {t['id']} failed ({t.get('last_error')}); "
                "retrying from its last checkpoint"
            )

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        due = self.table_every and time.time() - self._last_table >= self.table_every
        if due and self.study.state["trials"]:
            self.table()


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"
