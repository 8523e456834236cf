"""Settings that are valid but do nothing in this spec (or data that will not train what it
names): one line each, said by ``validate``, the dry run and the launch header (they refuse
nothing: a ``--set`` that turns the reference trial off should not have to clear its scaling
rules too)."""

from __future__ import annotations

from typing import Any

from search.samplers import MODEL_BASED, grid_size
from search.schedulers import SCHEDULERS, resolved


def spec_notes(spec: Any, study: bool = True) -> list[str]:
    """One line per setting without effect: the recipe's lr scaling rules without a recipe
    trial (or a rule whose recipe trial repeats another's), a start-up as long as the study (a
    model-based sampler that never models), a start-up given to a sampler without one, more
    trials than the grid has points (``study``: these four); base weights that leave tensors random
    (after :func:`~search.spec.check_weights`); val images that are train images; and a class the
    training split never annotates."""
    out = _study_notes(spec) if study else []
    out += _schedule_notes(spec)
    unfit, tensors = spec._unfit
    if unfit:
        out.append(
            f"model.weights leaves {len(unfit)} of the model's {tensors} tensors outside the class "
            f"predictors random (not in the file, or of another shape there, e.g. {unfit[:3]}): the "
            "trials start from another model than the file's (check model.* settings such as "
            "fpn_channels against the file's)."
        )
    if shared := spec._shared:
        val = sum(1 for split, _ in spec._images if split == "val")
        out.append(
            f"data.val shares {len(shared)} of its {val} images with data.train (e.g. {shared[:2]}): the "
            "objective scores images the trials train on, so it overrates them and ranks by memory."
        )
    if untrained := spec._untrained:
        out.append(
            f"data.train annotates no object of class(es) {untrained}: no trial learns them, and their "
            "objects in the val split (if any) count against every trial."
        )
    return out


def _study_notes(spec: Any) -> list[str]:
    s = spec.search
    out = []
    searched = bool(spec.search_space.searched)
    if searched and spec._recipe() is not None and not spec.recipe_trials():  # asked for, silently none
        unused = spec.search_space.unprojected(spec._recipe_values(s.reference_scaling[0]))
        given = ", ".join(
            f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in unused.items() if v is not None
        )
        out.append(
            "search.reference_trial: no reference trial runs: the recipe sets none of the searched "
            f"parameters{f' (its {given}: not among your choices)' if given else ''}."
        )
    if s.reference_scaling != ["linear"] and not spec.recipe_trials() and not (searched and spec._recipe()):
        why = "the recipe sets none of the searched parameters"  # no parameter is searched
        if s.reference_trial is False:
            why = "search.reference_trial is false"
        elif s.algorithm == "grid":
            why = "grid search takes no recipe trial"
        elif spec._recipe() is None:
            why = f"{spec.model.arch} has no reference recipe"
        out.append(f"search.reference_scaling {s.reference_scaling} has no effect: {why}.")
    elif (kept := [rule for rule, _ in spec.recipe_trials()]) and len(kept) < len(s.reference_scaling):
        dropped = [rule for rule in s.reference_scaling if rule not in kept]
        out.append(
            f"search.reference_scaling {dropped}: no trial of its own, as its recipe trial would be that "
            f"of {kept} (the lr fixed, or clipped to the same bound)."
        )
    given = s.n_startup_trials is not None
    if given and s.algorithm in MODEL_BASED and s.n_startup_trials >= s.num_trials:
        out.append(
            f"search.n_startup_trials {s.n_startup_trials} >= search.num_trials {s.num_trials}: every "
            f"trial is a random start-up (or recipe) trial, so {s.algorithm} never proposes one from a "
            "model (this is random search)."
        )
    elif given and s.algorithm not in MODEL_BASED:
        out.append(f"search.n_startup_trials has no effect: {s.algorithm} has no start-up trials.")
    if s.algorithm == "grid" and (points := grid_size(spec.search_space.grid())) < s.num_trials:
        out.append(
            f"search.num_trials {s.num_trials}: the grid has {points} point(s), so the study runs "
            f"{points} trials."
        )
    elif s.algorithm == "grid" and points > s.num_trials:
        out.append(
            f"search.num_trials {s.num_trials}: the grid has {points} points, so the study runs "
            f"{s.num_trials} of them, which the sampler picks."
        )
    scheduler = SCHEDULERS[resolved(s.scheduler)]
    for key in ("grace_period", "reduction_factor"):
        if key in s.model_fields_set and key not in scheduler.uses:
            out.append(f"search.{key} has no effect: scheduler {s.scheduler} does not read it.")
    return out + _without_effect(spec)


