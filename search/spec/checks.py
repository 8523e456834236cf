"""Cross-section checks of a spec that need no torch: the architecture family and its
composition keys, the objective, the space against the task and family, the search settings,
the reference trial, files and data."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from search.errors import SpecError, did_you_mean, unknown_name
from search.space import one_of
from search.space_parse import check_conditions
from search.spec.schema import ENUM_NAME, MAX_GRID, TASK_METRICS, Spec, is_registry_uri
from trainables import families, params


def _family(spec: Spec) -> families.Family:
    fam = families.family_of(spec.model.arch)
    rows = [*families.FAMILIES.values(), *families.COMPOSED.values()]
    if fam is None:
        known = [a for f in rows for a in f.archs]
        raise unknown_name("model.arch", spec.model.arch, known, "architecture")
    if fam.task != spec.task and not (spec.task == "detection" and fam.task == "instance_segmentation"):
        same = [a for f in rows if f.task == spec.task for a in f.archs]
        raise SpecError(
            "model.arch",
            f"{spec.model.arch!r} is a model for task {fam.task!r}, but task is {spec.task!r}.",
            f"use one of: {', '.join(same)}, or change task.",
        )
    return fam


def _check_model(spec: Spec) -> None:
    fam = _family(spec)
    _check_composition(spec, fam)
    for name, globs in spec.model.trainable_sets.items():
        if not globs:
            raise SpecError(f"model.trainable_sets.{name}", "lists no pattern.", "add glob patterns.")
        if name in fam.presets:
            raise SpecError(
                f"model.trainable_sets.{name}",
                f"{name!r} is a freeze preset's name, and the set would silently replace the preset.",
                f"give the set another name (e.g. my_{name}).",
            )
    for attr in ("weights", "weights_backbone"):
        value = getattr(spec.model, attr)
        if value and "://" in value:
            raise SpecError(
                f"model.{attr}",
                f"remote URIs are not supported, but got {value!r}.",
                "use a torchvision enum name (e.g. DEFAULT), a local file, models:/NAME@ALIAS, runs:/ID/PATH "
                "or none.",
            )


_RCNN_ONLY = ("roi_output_size", "roi_sampling_ratio")
_DETECTION_ONLY = ("fpn_channels", "anchor_sizes", "aspect_ratios", *_RCNN_ONLY, "mask_roi_output_size")


def _check_composition(spec: Spec, fam: families.Family) -> None:
    """The model.backbone/... keys: only for composed archs, consistent with the head (no torch;
    the backbone name and its units are checked by :func:`deep_check`)."""
    m = spec.model
    given = [k for k in m.COMPOSE_FIELDS if k in m.model_fields_set]
    composed = ", ".join(families.composed_archs())
    if not fam.composed:
        if given:
            raise SpecError(
                f"model.{given[0]}",
                f"only applies to composed archs ({composed}), but {m.arch!r} is a complete builder.",
                f"remove it, or compose: arch: {fam.name} with backbone: NAME."
                if fam.name in families.COMPOSED
                else f"remove it, or use a composed arch ({composed}) with backbone: NAME.",
            )
        return
    if not m.backbone:
        raise SpecError(
            "model.backbone",
            f"is required when model.arch is the composition {m.arch!r}.",
            "name a torchvision classification model, e.g. resnet50 or mobilenet_v2.",
        )
    if m.weights and ENUM_NAME.fullmatch(m.weights):
        raise SpecError(
            "model.weights",
            f"{m.arch} composed over {m.backbone} has no weight enum, but got {m.weights!r}.",
            "use weights_backbone (the backbone's enum, e.g. IMAGENET1K_V1, or a file), or a file of "
            "a composed model.",
        )
    if "compose" in m.kwargs:
        raise SpecError("model.kwargs.compose", "is reserved.", "set model.backbone, model.fpn, ... instead.")
    if m.feature_layers is not None and not m.feature_layers:
        raise SpecError("model.feature_layers", "lists no unit.", "name backbone units or remove the key.")
    if fam.task == families.SEMANTIC:
        if m.fpn:
            raise SpecError("model.fpn", f"{m.arch} compositions take no FPN.", "remove it.")
        for key in _DETECTION_ONLY:
            if key in given:
                raise SpecError(
                    f"model.{key}", f"applies to detection compositions, not {m.arch}.", "remove it."
                )
        if m.feature_layers is not None and len(m.feature_layers) > 2:
            raise SpecError(
                "model.feature_layers",
                f"{m.arch} takes [out] or [aux, out], but got {len(m.feature_layers)} units.",
                "list one or two units.",
            )
        return
    fpn = True if m.fpn is None else m.fpn
    if "fpn_channels" in given and not fpn:
        raise SpecError("model.fpn_channels", "only applies with fpn: true.", "remove it or set fpn: true.")
    rcnn = fam.name in ("fasterrcnn", "maskrcnn")
    for key in (*_RCNN_ONLY, "mask_roi_output_size"):
        applies = fam.name == "maskrcnn" if key == "mask_roi_output_size" else rcnn
        if key in given and not applies:
            raise SpecError(
                f"model.{key}",
                f"applies to {'maskrcnn' if key.startswith('mask') else 'fasterrcnn and maskrcnn'} (RoI "
                f"heads), not {m.arch}.",
                "remove it.",
            )
    n_layers = (
        len(m.feature_layers)
        if m.feature_layers is not None
        else (families.default_feature_layer_count(fam, fpn))
    )
    problem = families.anchor_problem(fam, fpn, n_layers, m.anchor_sizes, m.aspect_ratios)
    if problem:
        raise SpecError(
            problem[0], problem[1] + ".", "match the feature maps (README: Composed models), or remove it."
        )


def _check_objective(spec: Spec) -> None:
    metrics = TASK_METRICS[spec.task]
    if spec.objective.metric not in metrics:
        raise unknown_name("objective.metric", spec.objective.metric, metrics, f"metric for task {spec.task}")
    if spec.objective.mode != "max":  # every metric of TASK_METRICS is better higher
        raise SpecError(
            "objective.mode",
            f"{spec.objective.mode!r}, but {spec.objective.metric} is better higher (as every metric here "
            "is), so the search would look for the worst model.",
            "use mode: max.",
        )


def _check_space(spec: Spec) -> None:
    fam = _family(spec)
    for dim in spec.search_space.dims:
        key = f"space.{dim.name}"
        row = params.lookup(dim.name)
        if row is None:
            names = list(params.PARAMS) + ["loss.weight.<term>"]
            raise unknown_name(key, dim.name, names, "trial parameter", is_key=True)
        if spec.task not in row.tasks:
            raise SpecError(
                key,
                f"does not apply to task {spec.task!r} (it applies to {', '.join(row.tasks)}).",
                "remove it.",
            )
        for value in _values(dim):
            problem = row.check(value)
            if problem and row.choices is not None and isinstance(value, str):
                raise unknown_name(key, value, row.choices, f"{dim.name} value")
            if problem:
                raise SpecError(key, f"{dim.name} {problem}.", f"use a value {dim.name} allows ({row.doc}).")
        _check_family_values(spec, fam, dim, key)
        if dim.kind in ("float", "int") and row.kind in ("str", "bool"):
            raise SpecError(
                key,
                f"{dim.name} is a {row.kind} parameter, but got a numeric range.",
                "use choices: [...] or a fixed value.",
            )
        if dim.kind == "float" and row.kind == "int":
            what, fix = ("float bounds", "use integer low/high")
            if all(float(v).is_integer() for v in (dim.low, dim.high)):
                ints = ", ".join(
                    f"{k}: {int(v)}"
                    for k, v in (("low", dim.low), ("high", dim.high), ("step", dim.step))
                    if v is not None
                )
                what = "a float range (a bound or step with a decimal point, or type: float)"
                fix = f"write {ints} without type: float"
                if dim.step is not None and not float(dim.step).is_integer():
                    what, fix = ("a fractional step", "use a whole-number step")
            raise SpecError(key, f"{dim.name} is an integer parameter, but got {what}.", f"{fix}.")


def _values(dim) -> list[Any]:
    if dim.kind == "fixed":
        return [dim.value]
    if dim.kind == "categorical":
        return list(dim.choices)
    return [dim.low, dim.high]


def _check_family_values(spec: Spec, fam: families.Family, dim, key: str) -> None:
    if dim.name.startswith(params.LOSS_WEIGHT_PREFIX):
        term = dim.name[len(params.LOSS_WEIGHT_PREFIX) :]
        if term not in fam.loss_terms:
            raise unknown_name(key, term, fam.loss_terms, f"loss term for {spec.model.arch}", is_key=True)
        return
    allowed = {
        "loss.box": ("default", *fam.box_losses),
        "loss.cls": ("default", *fam.cls_losses),
        "trainable": (*fam.presets, *spec.model.trainable_sets),
    }.get(dim.name)
    if allowed is None:
        return
    for value in _values(dim):
        if value not in allowed:
            what = {"loss.box": "box loss", "loss.cls": "classification loss"}.get(dim.name, "trainable set")
            raise SpecError(
                key,
                f"{spec.model.arch} ({fam.name}) cannot use {what} {value!r}."
                f"{did_you_mean(str(value), allowed)}",
                f"use one of: {', '.join(allowed)}.",
            )


def _check_search(spec: Spec, study: bool = True) -> None:
    from search.samplers import SAMPLERS
    from search.schedulers import SCHEDULER_NAMES

    s = spec.search
    if s.algorithm not in SAMPLERS:
        raise unknown_name("search.algorithm", s.algorithm, list(SAMPLERS), "search algorithm")
    if s.scheduler not in SCHEDULER_NAMES:
        raise unknown_name("search.scheduler", s.scheduler, SCHEDULER_NAMES, "scheduler")
    if not study:  # one trial (``trial``): the study's scheduling, grid and reference do not apply
        return
    _check_reference(spec)
    if s.grace_period > spec.train.epochs:
        raise SpecError(
            "search.grace_period",
            f"grace_period <= train.epochs must hold, but got {s.grace_period} > {spec.train.epochs}.",
            "lower grace_period or raise train.epochs.",
        )
    if s.algorithm == "grid":
        _check_grid(spec)
    _check_hyperband(spec)


def _check_grid(spec: Spec) -> None:
    """A grid is finite, small enough to run whole, and has no parameter that acts only sometimes."""
    for dim in spec.search_space.searched:
        if dim.kind in ("float", "int") and dim.step is None:
            raise SpecError(
                f"space.{dim.name}",
                f"grid search needs a finite grid with a stated spacing, but this {dim.kind} has no step.",
                "add step: or use choices:.",
            )
    space = spec.search_space
    for dim in space.searched:
        if _may_not_act(space, dim):
            when = " and ".join(f"{k} is {' or '.join(map(str, v))}" for k, v in dim.when.items())
            raise SpecError(
                f"space.{dim.name}.when",
                "grid search runs every combination of the searched values, so a parameter that "
                f"acts only when {when} would repeat the other trials' configurations.",
                f"fix space.{dim.name} (or drop its when), or use another search.algorithm.",
            )
    points = 1
    for values in spec.search_space.grid().values():
        points *= max(1, len(values))
        if points > MAX_GRID:
            raise SpecError(
                "space",
                f"the grid has more than {MAX_GRID:,} points (a grid must be small enough to run whole).",
                "use fewer choices or a larger step, or another search.algorithm.",
            )
    if not spec.search_space.searched:
        raise SpecError(
            "search.algorithm",
            "grid search needs at least one searched parameter.",
            "add a parameter with choices or a stepped range to space.",
        )


def _check_hyperband(spec: Spec) -> None:
    """Ray's HyperBand halves a bracket only once all its trials exist: all must exist at once."""
    from search.samplers import num_samples
    from search.schedulers import resolved

    s = spec.search
    trials = num_samples(spec)  # a grid runs no more trials than its points
    if resolved(s.scheduler) == "hyperband" and s.max_concurrent < trials:
        raise SpecError(
            "search.max_concurrent",
            "scheduler 'hyperband' (Ray's synchronous HyperBand) halves a bracket only once all its "
            f"trials exist, so max_concurrent >= the number of trials must hold, but got {s.max_concurrent} "
            f"< {trials} (it would stop no trial; measured, BENCHMARKS.md §3).",
            f"set search.max_concurrent: {trials} (the resources still decide how many run at once), "
            "or use scheduler auto, curve or asha.",
        )


