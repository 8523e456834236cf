"""Promotion: a study's trial registered in the MLflow Model Registry (``promote``), its bundle
logged to the trial's run and its lineage as tags; a trial that does not beat the base model is
refused unless forced."""

from __future__ import annotations

import posixpath
import re
import tempfile
from pathlib import Path
from typing import Any

from search import mlflow_store, run_map, write_queue
from search import study as S
from search.select import SelectError, best, choose_trial, export_trial, lineage, study_store
from search.study_folder import resume_command

DEFAULT_ALIAS = "champion"


class Refused(Exception):
    """Promotion refused: the trial does not beat the base model (exit 1 unless --force)."""


NO_BASE = (  # why promote has no base metric to compare with
    "the study has no epoch-0 base metric to compare with (train.eval_base was false, or no trial "
    "that keeps the base model's activations has reported its epoch 0 yet)"
)


def check_registry_names(model: str, alias: str) -> None:
    """MLflow's rules for a registered model's name and alias (and ``@``, which ``models:/NAME@ALIAS``
    would misread), checked before anything is registered: a refused alias once left a version
    behind. Raises :class:`SelectError`."""
    if not model.strip() or any(c in model for c in "/:@"):
        raise SelectError(
            f"--model: {model!r} is not a registered model name: it must not be empty or contain "
            "'/', ':' or '@'. Fix: a name such as seg-nuclei."
        )
    norm = posixpath.normpath(model)
    if norm != model or norm == "." or norm.startswith(".."):
        raise SelectError(
            f"--model: {model!r} must be a plain name, not a path. Fix: a name such as seg-nuclei."
        )
    if not re.fullmatch(r"[\w\-]{1,255}", alias):
        raise SelectError(
            f"--alias: {alias!r} must be 1-255 letters, digits, '_' or '-'. Fix: an alias such as champion."
        )
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise SelectError(
            f"--alias: {alias!r} is reserved by MLflow ('latest' and v<number> name versions). "
            f"Fix: another alias, such as {DEFAULT_ALIAS}."
        )


def _registry_store(exp_dir: Path) -> tuple[str, Any]:
    """The study's store (:func:`study_store`) and its client."""
    uri, experiment = study_store(exp_dir)
    if mlflow_store.is_http(uri):  # down, or refusing: one line in seconds (MLflow retried for minutes)
        mlflow_store.check_server(uri, experiment, again="run it again", write=False)
    elif (db := mlflow_store.sqlite_file(uri)) is not None and not mlflow_store.store_writable(db):
        raise SelectError(  # a read-only archive: the bundle went to the folder it ran in, then it failed
            f"the study's MLflow store {db} is read-only (an archive, or another user's): promote "
            "registers the model in it. Fix: make it writable, or promote from a copy of its output "
            "folder that you can write (cp -a)"
        )
    return uri, mlflow_store.client(uri)


def _no_run(exp_dir: Path, trial_id: str) -> str:
    """Why a trial has no MLflow run to register from (a SelectError)."""
    if (exp_dir / write_queue.PENDING_FILE).is_file():
        raise SelectError(
            f"trial {trial_id} has no MLflow run yet: the study's records that MLflow did not receive "
            f"wait in {exp_dir / write_queue.PENDING_FILE}. Send them with: {resume_command(exp_dir)}, "
            "then promote again"
        )
    runs = exp_dir / run_map.RUNS_FILE
    if runs.is_file() and not run_map.read_runs(exp_dir):  # there, but not read: not "never recorded"
        raise SelectError(
            f"trial {trial_id} has no MLflow run: {runs} cannot be read (edited or cut?). Fix: put back "
            "the study's own copy of it"
        )
    if runs.is_file():  # e.g. a resume with SEARCH_NO_MLFLOW=1 ran it
        raise SelectError(
            f"trial {trial_id} has no MLflow run in {runs}: it ran without MLflow ({mlflow_store.DISABLE_ENV}"
            "=1), so there is no run to register from. Fix: promote a trial that has one (`best` lists them)"
        )
    raise SelectError(
        f"trial {trial_id} has no MLflow run: {runs} is not there, so the study was not recorded "
        "in MLflow (SEARCH_NO_MLFLOW=1) and there is no run to register from"
    )


def _pending_records(exp_dir: Path, key: str) -> int:
    """How many of run ``key``'s records wait in the study's pending file (the store did not take
    them): its MLflow run lacks them until a resume sends them."""
    waiting = run_map.read_pending(Path(exp_dir) / write_queue.PENDING_FILE)
    return sum(op.get("key") == key for op in waiting)