def _without_effect(spec: Any) -> list[str]:
    """Space parameters that act under none of the values their controller can take here (e.g.
    ``nesterov`` beside a fixed AdamW, ``step_epochs`` under a cosine schedule, ``trainable_k``
    when no ``trainable`` choice is ``backbone_last_k``; :func:`trainables.params.in_effect`)."""
    from search.space import one_of
    from trainables import params as P

    space, out = spec.search_space, []
    constants = space.constants()
    for dim in space.dims:
        ruler = P.controller(dim.name, spec.task)
        other = space.by_name.get(ruler) if ruler else None
        if ruler is None or (other is not None and other.kind not in ("fixed", "categorical")):
            continue
        values = [
            v for v in _can_take(spec, ruler) if ruler not in dim.when or one_of(v, dim.when[ruler])
        ]  # (else: inactive)
        own = dim.value if dim.kind == "fixed" else dim.choices[0] if dim.kind == "categorical" else dim.low
        trials = [P.resolve({**constants, ruler: v, dim.name: own}) for v in values]
        if values and not any(dim.name in P.in_effect(t, spec.task, spec.model.arch) for t in trials):
            out.append(
                f"space.{dim.name} has no effect: it acts under no {ruler} the space allows ({values})."
            )
    return out


def _schedule_notes(spec: Any) -> list[str]:
    """Lr schedules that no trial lives to see: a warmup of ``train.epochs`` or more (the lr still
    rising at the last step; :func:`trainables.optim.build_scheduler` caps it at the whole run), a
    step schedule whose first drop comes after the last step."""
    epochs, out = spec.train.epochs, []
    warm = min(float(v) for v in _can_take(spec, "warmup_epochs"))
    if warm >= epochs:
        out.append(
            f"space.warmup_epochs {warm:g} >= train.epochs {epochs}: every trial warms up for all of its "
            "training (its lr reaches the searched value only at the last step) and space.schedule never "
            "acts."
        )
    elif max(float(v) for v in _can_take(spec, "warmup_epochs")) >= epochs:
        out.append(
            f"space.warmup_epochs reaches train.epochs {epochs}: the trials that draw {epochs} or more warm "
            "up for all of their training (their lr reaches the searched value only at the last step)."
        )
    first = min(int(v) for v in _can_take(spec, "step_epochs"))
    if warm < epochs and "step" in _can_take(spec, "schedule") and warm + first >= epochs:
        out.append(
            f"space.step_epochs {first} after a warmup of {warm:g} reaches train.epochs {epochs}: the "
            "step schedule never drops the lr (a constant lr after warmup)."
        )
    return out


def _can_take(spec: Any, name: str) -> list[Any]:
    """The values trial parameter ``name`` can take in the spec's space: its default when the space
    leaves it out, its fixed value, its choices, or a range's bounds."""
    from trainables import params as P

    dim = spec.search_space.by_name.get(name)
    if dim is None or dim.kind == "fixed":
        return [P.PARAMS[name].default if dim is None else dim.value]
    return list(dim.choices) if dim.kind == "categorical" else [dim.low, dim.high]


def weights_note(params: dict[str, Any]) -> str | None:
    """What a weights file written from a trial of ``params`` (resolved) cannot say itself: its
    activation swap (a state_dict has no activation modules), which a spec using it as a base must
    repeat, else it evaluates another model than the one trained. None when there is nothing to say."""
    activation, scope = params.get("activation", "keep"), params.get("activation_scope")
    if activation == "keep":
        return None
    return (
        f"these weights were trained with activation {activation!r} in scope {scope!r}, which a "
        "state_dict does not record: a spec that uses them as model.weights should fix "
        f"space.activation: {activation} and space.activation_scope: {scope}."
    )
