"""The Optuna side of a study: samplers, the journal storage, and Ray's searcher with correct states.

Ray's ``OptunaSearch`` tells Optuna COMPLETE with the *last* value for a trial the scheduler
stopped, reports intermediate values at ``training_iteration``, and misses the result that ends a
trial. :class:`StudySearch` fixes that for this project's trials (which report ``epoch`` 0 = the
base-model evaluation, then 1..epochs):

- intermediate values are reported at step = ``result["epoch"]`` (results without the metric, and
  the ``diverged`` report, are skipped);
- a trial that ran all epochs is COMPLETE with its best-epoch value (epochs >= 1, by mode);
- a trial that stopped before its last epoch (scheduler or time budget) is PRUNED, keeping its
  intermediate values, except one the scheduler stopped by a rule in :data:`VALUE_RULES` (its
  ``stop_record``): the learning-curve extrapolation stops a trial that has learned and cannot
  catch up, after half the epochs, so its best value so far stands for its result: COMPLETE with
  that value (user attribute ``stopped`` = the rule), where PRUNED would rank it behind every
  finished trial;
- a diverged trial (``diverged: 1``) or one that raised is FAIL.

Each Optuna trial carries the user attribute ``ray_trial_id``. The study lives in a
``JournalStorage`` file, so ``optuna`` itself can open it, and the searcher's pickled state (Ray's
experiment checkpoint) points at the same file when a run is resumed.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from search import study as S
from search.samplers import make_sampler

log = logging.getLogger(__name__)

# Scheduler stop rules whose trial Optuna is told as COMPLETE with its best value (module docstring).
VALUE_RULES = ("extrapolation",)


def journal_storage(path: Path) -> optuna.storages.BaseStorage:
    """An Optuna JournalStorage on a file (safe for one writer process; readable by optuna tools)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def mend_journal(path: Path) -> None:
    """Cut a torn last record (a full disk or a kill mid-write) off the journal. Optuna appends
    the next record to it, which glues the two into one line it then cannot read: every later
    resume failed."""
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(max(0, size - 1))
            if f.read(1) == b"\n":
                return
            f.seek(0)
            whole = f.read().rfind(b"\n") + 1
            f.truncate(whole)
    except OSError:  # none yet, or read-only: Optuna reads it as it is
        return
    log.warning("%s: its last record was cut off (%d bytes, not saved whole); removed it", path, size - whole)


def load_study(journal: Path, name: str) -> optuna.Study:
    """Open a study from its journal file (for tests and tools)."""
    return optuna.load_study(study_name=name, storage=journal_storage(journal))


