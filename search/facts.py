"""Facts recorded on a study's MLflow runs: on the parent, the git commit, package versions, the
base weights' sha256 and the dataset's fingerprint; on a trial's child run, its study.json record's
reference mark, recipe, state and stop record (:func:`trial_tags`). And the study folder's
``facts.json`` (:func:`write_facts`): what ``export`` needs of the data, kept with the study."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import platform
import subprocess
from pathlib import Path
from typing import Any

from search import study as S
from search.write_queue import text_value
from trainables.files import sha256_file

log = logging.getLogger(__name__)


def base_weights_sha256(spec: Any) -> str:
    """sha256 of the base weights file; ``enum:<NAME>`` (with the hub cache file's sha256 when
    cached) for a torchvision weight name; without ``model.weights``, ``backbone:`` and the same
    of ``model.weights_backbone`` (a composed model over a pretrained backbone); ``none`` for
    random init."""
    if spec.model.weights:
        return _weights_sha256(spec, spec.model.weights)
    if spec.model.weights_backbone:
        return f"backbone:{_weights_sha256(spec, spec.model.weights_backbone)}"
    return "none"


def _weights_sha256(spec: Any, weights: Any) -> str:
    path = Path(str(weights))
    if path.is_file():
        return sha256_file(path)
    try:
        from torchvision.models import get_model_weights

        from trainables.weights import hub_cache_path, resolve_enum

        cached = hub_cache_path(resolve_enum(get_model_weights(spec.model.arch), weights))
        if cached.is_file():
            return sha256_file(cached)
    except Exception:  # noqa: BLE001 - a fact for a tag, never a reason to fail
        pass
    return f"enum:{weights}"


FACTS_FILE = "facts.json"


def write_facts(spec: Any, exp_dir: Path) -> None:
    """``facts.json``: the classes the study's models learn (names and COCO ids, in label order),
    the base weights' sha256 and the dataset's fingerprint, as at launch. ``export`` and ``promote``
    read them there: a study copied without its data exported nothing ("annotation file ... does
    not exist"), and annotations edited since the launch named its classes wrongly."""
    record = {
        "class_names": spec.class_names,
        "category_ids": spec.category_ids,
        "base_weights_sha256": base_weights_sha256(spec),
        "dataset_fingerprint": dataset_fingerprint(spec),
    }
    S.atomic_write_text(Path(exp_dir) / FACTS_FILE, json.dumps(record, indent=1))


def read_facts(exp_dir: Path) -> dict[str, Any] | None:
    """``facts.json`` of a study folder; None when it has none (made before it was written) or
    one that is not as :func:`write_facts` writes it."""
    path = Path(exp_dir) / FACTS_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict):
        log.warning("%s is not as launch writes it: the study's data is read instead", path)
        return None
    names, ids = record.get("class_names"), record.get("category_ids")
    fine = isinstance(names, list) and names and all(isinstance(n, str) for n in names)
    if (
        not fine
        or not isinstance(ids, list)
        or len(ids) != len(names)
        or not all(type(i) is int for i in ids)
    ):
        log.warning("%s is not as launch writes it: the study's data is read instead", path)
        return None
    return record


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


FACT_TAGS = {"base_weights_sha256": base_weights_sha256, "dataset_fingerprint": dataset_fingerprint}


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


def parent_record(spec: Any, exp_dir: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """The tags (facts: commit, versions, seeds, base sha256, data fingerprint: ``facts.json``'s,
    hashed once at launch) and the params (the study's settings) of a study's MLflow parent run
    (a resume's reopened parent keeps its launch's tags)."""
    versions, commit, recorded_facts = package_versions(), git_commit(), read_facts(exp_dir) or {}
    tags = {
        "git_commit": commit,
        "mlflow.source.git.commit": commit.removesuffix("+dirty"),
        "seed": str(spec.train.seed),
        "search_seed": str(spec.search.seed),
        **{k: recorded_facts.get(k) or fact(spec) for k, fact in FACT_TAGS.items()},
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
        "recipe_trials": json.dumps(dict(spec.recipe_trials()), sort_keys=True),
        "num_trials": str(s.num_trials),
        "max_concurrent": str(s.max_concurrent),
        "epochs": str(spec.train.epochs),
        "batch_size": str(spec.train.batch_size),
        "image_size": str(spec.data.image_size),
        "seed": str(spec.train.seed),
    }
    return tags, params


def trial_tags(t: dict[str, Any]) -> dict[str, str]:
    """``search.reference``, ``search.recipe`` (the lr scaling rule of a recipe trial),
    ``search.state`` and ``search.stopped.*`` of a trial's study.json record ``t``."""
    tags = {"search.reference": "true" if t.get("reference") else "false"}
    if t.get("recipe"):
        tags["search.recipe"] = str(t["recipe"])
    if t.get("state") in S.STATES:
        tags["search.state"] = t["state"]
    for k, v in (t.get("stopped") or {}).items():
        if v is not None:  # a time-budget stop has no cut: no 'null' string
            tags[f"search.stopped.{k}"] = text_value(v)
    return tags
