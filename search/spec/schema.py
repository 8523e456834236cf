"""The spec's sections as pydantic models, and :class:`Spec` (a validated spec).

Names of plug-in families are not listed here: they are checked against their tables
(:mod:`search.samplers`, :mod:`search.schedulers`, ``trainables``' tables) by
:mod:`search.spec.checks`.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from types import UnionType
from typing import Any, ClassVar, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator

from search.space import SearchSpace
from trainables import families
from trainables import params as trial_params
from trainables.config import DataSplit, TrialConfig

TASKS = ("detection", "instance_segmentation", "semantic_segmentation")
TASK_METRICS = {
    "detection": ("map", "map50", "map75", "map_small", "map_medium", "map_large", "mar100"),
    "instance_segmentation": ("map", "map50", "map75", "mask_map", "mask_map50", "mask_map75"),
    "semantic_segmentation": ("miou", "fg_miou", "pixel_acc", "dice"),
}
ENUM_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
REGISTRY_SCHEMES = ("models:/", "runs:/")  # weights resolved by search.registry in the preflight


def is_registry_uri(value: str | None) -> bool:
    return bool(value) and str(value).startswith(REGISTRY_SCHEMES)


SQLITE = "sqlite:///"  # a SQLite store's URI: SQLITE + its file (absolute: a 4th slash)


def sqlite_file(uri: str) -> Path | None:
    """The file of a SQLite store's URI, as written; None for any other store."""
    return Path(uri[len(SQLITE) :]) if uri.startswith(SQLITE) else None


def file_store(uri: str) -> Path | None:
    """The folder of an MLflow file store's URI (``file:`` or a plain path), as written; None for
    any other store (MLflow's bare ``databricks`` is no path)."""
    if uri.split(":", 1)[0] == "databricks":
        return None
    try:
        parts = urlsplit(uri)
    except ValueError:
        return None
    return Path(parts.path or uri) if parts.scheme in ("", "file") else None


MAX_NAME = 100


