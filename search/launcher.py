"""``launch``/``resume``/``--dry-run``: a study as a Ray Tune run with Optuna proposals.

One trial = :func:`train_trial` (a Ray function trainable) calling
``trainables.trial.run_trial``; its ``report`` goes to ``ray.tune.report`` with the epoch's
``latest.pt`` as a Ray checkpoint (one file, ``model.pt``). Ray keeps each trial's best checkpoint
(by the objective) and its latest (for resume). The experiment folder is
``<output_dir>/<name>/`` (DESIGN.md): Ray's storage, ``spec.yaml``, ``space.json``,
``optuna.journal``, ``study.json``.

Assumptions: the driver and every Ray node import the same ``search``/``trainables`` code and
see the spec's data at the same absolute paths; on a multi-node cluster ``output_dir`` is a shared
mount (checked before any trial starts). Errors are raised, never ``sys.exit``: the CLI picks exit
codes (:class:`ClusterError` is a user error).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from search import cluster, durable, mlflow_store, tracking
from search import study as S
from search.cluster import (
    as_ctrl_c,
    check_connected,
    check_reachable,
    connect,
    gcs_watch,
    given_address,
    stop_signals,
)
from search.cluster import shutdown as cluster_shutdown
from search.errors import SpecError, short
from search.failures import disk_full
from search.guards import StudyLock, check_output, lock_held, spec_inputs
from search.launch_text import mlflow_hint, print_header, print_summary
from search.registry import resolve_spec_weights
from search.samplers import num_samples
from search.schedulers import make_scheduler, resolved
from search.searcher import make_searcher
from search.spec import MAX_NAME, NAME, Spec, check_weights
from search.spec.schema import name_like
from search.stopping import BudgetStopper, NoStopping
from search.study_folder import (
    check_classes,
    check_store_there,
    install_state,
    never_started,
    read_spec,
    refuse_elsewhere,
    refuse_existing,
    remove_outside_top,
    resume_command,
    start_over,
    trim_kept,
    write_spec,
)
from search.worker import ERROR_MARK, TEST_FAIL_ENV, train_trial
from trainables.testhooks import pause_point

log = logging.getLogger(__name__)


RUNNING_FIX = "wait for it to end (status shows it), then resume if it was interrupted."


def preflight(spec: Spec, address: str | None, weights: bool = True) -> None:
    """Checks run before Ray starts or anything is written, cheapest first: the Ray address answers
    (or a local Ray's sockets fit: :class:`ClusterError`); the base weights load with ``weights_only``
    and fit the model (:class:`SpecError`); the MLflow store answers (SpecError on ``tracking.uri``),
    last: for SQLite it creates the folder of ``mlflow.db``. ``weights=False``: a resume's (the
    weights were checked at its launch; its fix cannot be to drop tracking.uri)."""
    address, key = given_address(address, spec.resources.address)
    if address:
        check_reachable(address, key=key)
    else:
        cluster.check_socket_room()
        cluster.check_local_room(spec.resources)
    resolve_spec_weights(spec)
    if weights and (spec.model.weights or spec.model.weights_backbone):
        check_weights(spec)
    _check_signing_key()
    mlflow_store.check_tracking(spec, again=None if weights else "resume")


def _check_signing_key() -> None:
    """The key that signs Ray's state (``search.durable``) can be read, or made where it is
    missing: with HOME unwritable the launch failed after Ray started ("FileNotFoundError:
    '/nonexistent'"), leaving a study folder that ``status`` could not read. A missing key is made
    when the study's state keeping starts (``durable.Durability``), after every check: a
    command refused by a later check makes nothing."""
    path = durable.key_path()
    try:
        if path.exists():
            durable.signing_key(create=False)
            return
        folder = next(p for p in (path.parent, *path.parent.parents) if p.exists())
        if not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
            raise PermissionError(errno.EACCES, f"{folder} is not a folder this user can write")
    except durable.SigningKeyError as exc:
        raise SpecError(durable.KEY_ENV, f"{exc.why}.", f"{exc.fix}.") from None
    except OSError as exc:
        why = f"cannot make the signing key {path} ({exc.strerror}): launch and resume sign Ray's state."
        fix = f"set {durable.KEY_ENV} to a file in a folder you can write (or make HOME writable)."
        raise SpecError(durable.KEY_ENV, why, fix) from None


def trial_dirname(trial: Any) -> str:
    """Short trial folder names: ``trial_<id>``."""
    return f"trial_{trial.trial_id}"


# ---------------------------------------------------------------- experiment folder


def _tracking_callbacks(spec: Spec, exp_dir: Path, resume: bool) -> list:
    """The MLflow callback (none when ``SEARCH_NO_MLFLOW=1``)."""
    cb = tracking.make_callback(spec, exp_dir, resume, expected=num_samples(spec))
    return [] if cb is None else [cb]


def _trainable(spec: Spec, exp_dir: Path | None = None):
    from ray import tune

    cfg = spec.trial_config(out_dir=Path("."), threads=max(1, int(spec.resources.cpu)))
    if exp_dir is not None:
        cfg = dataclasses.replace(cfg, base_eval_dir=Path(exp_dir) / S.BASE_EVAL_DIR)
    setup = {
        "trial_config": cfg,
        "cpu": spec.resources.cpu,
        "fail_when": os.environ.get(TEST_FAIL_ENV),
        "exp_dir": str(exp_dir) if exp_dir is not None else None,
    }
    fn = tune.with_parameters(train_trial, setup=setup)
    return tune.with_resources(fn, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})


def _key_params(spec: Spec) -> list[str]:
    return [d.name for d in spec.search_space.searched]


def _callbacks(spec: Spec, exp_dir: Path, resume: bool, previous: dict | None, extra: Iterable) -> list:
    from search.progress import Progress, StudyState

    state = StudyState(
        exp_dir, spec.name, spec.objective.metric, spec.objective.mode, spec.train.epochs, previous
    )
    progress = Progress(state, num_samples(spec), _key_params(spec))
    trackers = _tracking_callbacks(spec, exp_dir, resume)
    for tracker in trackers:
        tracker.study_state = state
    state.durable = durable.Durability(exp_dir)
    return [state, progress, *trackers, *extra]


# ---------------------------------------------------------------- launch / resume


def launch(
    spec: Spec,
    *,
    name: str | None = None,
    address: str | None = None,
    extra_callbacks: Iterable = (),
    keep_top: int | None = None,
) -> dict[str, Any]:
    """Run a study; returns the summary (see :func:`summarize`). ``interrupted`` in the summary
    means Ctrl-C stopped it (state saved; resume with the printed command)."""
    from ray import tune

    apply_name(spec, name)
    exp_dir = spec.experiment_dir
    check_output(exp_dir, spec_inputs(spec), "output_dir", folder=True)  # writable: named as the cause
    refuse_existing(exp_dir)
    preflight(spec, address, weights=True)  # bad input fails before Ray starts or anything is written
    lock = StudyLock(exp_dir).acquire()  # one writer per study folder (exit 2 names the holder)
    started = False
    new_store = mlflow_store.new_default_store(spec)
    try:
        refuse_existing(exp_dir, ours=True)  # again under the lock: another launch may have won the race
        start_over(exp_dir)  # a launch of it stopped before its first trial was saved
        mlflow_store.warm_up(spec)  # MLflow's import and store creation overlap ray.init
        address, named_in = given_address(address, spec.resources.address)
        shown = address if named_in != "resources.address" else None  # for the resume command
        started = connect(address)
        cluster = check_connected(spec.resources, address, started, exp_dir)
        write_spec(spec, exp_dir)
        budget = spec.search.time_budget
        deadline = time.time() + budget if budget else None
        recipe_trials = spec.recipe_trials()
        searcher = make_searcher(spec, exp_dir, deadline, recipe_trials)
        reference = recipe_trials[0][1] if recipe_trials else None
        scheduler = make_scheduler(spec)
        searcher.scheduler = scheduler  # asked why a trial stopped (what Optuna is told)
        callbacks = _callbacks(spec, exp_dir, False, None, extra_callbacks)
        state = callbacks[0]
        state.searcher, state.scheduler, state.deadline = searcher, scheduler, deadline
        state.state["reference_params"] = reference
        state.state["budget_s"] = budget
        state.state["num_trials"] = num_samples(spec)
        state.save()
        print_header(spec, exp_dir, cluster, recipe_trials)
        pause_point("launch_header")  # test hook: Ray started, the study's run not yet
        tuner = tune.Tuner(
            _trainable(spec, exp_dir),
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=scheduler,
                metric=spec.objective.metric,
                mode=spec.objective.mode,
                num_samples=num_samples(spec),
                max_concurrent_trials=spec.search.max_concurrent,
                reuse_actors=True,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=_run_config(spec, exp_dir, callbacks, deadline),
        )
        return _fit(tuner, spec, exp_dir, state, searcher, keep_top, shown)
    finally:
        if started:
            _shutdown()
        wrote = (exp_dir / S.SPEC_FILE).exists()
        if not wrote and new_store is not None:
            mlflow_store.remove_unused_store(new_store)
        lock.release(cleanup=not wrote)  # a launch that wrote nothing leaves nothing


def apply_name(spec: Spec, name: str | None) -> None:
    """``--name``: the study's name instead of the spec's, held to the same rules (the name's own,
    and its experiment folder is none of the inputs)."""
    if not name:
        return
    if not NAME.fullmatch(name) or len(name) > MAX_NAME:
        raise SpecError(
            "--name",
            f"must be at most {MAX_NAME} letters, digits, '_', '-' or '.', starting with a letter or "
            f"digit, but got {short(name)}.",
            f"write e.g. --name {name_like(name)}.",
        )
    check_output(spec.output_dir / name, spec_inputs(spec), "--name", folder=True, writable=False)
    spec.name = name


def _resumable(exp_dir: Path) -> None:
    """A SpecError when the folder holds nothing a resume can continue (yet)."""
    held = lock_held(exp_dir)
    if never_started(exp_dir) and not held:
        raise SpecError(
            "resume",
            f"{exp_dir}: its launch stopped before its first trial was saved, so there is nothing to resume.",
            "launch the spec again (the same launch command): it starts this study over.",
        )
    if (exp_dir / "tuner.pkl").is_file():
        return
    if held:
        raise SpecError(
            "resume", f"{exp_dir}: its launch is still starting (it holds the study)", RUNNING_FIX
        )
    raise SpecError(
        "resume",
        f"{exp_dir} holds no Ray experiment state (tuner.pkl), so there is nothing to resume",
        "resume the folder a 'launch' made (status and best read this one as it is), or launch the spec.",
    )


def resume(
    exp_dir: Path,
    *,
    restart_errored: bool = False,
    address: str | None = None,
    extra_callbacks: Iterable = (),
    keep_top: int | None = None,
    trust_folder: bool = False,
) -> dict[str, Any]:
    """Continue a study: ``Tuner.restore`` (unfinished trials from their checkpoints, pending ones
    run, the searcher keeps its place); errored trials restart only with ``restart_errored``.

    Ray's state is first replaced by the newest signed snapshot (``search.durable``); a missing or
    wrong signature is a :class:`SpecError` unless ``trust_folder``."""
    from ray import tune

    exp_dir = Path(exp_dir).resolve()
    _resumable(exp_dir)
    spec = read_spec(exp_dir)
    refuse_elsewhere(spec, exp_dir)
    check_store_there(spec, exp_dir)
    preflight(spec, address, weights=False)
    lock = StudyLock(exp_dir, fix=RUNNING_FIX).acquire()
    started = took_over = False
    try:
        check_classes(spec, exp_dir)
        install_state(exp_dir, trust_folder)  # before anything starts: a refusal leaves it all as it was
        previous = S.read_study(exp_dir) or None
        done = _nothing_left(previous or {}, restart_errored)
        previous = _previous_state(exp_dir, previous, restart_errored)
        mlflow_store.warm_up(spec)
        address, named_in = given_address(address, spec.resources.address)
        shown = address if named_in != "resources.address" else None  # for the resume command
        started = connect(address)
        cluster = check_connected(spec.resources, address, started, exp_dir)
        budget = spec.search.time_budget
        elapsed = float((previous or {}).get("elapsed_s") or 0.0)
        deadline = time.time() + max(0.0, budget - elapsed) if budget else None
        tuner = tune.Tuner.restore(
            str(exp_dir),
            trainable=_trainable(spec, exp_dir),
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=restart_errored,
        )
        local = tuner._local_tuner  # the restored TunerInternal: swap in this run's callbacks/stopper
        # HyperBand's brackets are not saved: restored, they can wait forever
        if resolved(spec.search.scheduler) == "hyperband":
            local._tune_config.scheduler = NoStopping()
            print(HYPERBAND_RESUMED, flush=True)
        searcher = local._tune_config.search_alg
        searcher.deadline = deadline
        callbacks = _callbacks(spec, exp_dir, True, previous, extra_callbacks)
        state = callbacks[0]
        state.searcher, state.deadline = searcher, deadline
        state.scheduler = searcher.scheduler = local._tune_config.scheduler
        if previous and hasattr(state.scheduler, "restore_history"):  # Ray saved none of its state
            state.scheduler.restore_history(previous["trials"].values())
        run_config = local.get_run_config()
        run_config.callbacks = callbacks
        run_config.stop = BudgetStopper(deadline)
        state.state["resumed"] = int(state.state.get("resumed") or 0) + 1
        state.save()
        took_over = True
        print_header(spec, exp_dir, cluster, resumed=True)
        if done:
            print(FINISHED_RESUMED.format("" if keep_top is None else " and applies --keep-top"), flush=True)
        return _fit(tuner, spec, exp_dir, state, searcher, keep_top, shown)
    finally:
        if started:
            _shutdown()
        lock.release(restore=not took_over)  # a refused resume leaves the lock file as it was


HYPERBAND_RESUMED = (
    "resume: Ray's HyperBand keeps no bracket state across a restart (a restored bracket can wait "
    "for ever for trials that ended): the remaining trials run to their last epoch without its halving"
)


FINISHED_RESUMED = (
    "  nothing left to run: the study had finished (this resume sends MLflow what it has not received{})"
)


def _nothing_left(study: dict[str, Any], restart_errored: bool) -> bool:
    """A finished study (every trial ended, or its time budget) with no failed trial to rerun."""
    errored = any(t.get("failure") == S.ERROR for t in study.get("trials", {}).values())
    return study.get("status") == "finished" and not (restart_errored and errored)


def _previous_state(exp_dir: Path, previous: dict | None, restart_errored: bool) -> dict[str, Any] | None:
    """study.json as the installed snapshot left it; with ``restart_errored``, errored trials move
    to ``restarted_errored`` (Ray reruns them as new trials: new ids, same config) and their error
    marks go, so their retries are no longer blocked. ``previous``: study.json's content, read once."""
    if previous and restart_errored:
        errored = [k for k, t in previous["trials"].items() if t.get("failure") == S.ERROR]
        previous.setdefault("restarted_errored", []).extend(previous["trials"].pop(k) for k in errored)
    if restart_errored:
        for mark in exp_dir.glob(f"trial_*/{ERROR_MARK}"):
            mark.unlink(missing_ok=True)
    return previous


class DiskFull(RuntimeError):
    """The disk (or quota) filled up under the study's driver: stopped, resumable (exit 1)."""


def _run_config(spec: Spec, exp_dir: Path, callbacks: list, deadline: float | None):
    from ray import tune

    return tune.RunConfig(
        name=exp_dir.name,
        storage_path=str(exp_dir.parent),
        callbacks=callbacks,
        stop=BudgetStopper(deadline),
        verbose=0,
        # every checkpoint (Ray deleted the previous latest before its new state was signed: a crash
        # then left a resume naming a deleted folder): progress.superseded_checkpoints keeps a
        # trial's best and latest once a snapshot naming them is current
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=None,
            checkpoint_score_attribute=S.CHECKPOINT_RANK,  # the first of tied epochs (search.worker)
            checkpoint_score_order=spec.objective.mode,
        ),
        failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
    )