class StudySearch(OptunaSearch):
    """``OptunaSearch`` with this project's states (see the module docstring).

    ``epochs`` is the number of training epochs of a full trial. ``deadline`` (a ``time.time()``
    value, or None) makes :meth:`suggest` return FINISHED once passed: no new trial starts after
    the time budget. ``scheduler`` (set by the launcher) is the study's scheduler, asked why it
    stopped a trial. Both are runtime state: :meth:`restore` keeps the values set by the launcher,
    and pickles leave the scheduler out (Ray pickles it on its own).
    """

    _RUNTIME = ("deadline", "scheduler")

    def __init__(self, *args: Any, epochs: int, deadline: float | None = None, **kwargs: Any):
        self.epochs = int(epochs)
        self.deadline = deadline
        self.scheduler: Any = None
        self._steps: dict[str, list[int]] = {}
        self._best: dict[str, tuple[float, int]] = {}
        self._last_epoch: dict[str, int] = {}
        self._diverged: set[str] = set()
        self._failed: set[str] = set()
        self._outcome: dict[str, str] = {}
        self.max_concurrent = 0
        self.reference_id: str | None = None
        self._orphans: list[int] = []  # Optuna trial ids asked but never saved in Ray's state
        self._replaces: dict[str, str] = {}  # Ray trial id -> the lost Ray trial id of its orphan
        super().__init__(*args, **kwargs)

    def enqueue_recipes(self, trials: list[tuple[str, dict[str, Any]]]) -> None:
        """Make the recipe's trials (``(scaling, params)``, :meth:`Spec.recipe_trials`) the next
        ones Optuna proposes, in order. The Ray trial that gets the first is :attr:`reference_id`
        (user attribute ``reference`` in Optuna); each carries its rule as user attribute ``recipe``."""
        for i, (scaling, params) in enumerate(trials):
            attrs = {"recipe": scaling, **({"reference": True} if i == 0 else {})}
            self._ot_study.enqueue_trial(dict(params), user_attrs=attrs, skip_if_exists=False)

    def recipe_of(self, trial_id: str) -> str | None:
        """The lr scaling rule of a recipe trial (``linear``, ``sqrt``), else None."""
        t = self._ot_trials.get(trial_id)
        return None if t is None else t.user_attrs.get("recipe")

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        """Limit concurrency here rather than in Ray's ConcurrencyLimiter, which drops the completion
        of a trial restarted after an error (``resume --restart-errored``)."""
        self.max_concurrent = int(max_concurrent)
        return True

    # -- suggestions
    def suggest(self, trial_id: str) -> dict | str | None:
        if self.deadline is not None and time.time() >= self.deadline:
            return Searcher.FINISHED
        live = [t for t in self._ot_trials if t not in self._completed_trials]
        if self.max_concurrent and len(live) >= self.max_concurrent:
            return None
        orphans = getattr(self, "_orphans", [])
        if trial_id not in self._ot_trials and orphans:  # its parameters, under the same Optuna number
            orphan = self._ot_trials[trial_id] = optuna.Trial(self._ot_study, orphans.pop(0))
            lost = orphan.user_attrs.get("ray_trial_id")
            if lost and lost != trial_id:
                self.__dict__.setdefault("_replaces", {})[trial_id] = lost
        config = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and isinstance(config, dict):
            if self.reference_id is None and ot_trial.user_attrs.get("reference"):
                self.reference_id = trial_id
            try:
                ot_trial.set_user_attr("ray_trial_id", trial_id)
            except Exception as exc:  # pragma: no cover - storage hiccup: not worth failing a trial
                log.warning("could not tag Optuna trial %s: %s", ot_trial.number, exc)
        return config

    def optuna_number(self, trial_id: str) -> int | None:
        t = self._ot_trials.get(trial_id)
        return None if t is None else t.number

    def replaces(self, trial_id: str) -> str | None:
        """The Ray trial id this trial stands in for: a trial the killed driver had started (its
        Optuna trial asked, maybe its MLflow run opened) that Ray's saved state never held, re-run
        here with the same parameters and Optuna number. None for every other trial."""
        return getattr(self, "_replaces", {}).get(trial_id)

    def outcome(self, trial_id: str) -> str | None:
        """COMPLETE / PRUNED / FAIL once told, else None."""
        return self._outcome.get(trial_id)

    # -- results
    def _note(self, trial_id: str, result: dict | None) -> None:
        if not result:
            return
        if result.get("diverged"):
            self._diverged.add(trial_id)
            return
        value, epoch = result.get(self.metric), result.get("epoch")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        if isinstance(epoch, bool) or not isinstance(epoch, (int, float)):
            return
        epoch = int(epoch)
        self._last_epoch[trial_id] = max(epoch, self._last_epoch.get(trial_id, -1))
        steps = self._steps.setdefault(trial_id, [])
        if epoch not in steps:
            self._ot_trials[trial_id].report(float(value), epoch)
            steps.append(epoch)
        best = self._best.get(trial_id)
        if epoch >= 1 and (best is None or (value > best[0] if self.mode == "max" else value < best[0])):
            self._best[trial_id] = (float(value), epoch)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self._ot_trials:
            self._adopt(trial_id, result)
        elif trial_id in self._completed_trials:
            if trial_id not in self._failed:
                return
            self._reopen(trial_id)  # an errored trial restarted under its own id
        if trial_id in self._ot_trials:
            self._note(trial_id, result)

    def _adopt(self, trial_id: str, result: dict | None) -> None:
        """Ray restarts an errored trial (``resume --restart-errored``) as a new trial id with the
        same config: attach it to a new Optuna trial with the errored one's parameters."""
        config = {k[len("config/") :]: v for k, v in (result or {}).items() if k.startswith("config/")}
        config.update((result or {}).get("config") or {})
        if not config:
            return
        adopted = {t.user_attrs.get("restarted_from") for t in self._ot_trials.values()}
        for old_id in sorted(self._failed):
            old = self._ot_trials[old_id]
            if old_id in self._diverged or old.number in adopted:
                continue
            if old.params and all(config.get(k) == v for k, v in old.params.items()):
                self._reopen(old_id, new_id=trial_id)
                return

    def _reopen(self, trial_id: str, new_id: str | None = None) -> None:
        """A new Optuna trial with the same parameters for a restarted errored trial."""
        old = self._ot_trials[trial_id]
        params = dict(old.params)
        kept = {
            k: old.user_attrs[k] for k in ("recipe", "reference") if k in old.user_attrs
        }  # still the recipe
        self._ot_study.enqueue_trial(params, user_attrs={"restarted_from": old.number}, skip_if_exists=False)
        new = self._ot_study.ask()
        if callable(self._space):
            self._space(new)  # registers the distributions; suggest_* returns the enqueued values
        if new_id is not None:  # the old id stays, told FAIL; the restart lives on under new_id
            trial_id = new_id
        for key, value in {"ray_trial_id": trial_id, "restarted_from": old.number, **kept}.items():
            new.set_user_attr(key, value)
        if kept.get("reference") and self.reference_id != trial_id:
            self.reference_id = trial_id  # the reference trial is its rerun now
        self._ot_trials[trial_id] = new
        self._completed_trials.discard(trial_id)
        self._failed.discard(trial_id)
        self._outcome.pop(trial_id, None)
        for table in (self._steps, self._best, self._last_epoch):
            table.pop(trial_id, None)
        self._diverged.discard(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self._ot_trials and result:
            self._adopt(trial_id, result)
        if trial_id in self._completed_trials and trial_id in self._failed and not error and result:
            self._reopen(trial_id)
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        if not error:
            self._note(trial_id, result)
        best = self._best.get(trial_id)
        last = self._last_epoch.get(trial_id, -1)
        stopped = self._value_stop(trial_id) if last < self.epochs else None
        if error or trial_id in self._diverged or (result or {}).get("diverged"):
            state, value = TrialState.FAIL, None
        elif best is not None and (last >= self.epochs or stopped):
            state, value = TrialState.COMPLETE, best[0]
        elif self._steps.get(trial_id):
            state, value = TrialState.PRUNED, None
        else:  # never reported anything (stopped before it started)
            state, value = TrialState.FAIL, None
        try:
            if best is not None:
                ot_trial.set_user_attr("best_epoch", best[1])
            if state == TrialState.COMPLETE and stopped:
                ot_trial.set_user_attr("stopped", stopped)
            ot_trial.set_user_attr(
                "outcome",
                "error" if error else "diverged" if trial_id in self._diverged else state.name.lower(),
            )
            self._ot_study.tell(ot_trial, value, state=state)
        except Exception as exc:  # Optuna refuses e.g. a second tell: log, keep the study going
            log.warning("Optuna tell failed for trial %s: %s", trial_id, exc)
        self._outcome[trial_id] = state.name
        if state == TrialState.FAIL:
            self._failed.add(trial_id)
        self._completed_trials.add(trial_id)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "scheduler": None}

    def save(self, checkpoint_path: str) -> None:
        """Ray's own save (a pickle of ``__dict__``, which bypasses ``__getstate__``), without the
        runtime scheduler."""
        scheduler, self.scheduler = self.scheduler, None
        try:
            super().save(checkpoint_path)
        finally:
            self.scheduler = scheduler

    def _value_stop(self, trial_id: str) -> str | None:
        """The scheduler's stop rule for the trial when it is one of :data:`VALUE_RULES`, else None."""
        record = getattr(self.scheduler, "stop_record", lambda _: None)(trial_id)
        rule = (record or {}).get("rule")
        return rule if rule in VALUE_RULES else None

    def restore(self, checkpoint_path: str) -> None:
        """Ray's restore on resume (the searcher comes unpickled, its journal not opened again):
        the journal is mended before anything reads or appends to it, and the byte offsets of its
        records that the pickled backend remembers are forgotten (read again from the file)."""
        keep = {k: getattr(self, k, None) for k in self._RUNTIME}
        super().restore(checkpoint_path)
        self.__dict__.update(keep)
        for storage in (self._storage, getattr(self._ot_study, "_storage", None)):  # maybe one object
            backend = getattr(storage, "_backend", None)
            if getattr(backend, "_file_path", None):
                mend_journal(Path(backend._file_path))
                backend._log_number_offset = {0: 0}  # as JournalFileBackend starts
        self._adopt_orphans()

    def _adopt_orphans(self) -> None:
        """Optuna trials left RUNNING by a hard stop that the restored searcher does not know (asked
        after Ray's last save, so no trial ran them as far as the study records) go to the next
        suggestions with their own parameters and Optuna numbers: none is lost, none is asked
        twice, and the journal holds no phantom trial."""
        known = {t.number for t in self._ot_trials.values()}
        running = self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        self._orphans = [t._trial_id for t in running if t.number not in known]
        if self._orphans:
            # the sampler's random state is from before those asks: it would draw them again
            self._ot_study.sampler.reseed_rng()
            log.info("re-running %d Optuna trial(s) asked before the last save", len(self._orphans))


def make_searcher(
    spec: Any, exp_dir: Path, deadline: float | None, recipes: list[tuple[str, dict[str, Any]]]
) -> StudySearch:
    """The study's searcher: the spec's sampler over its space, on the journal in ``exp_dir``,
    with the recipe's trials (:meth:`Spec.recipe_trials`) enqueued first and counted in the
    sampler's start-up."""
    s, space = spec.search, spec.search_space
    grid = space.grid() if s.algorithm == "grid" else None
    sampler = make_sampler(
        s.algorithm, s.seed, s.num_trials, s.n_startup_trials, grid, len(recipes), space.joint()
    )
    storage = journal_storage(exp_dir / S.JOURNAL_FILE)
    searcher = StudySearch(
        space=space.define_by_run,
        metric=spec.objective.metric,
        mode=spec.objective.mode,
        sampler=sampler,
        study_name=spec.name,
        storage=storage,
        epochs=spec.train.epochs,
        deadline=deadline,
    )
    searcher.enqueue_recipes(recipes)
    return searcher