def _may_not_act(space: Any, dim: Any) -> bool:
    """Whether ``dim``'s ``when`` can fail in some trial: a parent that is conditional itself, or
    can take a value the condition does not list (a constant: its own value)."""
    for name, allowed in dim.when.items():
        parent = space.by_name[name]
        values = [parent.value] if parent.kind == "fixed" else list(parent.choices)
        if parent.when or parent.kind in ("float", "int") or not all(one_of(v, allowed) for v in values):
            return True
    return False


def _check_trial_device(spec: Spec) -> None:
    """``train.device`` against the GPUs a study's trial sees under Ray: only those
    ``resources.gpu`` reserves, numbered from 0 (none when it is 0); else every trial fails in torch."""
    device, gpu = spec.train.device, spec.resources.gpu
    if not device.startswith("cuda"):
        return
    seen = math.ceil(gpu) if gpu > 0 else 0
    if int(device.partition(":")[2] or 0) >= seen:
        raise SpecError(
            "train.device",
            f"{device!r}, but a trial reserving resources.gpu {gpu:g} sees {seen} GPU(s) under Ray "
            "(only those it reserves, numbered from 0).",
            "set resources.gpu (1, or a fraction such as 0.5) and train.device cuda, or train.device auto.",
        )


def _check_reference(spec: Spec) -> None:
    """``search.reference_scaling`` names each rule once; an explicit ``search.reference_trial:
    true`` needs a recipe and a sampler that takes it."""
    from trainables import recipes

    scalings = spec.search.reference_scaling
    for i, name in enumerate(scalings):
        if name not in recipes.LR_SCALINGS:
            raise unknown_name(f"search.reference_scaling[{i}]", name, recipes.LR_SCALINGS, "lr scaling rule")
        if name in scalings[:i]:
            raise SpecError(
                f"search.reference_scaling[{i}]",
                f"each rule may appear once, but got {name!r} twice in {scalings}.",
                "drop the repeat.",
            )
    if not scalings:
        raise SpecError(
            "search.reference_scaling",
            "needs at least one lr scaling rule (the first is the reference trial), but got [].",
            "write [linear], or set search.reference_trial: false for no recipe trial.",
        )
    if spec.search.reference_trial is not True:
        return
    fam = families.family_of(spec.model.arch)
    if recipes.recipe_for(fam.name if fam else None) is None:
        raise SpecError(
            "search.reference_trial",
            f"architecture family {fam.name if fam else spec.model.arch!r} has no reference recipe "
            f"(recipes: {', '.join(recipes.RECIPES)}).",
            "set search.reference_trial: false.",
        )
    if spec.search.algorithm == "grid":
        raise SpecError(
            "search.reference_trial",
            "grid search runs the grid's points only; it takes no reference trial.",
            "set search.reference_trial: false, or use another search.algorithm.",
        )


