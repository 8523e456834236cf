"""The typed spec: ``yaml.safe_load`` → pydantic models → checks across sections.

Relative paths (data, weights files, ``output_dir``) resolve against the folder of the spec
file. :func:`load_spec` does every check that needs no torch (structure, ranges, names, files,
the space, loss/architecture pairs). :func:`deep_check` (imports torch) checks the torchvision
builder and weight enum names and that every freeze pattern matches parameters. Both raise
:class:`~search.errors.SpecError`; nothing here starts Ray or touches MLflow.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from search import guards
from search.errors import SpecError, did_you_mean, short, unknown_name
from search.space import SearchSpace, parse_space
from trainables import families, params
from trainables.config import DataSplit, TrialConfig

TASKS = ("detection", "instance_segmentation", "semantic_segmentation")
TASK_METRICS = {
    "detection": ("map", "map50", "map75", "map_small", "map_medium", "map_large", "mar100"),
    "instance_segmentation": ("map", "map50", "map75", "mask_map", "mask_map50", "mask_map75"),
    "semantic_segmentation": ("miou", "pixel_acc", "dice"),
}
ENUM_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MAX_NAME = 100
MAX_GRID = 10_000
SEED_LIMIT = 2**32  # numpy's and Optuna's seeds are 32-bit


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelSection(_Section):
    arch: str
    weights: str | None = None
    weights_backbone: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    trainable_sets: dict[str, list[str]] = Field(default_factory=dict)
    # Composed archs only (trainables/compose.py): arch fasterrcnn|maskrcnn|retinanet|fcos|deeplabv3|fcn
    backbone: str | None = None  # a torchvision classification model
    fpn: bool | None = None  # default: true for detection; segmentation takes none
    feature_layers: list[str] | None = None  # backbone unit names (default: per backbone, by stride)
    fpn_channels: int = Field(256, ge=8, le=4096)
    anchor_sizes: list[list[float]] | None = None  # one list per feature map
    aspect_ratios: list[float] | list[list[float]] | None = None  # flat: every map; or one per map
    roi_output_size: int = Field(7, ge=1, le=64)
    roi_sampling_ratio: int = Field(2, ge=0, le=64)
    mask_roi_output_size: int = Field(14, ge=1, le=128)
    frozen_batchnorm: bool | None = None  # default: true when weights_backbone is given

    COMPOSE_FIELDS: ClassVar[tuple[str, ...]] = (
        "backbone",
        "fpn",
        "feature_layers",
        "fpn_channels",
        "anchor_sizes",
        "aspect_ratios",
        "roi_output_size",
        "roi_sampling_ratio",
        "mask_roi_output_size",
        "frozen_batchnorm",
    )

    @field_validator("weights", "weights_backbone", mode="before")
    @classmethod
    def _none(cls, v: Any) -> Any:
        if v is None or (isinstance(v, str) and v.strip().lower() in ("none", "")):
            return None
        return v

    @field_validator("feature_layers", mode="before")
    @classmethod
    def _unit_names(cls, v: Any) -> Any:
        if isinstance(v, list):  # MobileNet-style units are numbers in YAML
            return [str(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in v]
        return v

    def composition(self) -> dict[str, Any] | None:
        """The settings of a composed arch (``TrialConfig.model_kwargs["compose"]``); None for a
        builder. ``frozen_batchnorm`` defaults to true when backbone weights are used."""
        if self.arch not in families.COMPOSED:
            return None
        out = {k: getattr(self, k) for k in self.COMPOSE_FIELDS}
        if self.frozen_batchnorm is None:
            out["frozen_batchnorm"] = self.weights_backbone is not None and self.weights is None
        return out

    def model_kwargs(self) -> dict[str, Any]:
        """``kwargs`` plus, for a composed arch, ``compose``: what ``TrialConfig.model_kwargs`` gets."""
        out = dict(self.kwargs)
        composition = self.composition()
        if composition is not None:
            out["compose"] = composition
        return out


class SplitSection(_Section):
    images: Path
    annotations: Path


class DataSection(_Section):
    train: SplitSection
    val: SplitSection
    image_size: int = Field(320, ge=32, le=4096)


class TrainSection(_Section):
    epochs: int = Field(3, ge=1, le=100000)
    batch_size: int = Field(2, ge=1, le=4096)
    workers: int = Field(0, ge=0, le=64)
    seed: int = Field(0, ge=0, lt=SEED_LIMIT)
    device: str = "auto"
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    limit_train: int | None = Field(None, ge=1)
    limit_val: int | None = Field(None, ge=1)
    keep_full_checkpoint: bool = False
    eval_base: bool = True

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", v):
            raise ValueError(f"must be auto, cpu, cuda or cuda:N, but got {v!r}")
        return v


class ObjectiveSection(_Section):
    metric: str = "map"
    mode: Literal["max", "min"] = "max"


class SearchSection(_Section):
    algorithm: Literal["tpe", "random", "cmaes", "gp", "qmc", "grid"] = "tpe"
    scheduler: str = "auto"  # a name of search.schedulers.SCHEDULERS (no Ray import here)
    reference_trial: bool | None = None  # None: on when the family has a reference recipe
    num_trials: int = Field(8, ge=1, le=100000)
    max_concurrent: int = Field(2, ge=1, le=1024)
    time_budget: float | None = None  # seconds; YAML may say "90s", "10m", "2h"
    seed: int = Field(0, ge=0, lt=SEED_LIMIT)
    n_startup_trials: int | None = Field(None, ge=0)
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2, gt=1)
    max_failures: int = Field(1, ge=0, le=100)

    @field_validator("time_budget", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        if isinstance(v, str):
            m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", v)
            if not m:
                raise ValueError(f"must be seconds or a duration like 90s, 10m, 2h, but got {v!r}")
            return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
            raise ValueError(f"must be a positive number of seconds, but got {v!r}")
        return v


class ResourcesSection(_Section):
    cpu: float = Field(1, gt=0, le=1024)
    gpu: float = Field(0, ge=0, le=64)
    address: str | None = None


class TrackingSection(_Section):
    uri: str | None = None
    experiment: str | None = None


class Spec(_Section):
    """A validated spec. ``search_space`` is the parsed ``space``; ``source`` the YAML file."""

    name: str
    task: Literal["detection", "instance_segmentation", "semantic_segmentation"]
    model: ModelSection
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection)
    space: dict[str, Any] = Field(default_factory=dict)
    search: SearchSection = Field(default_factory=SearchSection)
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    output_dir: Path = Path("runs")

    _space: SearchSpace = PrivateAttr(default_factory=lambda: SearchSpace([]))
    _source: Path | None = PrivateAttr(default=None)
    _num_classes: int = PrivateAttr(default=0)
    _class_names: list[str] = PrivateAttr(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if len(v) > MAX_NAME:
            raise ValueError(f"must be at most {MAX_NAME} characters, but got {len(v)}")
        if not NAME.fullmatch(v):
            raise ValueError(
                f"must be letters, digits, '_', '-' or '.', starting with a letter or digit, but got {v!r}"
            )
        return v

    @property
    def search_space(self) -> SearchSpace:
        return self._space

    @property
    def source(self) -> Path | None:
        return self._source

    @property
    def num_classes(self) -> int:
        """Dataset classes K (the model gets K + 1 outputs: background is 0)."""
        return self._num_classes

    @property
    def class_names(self) -> list[str]:
        return list(self._class_names)

    @property
    def experiment_dir(self) -> Path:
        return self.output_dir / self.name

    def reference_params(self) -> dict[str, Any] | None:
        """The study's reference trial (the family's torchvision recipe projected into the space:
        only searched parameters, see :meth:`SearchSpace.project`), or None when it is off
        (``search.reference_trial: false``, no recipe for the family, grid search, nothing to set)."""
        from trainables import recipes

        if self.search.reference_trial is False or self.search.algorithm == "grid":
            return None
        fam = families.family_of(self.model.arch)
        recipe = recipes.recipe_for(fam.name if fam else None)
        if recipe is None:
            return None
        values = recipes.recipe_params(recipe, self.train.batch_size, self.train.epochs)
        return self.search_space.project(values) or None

    def trial_config(self, out_dir: Path, threads: int = 1) -> TrialConfig:
        """The fixed settings of one trial of this spec, writing into ``out_dir``."""
        return TrialConfig(
            task=self.task,
            arch=self.model.arch,
            train=DataSplit(self.data.train.images, self.data.train.annotations),
            val=DataSplit(self.data.val.images, self.data.val.annotations),
            out_dir=Path(out_dir),
            weights=self.model.weights,
            weights_backbone=self.model.weights_backbone,
            model_kwargs=self.model.model_kwargs(),
            trainable_sets={k: tuple(v) for k, v in self.model.trainable_sets.items()},
            image_size=self.data.image_size,
            epochs=self.train.epochs,
            batch_size=self.train.batch_size,
            workers=self.train.workers,
            seed=self.train.seed,
            metric=self.objective.metric,
            mode=self.objective.mode,
            device=self.train.device,
            amp=self.train.amp,
            threads=threads,
            limit_train=self.train.limit_train,
            limit_val=self.train.limit_val,
            keep_full_checkpoint=self.train.keep_full_checkpoint,
            eval_base=self.train.eval_base,
        )


# ---------------------------------------------------------------- loading


def read_yaml(path: Path) -> dict[str, Any]:
    """The raw mapping of a spec file; SpecError for a missing file or bad YAML."""
    path = Path(path)
    if not path.is_file():
        raise SpecError("<file>", f"spec file {str(path)!r} does not exist.", "pass the path of a YAML spec.")
    try:
        raw = guards.load_yaml(path.read_text(encoding="utf-8"))
    except guards.YamlRefused as exc:
        raise SpecError("<file>", f"is refused: {exc}.", "fix the YAML.", str(path)) from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise SpecError(
            "<file>", f"is not valid YAML{where}: {problem}.", "fix the YAML syntax.", str(path)
        ) from None
    if not isinstance(raw, dict):
        raise SpecError(
            "<file>",
            f"the top level must be a mapping, but got {short(raw)}.",
            "start with name:, task:, model:, data:, ...",
            str(path),
        )
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with a dotted key; the value is parsed as a YAML scalar (or flow list/map)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise SpecError(
            "--set",
            f"must be KEY=VALUE with a dotted key, but got {text!r}.",
            "write e.g. --set train.epochs=2.",
        )
    try:
        return key, guards.load_yaml(value) if value.strip() else None
    except guards.YamlRefused as exc:
        raise SpecError(f"--set {key}", f"value is refused: {exc}.", "give a plain value.") from None
    except yaml.YAMLError:
        raise SpecError(f"--set {key}", f"value {value!r} is not valid YAML.", "quote it.") from None


def apply_override(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted ``key`` in the raw mapping. Under ``space.`` the longest existing (or the
    whole) parameter name wins: ``space.loss.box=giou`` fixes ``loss.box``, while
    ``space.lr.low=0.001`` edits ``lr``'s bound."""
    parts = key.split(".")
    if parts[0] == "space" and len(parts) > 1:
        space = raw.get("space") if isinstance(raw.get("space"), dict) else {}
        raw["space"] = space
        rest = parts[1:]
        for cut in range(len(rest), 0, -1):
            name = ".".join(rest[:cut])
            if name in space and cut < len(rest) and isinstance(space[name], dict):
                _set_path(space[name], rest[cut:], value, f"space.{name}")
                return
        name = ".".join(rest)
        old = space.get(name)
        keeps_when = isinstance(old, dict) and "when" in old and not isinstance(value, dict)
        space[name] = {"value": value, "when": old["when"]} if keeps_when else value
        return
    _set_path(raw, parts, value, "")


