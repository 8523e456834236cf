"""Which study folder a launch or resume may use: ``launch`` never into one that holds a study,
``resume`` only in the folder the study ran in and only from Ray state this user signed
(:mod:`search.durable`), with nothing else in the folder that Ray would unpickle."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shlex
import shutil
from pathlib import Path
from typing import Any

import yaml

from search import durable, facts, guards, mlflow_store, run_map, write_queue
from search import study as S
from search.errors import SpecError

log = logging.getLogger(__name__)

# Ray pickles an errored trial's exception here and unpickles it when it builds the results; no
# snapshot signs it (Ray writes it between snapshots), so resume removes it (error.txt stays).
UNSIGNED_PICKLES = ("trial_*/error.pkl",)


class ExperimentExists(Exception):
    """``launch`` into a folder that already holds a study (use ``resume`` or ``--name``)."""


def resume_command(exp_dir: Path, keep_top: int | None = None, address: str | None = None) -> str:
    """The exact command that continues the study: with the cluster it ran on (``--address`` or
    ``RAY_ADDRESS``; without it a resume starts a Ray of its own, bypassing the cluster) and
    ``--keep-top``, which an interrupted study has not applied yet."""
    where = f" --address {shlex.quote(address)}" if address else ""
    keep = f" --keep-top {keep_top}" if keep_top is not None else ""
    return f"python -m search resume {shlex.quote(str(exp_dir))}{where}{keep}"


# What a launch writes in its experiment folder before its first trial is saved (and later).
LAUNCH_FILES = (
    *(S.SPEC_FILE, S.STUDY_FILE, S.SPACE_FILE, f"{S.JOURNAL_FILE}*", S.BASE_EVAL_DIR, "trial_*"),
    *(run_map.RUNS_FILE, write_queue.PENDING_FILE, durable.STATE_DIR, guards.LOCK_FILE, facts.FACTS_FILE),
    *(*durable.RAY_STATE, "basic-variant-state-*.json", ".validate_storage_marker"),
)


TRIAL_RUNS = "local"  # `search trial`'s outputs by default: <experiment folder>/local/<time>
LEFT_BY_A_KILL = ".*.tmp"  # a file being replaced (study.atomic_write_text) when a SIGKILL came


def _launch_file(name: str) -> bool:
    """A name a launch writes in its folder, a leftover of one killed, or ``trial``'s own runs
    (kept: :func:`start_over` leaves them)."""
    return any(fnmatch.fnmatchcase(name, p) for p in (*LAUNCH_FILES, TRIAL_RUNS, LEFT_BY_A_KILL))


def never_started(exp_dir: Path) -> bool:
    """A launch that stopped (Ctrl-C, SIGTERM, SIGKILL) before Ray's state was first saved and
    signed, which happens when its first trial is added: no signed snapshot, no trial in
    study.json, no checkpoint, and nothing in the folder a launch does not write (``trial``'s
    runs aside: :func:`start_over` keeps them). Nothing in it
    can be resumed; ``launch`` starts it over (:func:`start_over`)."""
    exp_dir = Path(exp_dir)
    if (
        not exp_dir.is_dir()
        or not (exp_dir / S.SPEC_FILE).is_file()
        or any(exp_dir.glob("trial_*/checkpoint_*"))
    ):
        return False
    if not all(_launch_file(p.name) for p in exp_dir.iterdir()):
        return False
    try:
        if durable.current_snapshot(exp_dir) is not None:
            return False
        return not S.read_study(exp_dir).get("trials")
    except (durable.UntrustedState, S.StudyFileError):
        return False


def start_over(exp_dir: Path) -> bool:
    """Clear a study that :func:`never_started` (the caller holds its lock): its MLflow runs that
    the stop left RUNNING end KILLED, and every file the launch wrote goes. True when it did."""
    if not never_started(exp_dir):
        return False
    _end_left_runs(exp_dir)
    for path in Path(exp_dir).iterdir():
        if path.name not in (guards.LOCK_FILE, TRIAL_RUNS):  # `trial`'s runs are the user's
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    print(
        f"{exp_dir}: its launch stopped before its first trial was saved (nothing to resume): starting over"
    )
    return True


def _end_left_runs(exp_dir: Path) -> None:
    runs = run_map.read_runs(exp_dir).get("runs") or {}
    if not runs:
        return
    try:
        uri, _ = write_queue.recorded_store(exp_dir)
        if mlflow_store.missing_sqlite(uri):
            return
        mlc = mlflow_store.client(uri)
        for run_id in runs.values():
            if mlc.get_run(run_id).info.status == "RUNNING":
                mlc.set_terminated(run_id, "KILLED")
    except Exception as exc:  # noqa: BLE001 - best effort: the new launch records anew
        log.warning("could not end the stopped launch's MLflow runs: %s", exc)


def gone_text(exp_dir: Path) -> str:
    """What ``status`` says of a study whose launch or resume process is gone."""
    if never_started(exp_dir):
        return "its launch stopped before its first trial was saved: launch it again (it starts over)"
    return "its launch or resume process is gone: resume it"


def refuse_existing(exp_dir: Path, ours: bool = False) -> None:
    """:class:`ExperimentExists` when ``exp_dir`` already holds a study (launch never overwrites;
    ``ours``: this process holds the folder's lock, so the one that wrote it has ended) or files a
    launch does not write (it wrote its study in among them). A study that :func:`never_started`
    is not refused: the launch starts it over."""
    if never_started(exp_dir):
        return
    if (exp_dir / S.STUDY_FILE).exists() or (exp_dir / "tuner.pkl").exists():
        then = f"Resume it with {resume_command(exp_dir)}"
        if not ours and guards.lock_held(exp_dir):  # its launch or resume runs now: a resume would be refused
            then = "A launch or resume of it is running now"
        raise ExperimentExists(
            f"experiment folder {exp_dir} already holds a study. {then}, or launch with --name NEW_NAME."
        )
    names = sorted(p.name for p in exp_dir.iterdir()) if exp_dir.is_dir() else []
    if others := [n for n in names if not _launch_file(n)]:
        raise ExperimentExists(  # a study written in among them: --keep-top, a resume, the UI
            f"experiment folder {exp_dir} holds files a launch does not write ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}). Move them away, or launch with --name NEW_NAME."
        )


def refuse_elsewhere(spec: Any, exp_dir: Path) -> None:
    """A study resumes only in the folder it was launched in: a copy's or a moved folder's
    records (Ray's, the MLflow store's, the spec's output_dir) point there, so a resume of a copy
    wrote into the original (and ``--keep-top`` deleted the original's checkpoints)."""
    ran, here = spec.experiment_dir.resolve(), Path(exp_dir).resolve()
    if ran == here:
        return
    uids = [run_map.read_runs(p).get("uid") for p in (ran, here)]
    if not (ran / S.STUDY_FILE).is_file():
        what, fix = f"moved here from {ran}", f"move it back to {ran} and resume it there"
    elif None in uids or uids[0] == uids[1]:
        what, fix = f"a copy of the study in {ran}", f"resume {ran} itself, or launch anew with --name"
    else:  # another study took the folder it ran in
        what, fix = f"moved here from {ran}, where another study lies now", "launch it anew with --name"
    raise SpecError("resume", f"{here} is {what}; its records point there.", f"{fix}.")


def install_state(exp_dir: Path, trust_folder: bool) -> None:
    """The newest signed snapshot of Ray's state in place (see ``search.durable``), and the
    pickles no snapshot signs removed, unless ``trust_folder``."""
    try:
        durable.install_snapshot(exp_dir)
    except durable.SigningKeyError as exc:
        if not trust_folder:  # the key, not the folder, is at fault
            why = f"{exc.why}: resume checks the study's signed state."
            raise SpecError("resume", why, f"{exc.fix}.") from None
        log.warning("resuming unsigned Ray state (--trust-folder): %s", exc.why)
    except durable.UntrustedState as exc:
        if not trust_folder:
            raise SpecError(
                "resume",
                f"{exc}; resume would unpickle these files.",
                "resume only studies you launched, or pass --trust-folder if you trust whoever wrote it.",
            ) from None
        log.warning("resuming unsigned Ray state (--trust-folder): %s", exc)
    if not trust_folder:
        for path in sorted({p for g in UNSIGNED_PICKLES for p in Path(exp_dir).glob(g)}):
            path.unlink(missing_ok=True)


def remove_outside_top(state: dict[str, Any], k: int) -> list[str]:
    """Delete the Ray checkpoints of every trial outside the top ``k`` (``k`` >= 1, by best metric)
    and clear them from the study record ``state`` (``study.json``'s content, which the caller
    saves); the trials' records stay. Returns the removed trial ids."""
    if k < 1:
        raise ValueError(f"k >= 1 must hold (the best trial's checkpoint is kept), but got {k}")
    mode = state.get("mode", "max")
    keep = {t["id"] for t in S.ranked(list(state.get("trials", {}).values()), mode)[:k]}
    removed = []
    for t in state.get("trials", {}).values():
        if t["id"] in keep or not t.get("trial_dir"):
            continue
        trial_dir = Path(t["trial_dir"])
        gone = False
        for ckpt in trial_dir.glob("checkpoint_*"):
            shutil.rmtree(ckpt, ignore_errors=True)
            gone = True
        if gone or t.get("checkpoint"):
            t["checkpoint"] = t["latest_checkpoint"] = None
            t["checkpoints_removed"] = True
            t["disk_bytes"] = S.dir_size(trial_dir)
            removed.append(t["id"])
    return removed


def trim_kept(state: dict[str, Any]) -> int:
    """Delete each ended trial's checkpoints but its best (an ended trial is never continued);
    returns how many trials had one."""
    trimmed = 0
    for t in state.get("trials", {}).values():
        if t["state"] not in (S.COMPLETE, S.PRUNED) or not t.get("checkpoint") or not t.get("trial_dir"):
            continue
        best = Path(t["checkpoint"]).parent.name
        others = [c for c in Path(t["trial_dir"]).glob("checkpoint_*") if c.name != best and c.is_dir()]
        for folder in others:
            shutil.rmtree(folder, ignore_errors=True)
        t["latest_checkpoint"] = t["checkpoint"]
        if others:
            t["disk_bytes"] = S.dir_size(Path(t["trial_dir"]))
            trimmed += 1
    return trimmed


def write_spec(spec: Any, exp_dir: Path) -> None:
    """``spec.yaml``, ``space.json`` and ``facts.json`` (:func:`search.facts.write_facts`) of a new
    study. Only what differs from the defaults: the reloaded spec then sees the keys the user set
    (model_fields_set), as the original did."""
    raw = spec.model_dump(mode="json", exclude_defaults=True)
    S.atomic_write_text(exp_dir / S.SPEC_FILE, yaml.safe_dump(raw, sort_keys=False))
    space = json.dumps(spec.search_space.describe(), indent=1, default=str)
    S.atomic_write_text(exp_dir / S.SPACE_FILE, space)
    facts.write_facts(spec, exp_dir)


def check_classes(spec: Any, exp_dir: Path) -> None:
    """A resume trains the classes its study began with (its checkpoints' heads have as many).
    A study from before ``facts.json`` gets none: its data may have changed since its launch."""
    recorded = facts.read_facts(exp_dir)
    now = {"class_names": spec.class_names, "category_ids": spec.category_ids}
    if recorded is not None and {k: recorded[k] for k in now} != now:
        raise SpecError(
            "data",
            f"the dataset's classes {spec.class_names} (ids {spec.category_ids}) are not the "
            f"{recorded['class_names']} (ids {recorded['category_ids']}) that the study's trials learn.",
            "put back the annotation files the study was launched with, or launch a new study.",
        )


def read_spec(exp_dir: Path) -> Any:
    """The spec saved in an experiment folder (paths in it are absolute). Its data or weights not
    where it names them: the fix is to put them back (a resume reads no spec the user can edit)."""
    from search.spec import build_spec, read_yaml

    try:
        return build_spec(read_yaml(exp_dir / S.SPEC_FILE), exp_dir, source=exp_dir / S.SPEC_FILE)
    except SpecError as exc:
        if not str(exc.key).startswith(("data.", "model.weights")) or "exist" not in exc.message:
            raise
        fix = f"put it back there: {exp_dir / S.SPEC_FILE} names what the study was launched with"
        raise SpecError(exc.key, exc.message, fix) from None


def check_store_there(spec: Any, exp_dir: Path) -> None:
    """The SQLite store a study's runs were recorded in is still there: a resume without it made
    an empty one and went on in it, its earlier runs out of sight (``promote`` and ``ui`` refuse a
    store that is not there too)."""
    if os.environ.get(mlflow_store.DISABLE_ENV) == "1":
        return
    gone = mlflow_store.missing_sqlite(mlflow_store.tracking_uri(spec))
    runs = run_map.read_runs(exp_dir).get("runs") or {}
    if gone is not None and runs.get("parent"):
        raise SpecError(
            "tracking.uri",
            f"the MLflow store {gone}, which holds this study's {len(runs)} run(s), is not there.",
            f"put it back there, then resume again (or resume with {mlflow_store.DISABLE_ENV}=1 to go on "
            "without MLflow).",
        )