def _check_files(spec: Spec, data: bool = True, weights: bool = True) -> None:
    """The data paths (``data``) and a weights file (``weights``) exist and are of the right kind (a
    file given as the image folder said "does not exist" though it exists)."""
    for split_name in ("train", "val") if data else ():
        split = getattr(spec.data, split_name)
        if not split.images.is_dir():
            raise SpecError(
                f"data.{split_name}.images",
                f"image folder {str(split.images)!r} {_kind_text(split.images, 'a folder of images')}",
                "point it at the folder that file_name entries are relative to.",
            )
        if not split.annotations.is_file():
            raise SpecError(
                f"data.{split_name}.annotations",
                f"annotation file {str(split.annotations)!r} "
                f"{_kind_text(split.annotations, 'a COCO JSON file')}",
                "point it at a COCO JSON file.",
            )
    for attr in ("weights", "weights_backbone") if weights else ():
        value = getattr(spec.model, attr)
        resolved_later = is_registry_uri(value)  # by the preflight (search.registry)
        if value and not resolved_later and not ENUM_NAME.fullmatch(value) and not Path(value).is_file():
            inside = " (the weights file inside that folder)" if Path(value).is_dir() else ""
            raise SpecError(
                f"model.{attr}",
                f"weights file {value!r} {_kind_text(Path(value), 'a weights file')}",
                f"use a torchvision enum name (e.g. DEFAULT), an existing file{inside}, or none.",
            )