def _set_path(node: dict[str, Any], parts: list[str], value: Any, prefix: str) -> None:
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            path = ".".join(filter(None, [prefix, *parts[: i + 1]]))
            raise SpecError(
                f"--set {path}", f"is a value ({short(child)}), not a section.", "set the key itself."
            )
        node = child
    node[parts[-1]] = value


def load_spec(path: Path | str, overrides: list[str] | tuple[str, ...] = (), study: bool = True) -> Spec:
    """Load, override and validate a spec file (no torch). Raises SpecError naming the key path.
    ``study=False`` (the ``trial`` command) skips the checks that only matter to a study's
    scheduling (``search.grace_period`` against ``train.epochs``)."""
    path = Path(path)
    raw = read_yaml(path)
    for text in overrides:
        apply_override(raw, *parse_override(text))
    try:
        return build_spec(raw, path.resolve().parent, source=path, study=study)
    except SpecError as err:
        raise err.with_source(str(path)) from None


def build_spec(raw: dict[str, Any], base: Path, source: Path | None = None, study: bool = True) -> Spec:
    """Validate a raw mapping; relative paths resolve against ``base``."""
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as exc:
        raise _from_pydantic(exc) from None
    except (OverflowError, RecursionError) as exc:
        raise SpecError(
            "<spec>", f"holds a value that cannot be used ({type(exc).__name__}).", "fix it."
        ) from None
    _resolve_paths(spec, base)
    spec._source = source
    spec._space = parse_space(spec.space)
    _check_model(spec)
    _check_objective(spec)
    _check_space(spec)
    _check_search(spec, study)
    _check_files(spec)
    guards.check_uri_secrets(spec.tracking.uri)
    inputs = guards.spec_inputs(spec)
    guards.check_output(spec.output_dir, inputs, "output_dir", folder=True)
    guards.check_output(spec.output_dir / spec.name, inputs, "name", folder=True)
    _check_data(spec)
    return spec