def _shutdown() -> None:
    try:
        cluster_shutdown()
    except Exception:  # noqa: BLE001 - best effort at exit
        pass


@contextlib.contextmanager
def _sigterm_as_ctrl_c() -> Iterator[None]:
    """While Ray Tune runs, SIGTERM (``kill``, ``timeout``, a pod's deletion) is one Ctrl-C: Tune
    stops gracefully, state saved, exit 130 (Ray's own handler aborted the driver with a C++ dump)."""

    try:
        old = {sig: signal.signal(sig, as_ctrl_c) for sig in stop_signals()}  # SIGHUP too, unless nohup
    except ValueError:  # not the main thread (a test's launch): leave signals alone
        yield
        return
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _save_tracking(tuner) -> None:
    """MLflow's records not written yet, to the pending file that ``resume`` replays."""
    for callback in tuner._local_tuner.get_run_config().callbacks or []:
        if getattr(callback, "queue", None) is not None:
            callback.queue.close(5.0)


def _fit(
    tuner, spec: Spec, exp_dir: Path, state, searcher, keep_top: int | None, address: str | None
) -> dict[str, Any]:
    again = resume_command(exp_dir, keep_top, address)
    try:
        lost = gcs_watch(again, before_exit=lambda: _save_tracking(tuner))
        with durable.durable_controller(state.durable), _sigterm_as_ctrl_c(), lost:
            tuner.fit()
    except KeyboardInterrupt:  # a second Ctrl-C: Ray stops at once; the last checkpoints remain
        state.finish("interrupted")
        print(f"\nstopped immediately. Resume with:\n  {again}", file=sys.stderr, flush=True)
        raise
    except Exception as exc:
        if state.gone is not None:  # Ray wraps what the callback raised
            raise state.gone from None
        if (full := disk_full(exc) or disk_full(exc, (errno.EROFS,))) is None:  # full, or read-only
            raise
        for keep in (lambda: _save_tracking(tuner), lambda: state.finish("interrupted")):  # what still fits
            with contextlib.suppress(Exception):
                keep()
        fix = "Make it writable again" if full.errno == errno.EROFS else "Free some space"
        raise DiskFull(
            f"{full.strerror or full} ({full.filename or exp_dir}): the study stopped; its saved state and "
            f"checkpoints are kept. {fix}, then resume with: {again}"
        ) from None
    trials = state.state["trials"]
    unfinished = [t for t in trials.values() if t["state"] not in S.FINISHED_STATES]
    budget_hit = searcher.deadline is not None and time.time() >= searcher.deadline
    interrupted = bool(unfinished) or (len(trials) < num_samples(spec) and not budget_hit)
    state.state["budget_reached"] = budget_hit
    state.finish("interrupted" if interrupted else "finished")
    if keep_top is not None and interrupted:
        print(f"--keep-top {keep_top}: nothing removed (interrupted; resume with --keep-top)", flush=True)
    elif keep_top is not None:
        removed, trimmed = remove_outside_top(state.state, keep_top), trim_kept(state.state)
        if removed or trimmed:
            state.save(snapshot=True, again=True)  # signed as left: resume installs this record
            also = f" and the latest (not best) checkpoints of {trimmed} kept trial(s)" if trimmed else ""
            print(
                f"--keep-top {keep_top}: removed the checkpoints of {len(removed)} trial(s){also}", flush=True
            )
    summary = summarize(exp_dir)
    summary["mlflow"] = mlflow_hint(spec)
    summary["interrupted"] = interrupted
    summary["resume_command"] = again if interrupted else None
    summary["budget_reached"] = budget_hit
    print_summary(summary, spec)
    return summary


# ---------------------------------------------------------------- summary and cleanup


def summarize(exp_dir: Path) -> dict[str, Any]:
    """The ``status --json`` object plus counts and the MLflow hint."""
    out = S.status_object(exp_dir)
    counts: dict[str, int] = {}
    for t in out["trials"]:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    out["counts"] = counts
    out["experiment_dir"] = str(exp_dir)
    return out