def _kind_text(path: Path, needed: str) -> str:
    """Why ``path`` is not the ``needed`` kind: it does not exist, or it is the other kind."""
    if path.is_dir():
        return f"is a folder, but {needed} is needed."
    if path.exists():
        return f"is {'a file' if path.is_file() else 'not a regular file'}, but {needed} is needed."
    return "does not exist."


def check_data(spec: Spec) -> None:
    """The annotation files load as COCO for the task, and both splits name the same classes."""
    from trainables import coco

    names = ids = None
    spec._images = []
    for split_name in ("train", "val"):
        split = getattr(spec.data, split_name)
        try:
            index = coco.load_coco(split.annotations, split.images, task=spec.task)
        except coco.DatasetError as exc:
            raise SpecError(
                f"data.{split_name}", str(exc), exc.fix or "fix the dataset or point at another file."
            ) from None
        spec._images += [(split_name, rec) for rec in index.images]
        if names is None:
            names, ids = index.class_names, index.cat_ids
            spec._untrained = [c for c, n in coco.summarize(index)["per_class"].items() if not n]
        elif index.class_names != names:
            raise SpecError(
                "data.val.annotations",
                f"categories {index.class_names} differ from the training split's {names}.",
                "use the same categories in both splits.",
            )
    train = {Path(rec.path).resolve() for split, rec in spec._images if split == "train"}
    spec._shared = sorted(
        str(rec.path) for split, rec in spec._images if split == "val" and Path(rec.path).resolve() in train
    )
    spec._class_names = list(names or [])
    spec._category_ids = list(ids or [])
    spec._num_classes = len(spec._class_names)


def check_spec(spec: Spec, study: bool = True, data: bool = True, weights: bool = True) -> None:
    """Every check across sections that needs neither torch nor the data's contents (``study``:
    also the study's own: scheduling, grid, reference trial, the trials' GPUs under Ray;
    ``data``: that the data's files are there; ``weights``: that a base weights file is)."""
    _check_model(spec)
    _check_objective(spec)
    _check_space(spec)
    check_conditions(spec.search_space.dims, "space")
    _check_search(spec, study)
    if study:
        _check_trial_device(spec)
    _check_files(spec, data, weights)