# ---------------------------------------------------------------- pydantic errors → one line

_FIX = {
    "missing": "add it.",
    "int_parsing": "use a whole number.",
    "int_from_float": "use a whole number.",
    "float_parsing": "use a number.",
    "bool_parsing": "use true or false.",
    "greater_than_equal": "raise the value.",
    "greater_than": "raise the value.",
    "less_than_equal": "lower the value.",
    "less_than": "lower the value.",
    "literal_error": None,
    "dict_type": "write a mapping (key: value lines).",
    "model_type": "write a mapping (key: value lines).",
    "string_type": "write a string.",
    "list_type": "write a list.",
}


def _from_pydantic(exc: ValidationError) -> SpecError:
    err = exc.errors(include_url=False)[0]
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc)
    value = err.get("input")
    kind = err["type"]
    if kind == "extra_forbidden":
        fields = _fields_at(loc[:-1])
        close = did_you_mean(loc[-1], fields)
        return SpecError(
            key,
            f"unknown key {loc[-1]!r}.{close}",
            ("rename it; " if close else "remove it; ") + f"valid keys here: {', '.join(fields)}.",
        )
    if kind == "missing":
        return SpecError(key, "is required but missing.", _FIX["missing"])
    msg = err["msg"].removeprefix("Value error, ")
    msg = msg[0].lower() + msg[1:] if msg else msg
    return SpecError(
        key, f"{msg}, but got {short(value)}." if "but got" not in msg else msg + ".", _FIX.get(kind)
    )