def name_like(text: str) -> str:
    """A study name that keeps what it can of ``text`` (a refused name's suggested fix)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-._")[:MAX_NAME] or "study-1"


# a validator's ValueError says "<rule>, but got <value>{FIX}<fix>"; the loader splits the fix off
FIX = " | fix: "
MAX_GRID = 10_000
FILE_STORE_ENV = "MLFLOW_ALLOW_FILE_STORE"  # MLflow's opt-in to its file store
SEED_LIMIT = 2**32  # numpy's and Optuna's seeds are 32-bit


def _numeric(annotation: Any) -> bool:
    """A number field (``int``, ``float``, or either or None), not one that takes a boolean too."""
    args = set(get_args(annotation)) if get_origin(annotation) in (Union, UnionType) else {annotation}
    return bool(args & {int, float}) and args <= {int, float, type(None)}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        """pydantic reads true/false as 1/0 for a number: ``train.epochs: true`` ran one epoch."""
        if isinstance(v, bool) and _numeric(cls.model_fields[info.field_name].annotation):
            raise ValueError(
                f"must be a number, but got {str(v).lower()}{FIX}write a number: true and false are not "
                "read as 1 and 0."
            )
        return v


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
            raise ValueError(f"must be auto, cpu, cuda or cuda:N, but got {v!r}{FIX}write one of those.")
        return v


class ObjectiveSection(_Section):
    metric: str = "map"
    mode: Literal["max", "min"] = "max"


class SearchSection(_Section):
    algorithm: str = "tpe"  # a name of search.samplers.SAMPLERS (checked by search.spec.checks)
    scheduler: str = "auto"  # a name of search.schedulers.SCHEDULERS (no Ray import here)
    reference_trial: bool | None = None  # None: on when the family has a reference recipe
    # the recipe's trials, one per lr batch-scaling rule (trainables.recipes.LR_SCALINGS); the
    # first is the reference trial, the others ordinary trials enqueued after it
    reference_scaling: list[str] = Field(default_factory=lambda: ["linear"])
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
                raise ValueError(
                    f"must be seconds or a duration like 90s, 10m, 2h, but got {v!r}{FIX}write e.g. 45m."
                )
            seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
            if 0 < seconds < math.inf:
                return seconds
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf):
            raise ValueError(
                f"must be a positive, finite number of seconds, but got {v!r}{FIX}write e.g. 2700 or 45m."
            )
        return v


class ResourcesSection(_Section):
    cpu: float = Field(1, gt=0, le=1024)
    gpu: float = Field(0, ge=0, le=64)
    address: str | None = None


class TrackingSection(_Section):
    uri: str | None = None
    experiment: str | None = None

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        """MLflow's file store (a folder, ``file:``) refuses every record unless the user opts in."""
        opted_in = os.environ.get(FILE_STORE_ENV, "").lower() in ("true", "1")
        if v is not None and not opted_in and file_store(v) is not None:
            raise ValueError(
                f"must be a store MLflow writes, but got {v!r}: MLflow's file store (a folder, file:) "
                f"refuses every record now (maintenance mode){FIX}use sqlite:///<folder>/mlflow.db (or leave "
                f"it unset for <output_dir>/mlflow.db), or set {FILE_STORE_ENV}=true to keep the file store."
            )
        if v is not None and (db := sqlite_file(v)) is not None and (not db.name or v.endswith("/")):
            raise ValueError(
                f"must name a SQLite file, but got {v!r}{FIX}write e.g. sqlite:///runs/mlflow.db."
            )
        return v


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
    _category_ids: list[int] = PrivateAttr(default_factory=list)  # the train split's, in class order
    _untrained: list[str] = PrivateAttr(default_factory=list)  # classes the train split never annotates
    _unfit: tuple[list[str], int] = PrivateAttr(
        default=([], 0)
    )  # base tensors the file lacks (check_weights)
    _images: list[Any] = PrivateAttr(default_factory=list)  # both splits' ImageRecords (check_data)
    _shared: list[str] = PrivateAttr(default_factory=list)  # val images that are train images too

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if len(v) > MAX_NAME:
            raise ValueError(f"must be at most {MAX_NAME} characters, but got {len(v)}{FIX}shorten it.")
        if not NAME.fullmatch(v):
            raise ValueError(
                f"must be letters, digits, '_', '-' or '.', starting with a letter or digit, but got {v!r}"
                f"{FIX}write e.g. {name_like(v)!r}."
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
    def category_ids(self) -> list[int]:
        """The COCO category id of each class (``class_names``' order: label i is ``[i - 1]``)."""
        return list(self._category_ids)

    @property
    def experiment_dir(self) -> Path:
        """The study's folder, absolute."""
        return Path(self.output_dir).resolve() / self.name

    def reference_params(self) -> dict[str, Any] | None:
        """The study's reference trial (the family's torchvision recipe projected into the space:
        only searched parameters, see :meth:`SearchSpace.project`), or None when it is off
        (``search.reference_trial: false``, no recipe for the family, grid search, nothing to set)."""
        trials = self.recipe_trials()
        return trials[0][1] if trials else None

    def recipe_trials(self) -> list[tuple[str, dict[str, Any]]]:
        """``(scaling, params)`` of the recipe's trials, in ``search.reference_scaling`` order: the
        recipe with its lr scaled to the batch by each rule, projected into the space; a rule
        whose projection repeats an earlier one's (lr not searched, or clipped to the same bound)
        is left out. The first is the reference trial; empty when the reference trial is off."""
        out: list[tuple[str, dict[str, Any]]] = []
        for scaling in self.search.reference_scaling if self._recipe() else []:
            params = self.search_space.project(self._recipe_values(scaling))
            if params and all(params != p for _, p in out):
                out.append((scaling, params))
        return out

    def recipe_unused(self) -> dict[str, Any]:
        """The searched parameters the sampler picks in the recipe trials: the recipe's value where
        it is not among the choices (e.g. ``trainable: all`` when the choices are ``heads``,
        ``heads_and_top``), None where the recipe names none. Empty without recipe trials."""
        if not self.recipe_trials():
            return {}
        return self._acting(
            self.search_space.unprojected(self._recipe_values(self.search.reference_scaling[0]))
        )

    def recipe_overridden(self) -> dict[str, Any]:
        """The recipe's values that the spec's fixed constants replace in the recipe trials (e.g.
        ``optimizer: sgd`` under a fixed ``optimizer: adamw``), and those of parameters the space
        leaves out, which keep their defaults there as in every trial (``"default": true``, e.g.
        SSDlite's weight decay 4e-5 under the default 1e-4). Empty without recipe trials."""
        if not self.recipe_trials():
            return {}
        values = self._recipe_values(self.search.reference_scaling[0])
        defaults = trial_params.resolve({})
        left_out = {
            k: {"spec": defaults[k], "given": v, "default": True}
            for k, v in values.items()
            if k not in self.search_space.by_name and k in defaults and v != defaults[k]
        }
        return self._acting({**self.search_space.overridden(values), **left_out})

    def _acting(self, names: dict[str, Any]) -> dict[str, Any]:
        """``names`` without those that have no effect in the reference trial (``trainable_k``
        beside ``trainable: all``, momentum under a fixed AdamW, ...; :func:`trainables.params.in_effect`
        on its projected and fixed values), unless what decides that is itself left to the sampler."""
        trial = trial_params.resolve({**self.search_space.constants(), **(self.reference_params() or {})})
        acting = trial_params.in_effect(trial, self.task, self.model.arch)
        return {
            k: v
            for k, v in names.items()
            if k in acting or k not in trial or trial_params.controller(k, self.task) in names
        }

    def _recipe(self) -> Any:
        """The family's torchvision recipe, or None when there is none or the reference is off."""
        from trainables import recipes

        if self.search.reference_trial is False or self.search.algorithm == "grid":
            return None
        fam = families.family_of(self.model.arch)
        return recipes.recipe_for(fam.name if fam else None)

    def _recipe_values(self, scaling: str) -> dict[str, Any]:
        """The recipe's values for this spec's batch and epochs, its lr scaled by ``scaling``."""
        from trainables import recipes

        return recipes.recipe_params(
            self._recipe(), self.train.batch_size, self.train.epochs, scaling, self.search_space.by_name
        )

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
