"""Checks of a spec that import torch/torchvision: builder and weight enum names, the base
weights loading and fitting, ``model.kwargs`` names, freeze patterns and activation scopes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from search.errors import SpecError, did_you_mean, unknown_name
from search.spec.schema import ENUM_NAME, Spec
from trainables import families, params


def deep_check(spec: Spec) -> dict[str, Any]:
    """Checks that import torch/torchvision: builder and weight enum names, model.kwargs names (none
    that the builder chain would ignore silently) and types, freeze patterns, the image files'
    headers.

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
    _check_trainable_k(spec, model, fam)
    _check_image_files(spec)
    tensors = list(model.parameters())
    facts = {"parameters": sum(p.numel() for p in tensors), "parameter_tensors": len(tensors)}
    if spec.model.trainable_sets and set(_dim_values(spec, "norm")) == {"frozen"}:
        # every trial's BatchNorm parameters become buffers (a trial matches its sets after that)
        check_trainable_sets(spec, model, "the model with norm: frozen", frozen_norms=True)
    return facts


def check_weights(spec: Spec) -> None:
    """Build the model once on the CPU from the spec's base weights (parameter defaults): a file
    that ``torch.load(weights_only=True)`` refuses, one that does not fit the architecture (its
    missing/unexpected keys in the message), or an enum whose file is not in the hub cache is a
    :class:`SpecError` on ``model.weights`` (or ``model.weights_backbone``), not N failed trials.
    Then :func:`check_trainable_sets` on that model. Loads the file: ``validate --quick`` skips it."""
    import warnings

    from trainables import models
    from trainables import params as P
    from trainables.weights import WeightsError

    key = "model.weights" if spec.model.weights else "model.weights_backbone"
    cfg = spec.trial_config(out_dir=Path("."), threads=1)
    try:
        with warnings.catch_warnings():  # e.g. torch's pickle-protocol warning before a refusal
            warnings.simplefilter("ignore")
            model, info = models.build_model(cfg, P.resolve({}), spec.num_classes + 1)
    except WeightsError as exc:
        raise SpecError(
            key,
            " ".join(str(exc).split()),
            exc.fix
            or "use a weights file of this architecture, an enum whose file is in the torch hub "
            "cache, or none.",
        ) from None
    spec._unfit = (list(info.get("unfit") or []), len(model.state_dict()))  # said as a note
    check_trainable_sets(spec, model, f"the model built from {key}")


def check_trainable_sets(spec: Spec, model: Any, built: str = "", frozen_norms: bool = False) -> None:
    """Every pattern of every ``model.trainable_sets`` entry matches a parameter of ``model``
    (``built`` says which model that is, for the message). :func:`deep_check` runs it on the
    weightless skeleton; the launcher runs it again on the model built from the base weights, where
    BatchNorm layers saved from FrozenBatchNorm2d hold buffers, not parameters (``frozen_norms``:
    every BatchNorm2d counts as one, as ``norm: frozen`` makes them)."""
    import fnmatch

    from trainables import freeze

    frozen_bn = freeze.frozen_norm_tensors(model, every_norm=frozen_norms)
    fixed = set(frozen_bn)
    names = [n for n, _ in model.named_parameters() if n not in fixed]
    for set_name, globs in spec.model.trainable_sets.items():
        key = f"model.trainable_sets.{set_name}"
        for glob in globs:
            if not any(fnmatch.fnmatchcase(n, glob) for n in names) and any(
                fnmatch.fnmatchcase(b, glob) for b in frozen_bn
            ):
                raise SpecError(
                    key,
                    f"pattern {glob!r} matches only FrozenBatchNorm2d statistics in {built or 'the model'}; "
                    "they are fixed there (buffers, not parameters).",
                    "drop the BatchNorm pattern (those layers stay frozen), match conv/linear layers, or "
                    "let them train with space.norm: train or affine.",
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


def _check_trainable_k(spec: Spec, model: Any, fam: Any) -> None:
    """``trainable_k`` (backbone stages ``backbone_last_k`` trains) at most the backbone's stage
    count: above it every stage trains, as at the count, and a range would spend trials on copies."""
    from trainables import freeze

    dim = spec.search_space.by_name.get("trainable_k")
    if dim is None or fam is None or not fam.stage_roots:
        return
    top = dim.value if dim.kind == "fixed" else dim.high if dim.kind == "int" else max(dim.choices)
    stages = len(freeze.backbone_stages(model, fam))
    if isinstance(top, (int, float)) and top > stages:
        raise SpecError(
            "space.trainable_k",
            f"{spec.model.arch}'s backbone has {stages} stages, but trainable_k reaches {top} (above "
            f"{stages} every stage trains, the same trial as {stages}).",
            f"use at most {stages}.",
        )


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


def _check_image_files(spec: Spec) -> None:
    """Each image the annotations list is an image of their width x height (its header read, as
    the first epoch would decode it): a non-image or a wrong size fails here, not hours in."""
    from trainables.coco import DatasetError
    from trainables.data import check_image_files

    for split in ("train", "val"):
        try:
            check_image_files([rec for s, rec in spec._images if s == split])
        except DatasetError as exc:
            raise SpecError(
                f"data.{split}", str(exc), exc.fix or "fix the dataset or point at another file."
            ) from None


def _check_kwargs(arch: str, kwargs: dict[str, Any]) -> None:
    """model.kwargs that the builder chain would swallow with ``**kwargs`` and ignore silently."""
    from trainables import builder_kwargs

    ignored = builder_kwargs.ignored_kwargs(arch, kwargs)
    if not ignored:
        if (wrong := builder_kwargs.mistyped_kwarg(arch, kwargs)) is not None:
            key, words, default = wrong
            raise SpecError(
                f"model.kwargs.{key}",
                f"{arch}'s {key!r} takes {words}, but got {kwargs[key]!r}.",
                f"give {words} (torchvision's default is {default!r}).",
            )
        return
    key, valid = ignored[0], sorted(builder_kwargs.accepted_kwargs(arch) or ())
    shown = ", ".join(valid) if len(valid) <= 40 else ", ".join(valid[:40]) + ", ..."
    raise SpecError(
        f"model.kwargs.{key}",
        f"{arch} does not take {key!r} (its builder chain would ignore it silently)."
        f"{did_you_mean(key, valid, is_key=True)}",
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
        from trainables.weights import backbone_weights_enum

        enum = backbone_weights_enum(model_arch)
    else:
        enum = torchvision.models.get_model_weights(arch)
    if enum is None:
        raise SpecError(key, f"{model_arch} takes no backbone weights, but got {value!r}.", "use none.")
    valid = [m.name for m in enum] + ["DEFAULT"]
    if value not in valid:
        raise unknown_name(key, value, valid, f"weight name of {enum.__name__}")