def _fields_at(loc: list[str]) -> list[str]:
    model: Any = Spec
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


# ---------------------------------------------------------------- cross-section checks


def _resolve_paths(spec: Spec, base: Path) -> None:
    for split in (spec.data.train, spec.data.val):
        split.images = (base / split.images).resolve()
        split.annotations = (base / split.annotations).resolve()
    for attr in ("weights", "weights_backbone"):
        value = getattr(spec.model, attr)
        if value is not None and not ENUM_NAME.fullmatch(value) and "://" not in value and ":/" not in value:
            setattr(spec.model, attr, str((base / value).resolve()))
    spec.output_dir = (base / spec.output_dir).resolve()
    for attr in ("weights", "weights_backbone"):
        value = getattr(spec.model, attr)
        if value and value.startswith(("models:/", "runs:/")):
            setattr(spec.model, attr, _registry_file(spec, attr, value))


def _registry_file(spec: Spec, attr: str, uri: str) -> str:
    """The local weights file of a promoted model (``models:/NAME@ALIAS``) or a run artifact."""
    import logging

    from search.tracking import RegistryError, resolve_model_uri, tracking_uri

    store = tracking_uri(spec)
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).is_file():
        raise SpecError(
            f"model.{attr}",
            f"cannot resolve {uri}: the tracking store {store} does not exist.",
            "set tracking.uri to the store the model was promoted in.",
        )
    for name in ("mlflow", "alembic"):  # their INFO lines would break one-line errors
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return str(resolve_model_uri(uri, tracking_uri(spec), cache_dir=spec.output_dir / ".registry"))
    except RegistryError as exc:
        raise SpecError(
            f"model.{attr}", str(exc), "promote a model first, or fix the URI or tracking.uri."
        ) from None


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
            f"{spec.model.arch!r} is a {fam.task} model, but task is {spec.task!r}.",
            f"use one of: {', '.join(same)}, or change task.",
        )
    return fam