def promote(
    exp_dir: Path,
    model: str,
    alias: str = DEFAULT_ALIAS,
    trial_id: str | None = None,
    force: bool = False,
    torchscript: bool = True,
) -> dict[str, Any]:
    """Register a trial's bundle (full weights, model.yaml, loader) as a new version of ``model``
    in the study's MLflow Model Registry, point ``alias`` at it and tag it with its lineage.

    Raises :class:`Refused` when the trial does not beat the base model's epoch-0 metric (unless
    ``force``), :class:`SelectError` for an unknown trial or an untracked study.
    """
    check_registry_names(model, alias)
    exp_dir = Path(exp_dir)
    status = S.read_study(exp_dir)
    metric, mode = status.get("metric", "?"), status.get("mode", "max")
    trial = choose_trial(exp_dir, trial_id)
    _beats_base(trial, metric, mode, force, f"{model}@{alias}")  # before the bundle is made
    run_id = trial.get("run_id") or _no_run(exp_dir, trial["id"])
    uri, mlc = _registry_store(exp_dir)
    with tempfile.TemporaryDirectory(prefix="promote-") as tmp:
        # a running study's trial may have a new best by now: its tags are those of what is exported
        meta, trial = export_trial(exp_dir, Path(tmp) / "bundle", trial["id"], torchscript, None)
        beats = _beats_base(trial, metric, mode, force, f"{model}@{alias}")
        path = _free_path(mlc, run_id, "bundle")  # an earlier version's bundle stays as it was
        mlc.log_artifacts(run_id, str(Path(tmp) / "bundle"), path)
    value, base = S.number(trial.get("best_metric")), trial.get("study_base_metric")
    tags = lineage(exp_dir, trial) | ({"forced": "true"} if not beats else {})
    _registered(mlc, model, meta["arch"])
    description = (
        f"study {tags['study']} trial {trial['id']}: {metric}={value} at epoch {trial.get('best_epoch')} "
        f"(base {base}, improvement {trial.get('improvement')})"
    )
    version = mlc.create_model_version(
        model, source=f"runs:/{run_id}/{path}", run_id=run_id, tags=tags, description=description
    )
    previous = _alias_version(mlc, model, alias)
    mlc.set_registered_model_alias(model, alias, version.version)
    top = (best(exp_dir, 1) or [trial])[0]  # --trial may name another, a running study have a new best
    study_best = None if top["id"] == trial["id"] else {"trial": top["id"], "value": top.get("best_metric")}
    mlc.set_tag(run_id, "registered_model", f"{model}/{version.version}")
    return {
        "model": model,
        "version": int(version.version),
        "alias": alias,
        "uri": f"models:/{model}@{alias}",
        "source": version.source,
        "trial": trial["id"],
        "run_id": run_id,
        "metric": metric,
        "value": value,
        "base_metric": base,
        "improvement": trial.get("improvement"),
        "forced": not beats,
        "previous_version": previous,  # the alias's version before (None: a new alias)
        "study_best": study_best,  # the study's best trial when it is not this one
        "tags": tags,
        "tracking_uri": mlflow_store.redact(uri),
        "pending_records": _pending_records(exp_dir, trial["id"]),  # its run's records not in MLflow yet
    }


def _beats_base(trial: dict[str, Any], metric: str, mode: str, force: bool, target: str) -> bool:
    """Whether the trial beats the base model's epoch-0 metric; :class:`Refused` when it does not,
    unless ``force``."""
    value, base = S.number(trial.get("best_metric")), trial.get("study_base_metric")
    if value is not None and base is not None and S.better(value, base, mode):
        return True
    if force:
        return False
    why = NO_BASE
    if base is not None:
        why = f"its best {metric} {S.fmt(value)} (epoch {trial.get('best_epoch')}) does not beat the base "
        why += f"model's epoch-0 {metric} {S.fmt(base)}"
    raise Refused(
        f"refusing to promote trial {trial['id']} as {target}: {why}. Pass --force to register it anyway."
    )


def _free_path(mlc: Any, run_id: str, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``... where the run has it already: a promote of the same
    trial again (a resumed study, a better epoch) replaced the bundle an earlier version serves."""
    taken = {a.path for a in mlc.list_artifacts(run_id)}
    return next(p for p in (name, *(f"{name}-{i}" for i in range(2, 10_000))) if p not in taken)


def _registered(mlc: Any, model: str, arch: str) -> None:
    """The registered model ``model``, made when it does not exist (or made meanwhile by another
    promote)."""
    try:
        mlc.get_registered_model(model)
    except Exception as exc:  # noqa: BLE001 - RESOURCE_DOES_NOT_EXIST: create it
        if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            mlc.create_registered_model(model, description=f"fine-tuned {arch} from search studies")
        except Exception as made:  # noqa: BLE001 - another promote made it first: it is there
            if getattr(made, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise


def _alias_version(mlc: Any, model: str, alias: str) -> int | None:
    """The version ``model@alias`` names now, None when the alias is new."""
    try:
        return int(mlc.get_model_version_by_alias(model, alias).version)
    except Exception as exc:  # noqa: BLE001 - RESOURCE_DOES_NOT_EXIST / INVALID_PARAMETER_VALUE: none
        if getattr(exc, "error_code", None) not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        return None
