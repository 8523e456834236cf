"""Selecting and shipping a study's trials: ``best``, ``promote`` and ``export``.

Reads the experiment folder (``study.json``, ``spec.yaml``, ``mlflow_runs.json``; DESIGN.md) and,
for ``promote``, the study's MLflow store. The base model's epoch-0 metric that a trial must beat
is the study's base metric: the unmodified base model's epoch-0 score
(:func:`search.study.study_base_metric`), the same number ``status`` and MLflow show.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from search import facts, mlflow_store, run_map, write_queue
from search import study as S
from search.errors import SpecError


class SelectError(ValueError):
    """A request the user must fix (unknown trial, no checkpoint, no tracked run): exit 2."""


class CheckpointGone(SelectError):
    """A trial's checkpoint is not on disk, or went while it was read (a running study's Ray
    replaces them)."""


# ---------------------------------------------------------------- reading a study


def find_experiment(name: str | Path, output_dir: Path | None = None) -> Path:
    """The experiment folder of NAME (a folder path, ``<output_dir>/<name>`` or ``runs/<name>``)."""
    try:
        return S.resolve_experiment(name, output_dir)
    except S.ExperimentNotFound as exc:
        raise SelectError(str(exc)) from None


def load_study_spec(exp_dir: Path) -> Any:
    """The validated spec saved in the experiment folder (its paths are absolute)."""
    from search.spec import build_spec, read_yaml

    path = Path(exp_dir) / S.SPEC_FILE
    if not path.is_file():
        raise SelectError(f"{exp_dir} has no {S.SPEC_FILE}: not an experiment folder made by 'search launch'")
    raw = read_yaml(path)
    model = raw.get("model")
    if isinstance(model, dict):  # a full dump lists keys the user never set, at their defaults: drop them
        from search.spec import ModelSection

        for key, field in ModelSection.model_fields.items():
            if key in model and not field.is_required():
                default = json.dumps(field.get_default(call_default_factory=True), default=str)
                if model[key] is None or json.dumps(model[key], default=str) == default:
                    del model[key]
    recorded = facts.read_facts(exp_dir)  # the classes it learnt: its data need not be here
    try:
        spec = build_spec(
            raw, Path(exp_dir), source=path, outputs=False, classes=recorded
        )  # it may have moved
    except SpecError as exc:
        if recorded is not None or not str(exc.key or "").startswith("data."):
            raise
        raise SelectError(  # a spec it cannot change: its saved one
            f"{exc.message} {exp_dir} was launched before facts.json kept its classes, so they are read "
            "from its annotation files. Fix: put the study's data back at the paths its spec.yaml names"
        ) from None
    if recorded is not None:
        _same_classes(spec, exp_dir)
    return spec


def _same_classes(spec: Any, exp_dir: Path) -> None:
    """The study's annotation files, where they are here, name the classes its facts.json does
    (annotations edited since the launch, or a facts.json not this study's, mislabelled a bundle)."""
    from trainables import coco

    ann = Path(spec.data.train.annotations)
    try:
        cats = coco.categories(ann)
    except coco.DatasetError:  # not here (a study copied without its data), or unreadable
        return
    names, ids = [cats[c] for c in sorted(cats)], sorted(cats)
    if (names, ids) != (spec.class_names, spec.category_ids):
        raise SelectError(
            f"{ann} names the classes {names} (ids {ids}), but the study's models learnt {spec.class_names} "
            f"(ids {spec.category_ids}, {Path(exp_dir) / facts.FACTS_FILE}). Fix: put back the annotation "
            "files the study was launched with (a bundle would label its classes wrongly)"
        )


def base_metric(status: dict[str, Any]) -> float | None:
    """The study's base metric (:func:`search.study.study_base_metric`: the unmodified base
    model's epoch-0 score)."""
    return S.study_base_metric(status)


def ranked_trials(exp_dir: Path, status: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Trials ranked by best-epoch objective (best first; diverged/errored and unscored left out),
    each a ``status --json`` trial object plus ``epoch`` (= best_epoch), ``run_id`` (None when
    untracked), ``study_base_metric`` (the study's, see module docstring), ``improvement`` over it,
    ``reference_metric`` and ``vs_reference``; the trial object's own ``base_metric`` stays: its
    own model's epoch-0 score (a trial that swaps activations starts from another model).
    ``status``: the study's ``status_object``, when the caller has read it."""
    status = status or S.status_object(exp_dir)
    mode = status.get("mode", "max")
    base = base_metric(status)
    ref = status.get("reference") or {}
    runs = run_map.read_runs(exp_dir).get("runs", {})
    out = []
    for t in S.ranked(status["trials"], mode):
        row = dict(t)
        row["epoch"] = t.get("best_epoch")
        row["run_id"] = runs.get(t["id"])
        row["study_base_metric"] = base
        row["improvement"] = S.gain(S.number(t.get("best_metric")), base, mode)
        row["reference_metric"] = ref.get("best_metric")
        row["vs_reference"] = S.gain(S.number(t.get("best_metric")), ref.get("best_metric"), mode)
        out.append(row)
    return out


def best(exp_dir: Path, top: int | None = None) -> list[dict[str, Any]]:
    trials = ranked_trials(exp_dir)
    return trials if top is None else trials[: max(0, top)]


def choose_trial(exp_dir: Path, trial_id: str | None = None) -> dict[str, Any]:
    """The best trial, or trial ``trial_id`` (a full id or a unique suffix such as ``00003``)."""
    status = S.status_object(exp_dir)
    trials = ranked_trials(exp_dir, status)
    if trial_id is None:
        if not trials:
            raise SelectError(f"{exp_dir}: no trial has a best metric yet (nothing finished an epoch)")
        return trials[0]
    # among every trial: a suffix that also names an errored one is ambiguous, not the ranked one
    every = [str(t.get("id")) for t in status["trials"]]
    matches = [i for i in every if i == trial_id] or [i for i in every if i.endswith(trial_id)]
    if len(matches) > 1:
        raise SelectError(f"trial {trial_id!r} is ambiguous: {', '.join(matches)}")
    if not matches:
        raise SelectError(
            f"--trial: no trial {trial_id!r} in {exp_dir}; trials: {', '.join(every) or 'none'}. Fix: "
            "name one of them (or a unique end of its id)"
        )
    chosen = next((t for t in trials if t["id"] == matches[0]), None)
    if chosen is None:
        raise SelectError(
            f"trial {matches[0]!r} has no best metric (it diverged, errored or never finished an "
            f"epoch); trials with one: {', '.join(t['id'] for t in trials) or 'none'}"
        )
    return chosen


def _checkpoint(trial: dict[str, Any]) -> Path:
    ckpt = trial.get("checkpoint")
    if not ckpt or not Path(ckpt).exists():
        why = " (removed by --keep-top)" if trial.get("checkpoints_removed") else ""
        raise CheckpointGone(
            f"trial {trial['id']} has no checkpoint on disk{why}: {ckpt or 'none recorded'}. Fix: name a "
            "trial that has one with --trial (`best` lists them: checkpoint not '-')."
        )
    path = Path(ckpt)
    if path.is_dir():
        for name in (S.MODEL_FILE, "best.pt", "checkpoints/best.pt", "latest.pt"):
            if (path / name).is_file():
                return path / name
        raise CheckpointGone(f"trial {trial['id']}: no checkpoint file in {path}")
    return path


def lineage(exp_dir: Path, trial: dict[str, Any], spec: Any = None) -> dict[str, str]:
    """Tags that tie a registered model to its study: :func:`provenance`, and the trial's metric,
    base metric and improvement as MLflow tag strings."""
    tags = provenance(exp_dir, trial, spec)
    metric = tags["metric"]
    return {
        **tags,
        f"{metric}": repr(trial.get("best_metric")),
        "best_epoch": str(trial.get("best_epoch")),
        f"base_{metric}": repr(trial.get("study_base_metric")),
        "improvement": repr(trial.get("improvement")),
    }


def provenance(exp_dir: Path, trial: dict[str, Any], spec: Any = None) -> dict[str, str]:
    """Where a trial's model comes from: study, folder, trial, run, metric and mode, base weights
    sha256, dataset fingerprint (and git commit). The sha and fingerprint come from the study's
    parent run (as recorded at launch) or, without one, from the spec; the commit from the trial's
    run where it has one (a trial a resume started ran that resume's code; ``resumed_git_commit``:
    the code a resume went on with it)."""
    status = S.read_study(exp_dir)
    runs = run_map.read_runs(exp_dir)
    known: dict[str, str] = {}
    parent = runs.get("runs", {}).get("parent")
    if parent:
        try:
            uri, _ = write_queue.recorded_store(exp_dir)
            if mlflow_store.missing_sqlite(uri):  # reading it would create an empty store
                raise FileNotFoundError(uri)
            mlc = mlflow_store.client(uri)
            tags = mlc.get_run(parent).data.tags
            known = {
                k: tags[k] for k in ("base_weights_sha256", "dataset_fingerprint", "git_commit") if k in tags
            }
            with contextlib.suppress(Exception):  # the code that trained it: a resume's trials ran another
                own = mlc.get_run(trial["run_id"]).data.tags if trial.get("run_id") else {}
                known |= {k: own[k] for k in ("git_commit", "resumed_git_commit") if k in own}
        except Exception:  # noqa: BLE001 - fall back to the spec below
            known = {}
    recorded = facts.read_facts(exp_dir) or {}  # as at launch, beside the study
    known = {**{k: recorded[k] for k in facts.FACT_TAGS if isinstance(recorded.get(k), str)}, **known}
    if "base_weights_sha256" not in known or "dataset_fingerprint" not in known:
        spec = spec or load_study_spec(exp_dir)
        known.setdefault("base_weights_sha256", facts.base_weights_sha256(spec))
        known.setdefault("dataset_fingerprint", facts.dataset_fingerprint(spec))
    return {
        "study": str(status.get("name") or Path(exp_dir).name),
        "experiment_dir": str(Path(exp_dir).resolve()),
        "trial": trial["id"],
        "run_id": str(trial.get("run_id") or ""),
        "metric": status.get("metric", ""),
        "mode": str(status.get("mode", "max")),
        **known,
    }


# ---------------------------------------------------------------- export


def export(
    exp_dir: Path,
    out_dir: Path,
    trial_id: str | None = None,
    torchscript: bool = True,
    key_env: str | None = None,
    spec: Any = None,
) -> dict[str, Any]:
    """A deployment bundle of a trial's best-epoch checkpoint in ``out_dir`` (see
    :mod:`search.bundle`; weights encrypted under ``key_env``'s secret when given); returns
    model.yaml's content. ``spec``: the study's :func:`load_study_spec`, when the caller has it."""
    return export_trial(Path(exp_dir), out_dir, trial_id, torchscript, key_env, spec)[0]


def export_trial(
    exp_dir: Path,
    out_dir: Path,
    trial_id: str | None,
    torchscript: bool,
    key_env: str | None,
    spec: Any = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model.yaml's content, the trial as read when its checkpoint was: what the bundle holds)."""
    spec = spec or load_study_spec(exp_dir)
    tries = 0
    while True:  # Ray replaces a running study's checkpoints, --keep-top removes them at its end
        try:
            return _export_once(exp_dir, spec, out_dir, trial_id, torchscript, key_env)
        except CheckpointGone:  # read study.json again: once after the study ended too
            tries += 1
            if tries == 3 or (tries == 2 and S.read_study(exp_dir).get("status") != "running"):
                raise
            time.sleep(1.0)


def _export_once(
    exp_dir: Path, spec: Any, out_dir: Path, trial_id: str | None, torchscript: bool, key_env: str | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    from search.bundle import build_bundle

    trial = choose_trial(exp_dir, trial_id)
    ckpt = _checkpoint(trial)
    cfg = spec.trial_config(out_dir=Path(tempfile.gettempdir()))
    info = {
        **provenance(exp_dir, trial, spec),
        "best_metric": trial.get("best_metric"),
        "base_metric": trial.get("study_base_metric"),
        "improvement": trial.get("improvement"),
        "best_epoch": trial.get("best_epoch"),
        "history": trial.get("history", []),
    }
    try:
        meta = build_bundle(
            cfg,
            ckpt,
            spec.class_names,
            Path(out_dir),
            study=info,
            torchscript=torchscript,
            key_env=key_env,
            category_ids=spec.category_ids,
        )
    except FileNotFoundError as exc:
        if exc.filename and Path(exc.filename).is_relative_to(ckpt.parent):
            raise CheckpointGone(
                f"trial {trial['id']}: its checkpoint {exc.filename} went while it was read. Fix: run "
                "the command again."
            ) from None
        raise
    return meta, trial


# ---------------------------------------------------------------- the study's store


def study_store(exp_dir: Path) -> tuple[str, str]:
    """(tracking URI, experiment) of a study's records; a SQLite store that is not there is
    refused (MLflow would create an empty one, without the study's runs)."""
    uri, experiment = write_queue.recorded_store(exp_dir)
    if gone := mlflow_store.missing_sqlite(uri):
        if mlflow_store.uses_default_store(exp_dir):
            fix = (
                f"move the study back with its output folder, or copy {mlflow_store.DB_FILE} beside "
                "the study folder"
            )
        else:  # the spec's tracking.uri names it: a store beside the study is not read
            fix = f"put the store back at {gone} (the spec's tracking.uri)"
        raise SelectError(f"the study's MLflow store {gone} is not there (its runs are in it): {fix}")
    return uri, experiment