def _check_model(spec: Spec) -> None:
    _check_composition(spec, _family(spec))
    for name, globs in spec.model.trainable_sets.items():
        if not globs:
            raise SpecError(f"model.trainable_sets.{name}", "lists no pattern.", "add glob patterns.")
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


def _check_space(spec: Spec) -> None:
    fam = _family(spec)
    for dim in spec.search_space.dims:
        key = f"space.{dim.name}"
        row = params.lookup(dim.name)
        if row is None:
            raise unknown_name(key, dim.name, list(params.PARAMS) + ["loss.weight.<term>"], "trial parameter")
        if spec.task not in row.tasks:
            raise SpecError(
                key,
                f"does not apply to task {spec.task!r} (it applies to {', '.join(row.tasks)}).",
                "remove it.",
            )
        for value in _values(dim):
            problem = row.check(value)
            if problem:
                raise SpecError(key, f"{dim.name} {problem}.", f"{row.doc}: keep values in its legal range.")
        _check_family_values(spec, fam, dim, key)
        if dim.kind in ("float", "int") and row.kind in ("str", "bool"):
            raise SpecError(
                key,
                f"{dim.name} is a {row.kind} parameter, but got a numeric range.",
                "use choices: [...] or a fixed value.",
            )
        if dim.kind == "float" and row.kind == "int":
            raise SpecError(
                key, f"{dim.name} is an integer parameter, but got float bounds.", "use integer low/high."
            )


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
            raise unknown_name(key, term, fam.loss_terms, f"loss term for {spec.model.arch}")
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
    from search.schedulers import SCHEDULER_NAMES

    s = spec.search
    if s.scheduler not in SCHEDULER_NAMES:
        raise unknown_name("search.scheduler", s.scheduler, SCHEDULER_NAMES, "scheduler")
    _check_reference(spec)
    if study and s.grace_period > spec.train.epochs:
        raise SpecError(
            "search.grace_period",
            f"grace_period <= train.epochs must hold, but got {s.grace_period} > {spec.train.epochs}.",
            "lower grace_period or raise train.epochs.",
        )
    if s.algorithm == "grid":
        for dim in spec.search_space.searched:
            if dim.kind in ("float", "int") and dim.step is None:
                raise SpecError(
                    f"space.{dim.name}",
                    f"grid search needs a finite grid with a stated spacing, but this {dim.kind} has "
                    "no step.",
                    "add step: or use choices:.",
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
    if s.algorithm == "grid" and not spec.search_space.searched:
        raise SpecError(
            "search.algorithm",
            "grid search needs at least one searched parameter.",
            "add a parameter with choices or a stepped range to space.",
        )


def _check_reference(spec: Spec) -> None:
    """An explicit ``search.reference_trial: true`` needs a recipe and a sampler that takes it."""
    from trainables import recipes

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


def _check_files(spec: Spec) -> None:
    for split_name in ("train", "val"):
        split = getattr(spec.data, split_name)
        if not split.images.is_dir():
            raise SpecError(
                f"data.{split_name}.images",
                f"image folder {str(split.images)!r} does not exist.",
                "point it at the folder that file_name entries are relative to.",
            )
        if not split.annotations.is_file():
            raise SpecError(
                f"data.{split_name}.annotations",
                f"annotation file {str(split.annotations)!r} does not exist.",
                "point it at a COCO JSON file.",
            )
    for attr in ("weights", "weights_backbone"):
        value = getattr(spec.model, attr)
        if value and not ENUM_NAME.fullmatch(value) and not Path(value).is_file():
            raise SpecError(
                f"model.{attr}",
                f"weights file {value!r} does not exist.",
                "use a torchvision enum name (e.g. DEFAULT), an existing file, or none.",
            )


def _check_data(spec: Spec) -> None:
    from trainables import coco

    names = None
    for split_name in ("train", "val"):
        split = getattr(spec.data, split_name)
        try:
            index = coco.load_coco(split.annotations, split.images, task=spec.task)
        except coco.DatasetError as exc:
            raise SpecError(
                f"data.{split_name}", str(exc), "fix the dataset or point at another file."
            ) from None
        if names is None:
            names = index.class_names
        elif index.class_names != names:
            raise SpecError(
                "data.val.annotations",
                f"categories {index.class_names} differ from the training split's {names}.",
                "use the same categories in both splits.",
            )
    spec._class_names = list(names or [])
    spec._num_classes = len(spec._class_names)


# ---------------------------------------------------------------- checks that need torch


def deep_check(spec: Spec) -> dict[str, Any]:
    """Checks that import torch/torchvision: builder and weight enum names, model.kwargs names (none
    that the builder chain would ignore silently), freeze patterns.

    Returns facts found on the way (parameter count, matched patterns) for ``validate``.
    """
    import torchvision

    from trainables import models

    arch = spec.model.arch
    fam = families.family_of(arch)
    composed = fam is not None and fam.composed
    builders = torchvision.models.list_models()
    if not composed and arch not in builders:
        raise unknown_name(
            "model.arch", arch, [a for a in builders if families.family_of(a)], "torchvision builder"
        )
    if composed:
        _check_backbone(spec.model.backbone or "")
    for attr, fn in (("weights", arch), ("weights_backbone", spec.model.backbone if composed else None)):
        value = getattr(spec.model, attr)
        if value and ENUM_NAME.fullmatch(value):
            _check_enum(f"model.{attr}", value, fn, arch)
    _check_kwargs(arch, spec.model.kwargs)
    from trainables.compose import ComposeError

    try:
        model = models.skeleton(arch, spec.num_classes + 1, spec.model.model_kwargs())
    except ComposeError as exc:
        raise SpecError(exc.key, exc.message + ".", "see README: Composed models.") from None
    except (TypeError, ValueError, NotImplementedError) as exc:  # lraspp: aux_loss=True
        raise SpecError(
            "model.kwargs",
            f"{arch} rejects these builder arguments: {exc}.",
            "use the builder's keyword arguments (see torchvision's documentation).",
        ) from None
    _check_activation_scope(spec, arch, model)
    check_trainable_sets(spec, model)
    tensors = list(model.parameters())
    return {"parameters": sum(p.numel() for p in tensors), "parameter_tensors": len(tensors)}


def check_weights(spec: Spec) -> None:
    """Build the model once on the CPU from the spec's base weights (parameter defaults): a file
    that ``torch.load(weights_only=True)`` refuses, one that does not fit the architecture (its
    missing/unexpected keys in the message), or an enum whose file is not in the hub cache is a
    :class:`SpecError` on ``model.weights`` (or ``model.weights_backbone``), not N failed trials.
    Then :func:`check_trainable_sets` on that model. Loads the file: ``validate --quick`` skips it."""
    import warnings

    from trainables import models
    from trainables import params as P

    key = "model.weights" if spec.model.weights else "model.weights_backbone"
    cfg = spec.trial_config(out_dir=Path("."), threads=1)
    try:
        with warnings.catch_warnings():  # e.g. torch's pickle-protocol warning before a refusal
            warnings.simplefilter("ignore")
            model, _ = models.build_model(cfg, P.resolve({}), spec.num_classes + 1)
    except models.WeightsError as exc:
        raise SpecError(
            key,
            " ".join(str(exc).split()),
            "use a weights file of this architecture, an enum whose file is in the torch hub cache, or none.",
        ) from None
    check_trainable_sets(spec, model, f"the model built from {key}")


def check_trainable_sets(spec: Spec, model: Any, built: str = "") -> None:
    """Every pattern of every ``model.trainable_sets`` entry matches a parameter of ``model``
    (``built`` says which model that is, for the message). :func:`deep_check` runs it on the
    weightless skeleton; the launcher runs it again on the model built from the base weights, where
    BatchNorm layers saved from FrozenBatchNorm2d hold buffers, not parameters."""
    import fnmatch

    from torchvision.ops.misc import FrozenBatchNorm2d

    from trainables import freeze

    names = [n for n, _ in model.named_parameters()]
    frozen_bn = [
        f"{path}.{b}" if path else b
        for path, module in model.named_modules()
        if isinstance(module, FrozenBatchNorm2d)
        for b, _ in module.named_buffers(recurse=False)
    ]
    for set_name, globs in spec.model.trainable_sets.items():
        key = f"model.trainable_sets.{set_name}"
        for glob in globs:
            if not any(fnmatch.fnmatchcase(n, glob) for n in names) and any(
                fnmatch.fnmatchcase(b, glob) for b in frozen_bn
            ):
                raise SpecError(
                    key,
                    f"pattern {glob!r} matches only FrozenBatchNorm2d statistics in {built or 'the model'}; "
                    "the pretrained model keeps those fixed (buffers, not parameters).",
                    "drop the BatchNorm pattern (those layers stay frozen) or match conv/linear layers.",
                )
        try:
            freeze.match(names, list(globs))
        except ValueError as exc:
            why = f"{exc} (in {built})" if built else str(exc)
            raise SpecError(
                key, why, "fix the pattern; parameter names are model.named_parameters() names."
            ) from None


def _dim_values(spec: Spec, name: str) -> list[Any]:
    """The values parameter ``name`` can take in the spec's space (its default when absent)."""
    dim = spec.search_space.by_name.get(name)
    if dim is None:
        return [params.PARAMS[name].default]
    if dim.kind == "fixed":
        return [dim.value]
    return list(dim.choices)


def _check_activation_scope(spec: Spec, arch: str, model: Any) -> None:
    """A swap scope that holds no swappable activation module in ``arch`` (``neck`` on FPN
    families, fcn, lraspp) would make every activation choice a silent no-op there."""
    from trainables import activations

    fam = families.family_of(arch)
    if fam is None or all(a == "keep" for a in _dim_values(spec, "activation")):
        return
    counts = {
        scope: sum(activations.count_activations(model, fam, scope).values())
        for scope in params.ACTIVATION_SCOPES
    }
    for scope in _dim_values(spec, "activation_scope"):
        if scope in counts and counts[scope] == 0:
            key = "space.activation_scope" if "activation_scope" in spec.search_space else "space.activation"
            usable = [s for s, n in counts.items() if n]
            raise SpecError(
                key,
                f"activation_scope {scope!r} of {arch} holds no activation module that a swap could "
                "replace, so every activation choice would change nothing there.",
                f"use activation_scope {', '.join(repr(s) for s in usable)}, or activation: keep.",
            )


def _check_kwargs(arch: str, kwargs: dict[str, Any]) -> None:
    """model.kwargs that the builder chain would swallow with ``**kwargs`` and ignore silently."""
    from trainables import models

    ignored = models.ignored_kwargs(arch, kwargs)
    if not ignored:
        return
    key, valid = ignored[0], sorted(models.accepted_kwargs(arch) or ())
    shown = ", ".join(valid) if len(valid) <= 40 else ", ".join(valid[:40]) + ", ..."
    raise SpecError(
        f"model.kwargs.{key}",
        f"{arch} does not take {key!r} (its builder chain would ignore it silently)."
        f"{did_you_mean(key, valid)}",
        f"use one of: {shown}.",
    )


def _check_backbone(name: str) -> None:
    from trainables import compose

    valid = compose.backbones()
    if name in valid:
        return
    why = next((w for prefix, w in compose.UNSUPPORTED.items() if name.startswith(prefix)), None)
    problem = (
        f"{name!r} does not compose: {why}."
        if why
        else (f"unknown classification backbone {name!r}.{did_you_mean(name, valid)}")
    )
    raise SpecError("model.backbone", problem, f"use one of: {', '.join(valid)}.")


def _check_enum(key: str, value: str, arch: str | None, model_arch: str) -> None:
    import torchvision

    if arch is None:  # backbone weights: the builder's weights_backbone enum
        from trainables import models

        enum = models.backbone_weights_enum(model_arch)
    else:
        enum = torchvision.models.get_model_weights(arch)
    if enum is None:
        raise SpecError(key, f"{model_arch} takes no backbone weights, but got {value!r}.", "use none.")
    valid = [m.name for m in enum] + ["DEFAULT"]
    if value not in valid:
        raise unknown_name(key, value, valid, f"weight name of {enum.__name__}")


def duration_text(seconds: float | None) -> str:
    if seconds is None or math.isinf(seconds):
        return "none"
    return f"{seconds:.0f}s"
