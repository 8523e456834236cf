"""Parsing a spec's ``space`` mapping into a :class:`~search.space.SearchSpace`: each error a
:class:`SpecError` naming its key path (the forms are listed in :mod:`search.space`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from search.errors import SpecError, short, unknown_name
from search.space import Dim, SearchSpace, one_of, topological
from search.space_words import as_bool, bool_words

KINDS = ("float", "int", "categorical", "fixed")
_KEYS = {"type", "low", "high", "log", "step", "choices", "value", "when"}
_SCALAR = (bool, int, float, str, type(None))


def parse_space(
    raw: Any,
    key: str = "space",
    kind_of: Callable[[str], str | None] | None = None,
    conditions: bool = True,
) -> SearchSpace:
    """Parse a spec's ``space`` mapping; raises :class:`SpecError` naming the key path.
    ``kind_of(name)``: a parameter's own type ("float", "int"; None when unknown), which a range
    without ``type`` takes (else int when both bounds are integers). ``conditions=False`` leaves
    the values of :func:`check_conditions` to the caller, after it has checked each parameter's own
    (a misspelt choice is then named as such, not as a ``when`` that cannot hold)."""
    if raw is None:
        return SearchSpace([])
    if not isinstance(raw, dict):
        raise SpecError(
            key,
            f"must be a mapping of parameter name to definition, but got {short(raw)}.",
            "write e.g. space: {lr: {low: 1.0e-4, high: 1.0e-2}}.",
        )
    kind_of = kind_of or (lambda name: None)
    dims = [parse_dim(str(name), body, f"{key}.{name}", kind_of(str(name))) for name, body in raw.items()]
    check_conditions(dims, key, values=conditions)
    return SearchSpace(dims)


def parse_dim(name: str, body: Any, key: str, own_kind: str | None = None) -> Dim:
    """One dimension from its YAML body (``own_kind``: the parameter's type, see parse_space)."""
    if not name or name != name.strip():
        raise SpecError(
            key,
            f"parameter name must be non-empty without spaces, but got {name!r}.",
            "write the name without surrounding spaces, e.g. lr.",
        )
    if own_kind == "bool":  # nesterov: no (YAML 1.2 reads the word as a string)
        body = bool_words(body)
    if isinstance(body, _SCALAR):
        return Dim(name, "fixed", value=body)
    if isinstance(body, list):
        raise SpecError(
            key, f"a bare list is ambiguous, got {short(body)}.", f"write {{choices: {short(body)}}}."
        )
    if not isinstance(body, dict):
        raise SpecError(
            key,
            f"must be a value or a mapping, but got {short(body)}.",
            "write a fixed value, or {low: ..., high: ...} or {choices: [...]}.",
        )
    extra = set(body) - _KEYS
    if extra:
        raise unknown_name(f"{key}.{sorted(extra)[0]}", sorted(extra)[0], _KEYS, "key", is_key=True)
    _check_one_form(body, key)
    when = _parse_when(body.get("when"), f"{key}.when")
    kind = _kind(body, key, own_kind)
    if kind == "fixed":
        if "value" not in body:
            raise SpecError(key, "type fixed needs a value.", "add value: X.")
        value = _scalar(body["value"], f"{key}.value", "write one plain value, e.g. value: 0.01.")
        return Dim(name, "fixed", value=value, when=when)
    if kind == "categorical":
        return Dim(name, "categorical", choices=_choices(body.get("choices"), f"{key}.choices"), when=when)
    return _numeric(name, kind, body, key, when)


# The three forms of a definition (besides type and when): a parameter takes exactly one.
_FORMS = {"value": ("value",), "choices": ("choices",), "low/high": ("low", "high", "step", "log")}


def _check_one_form(body: dict[str, Any], key: str) -> None:
    """``{low: 0.001, high: 0.01, value: 0.5}`` was fixed at 0.5 (outside its range) without a word:
    one of the forms won silently; a definition mixing them is refused."""
    given = {form: [f for f in fields if f in body] for form, fields in _FORMS.items()}
    given = {form: fields for form, fields in given.items() if fields}
    if len(given) < 2:
        return
    named = [", ".join(fields) for fields in given.values()]
    raise SpecError(
        key,
        "a parameter must have exactly one form (value fixes it; choices or low/high search it), "
        f"but got {' and '.join(named)}.",
        f"keep one form: remove {' or remove '.join(named)} (--set {key}=X replaces the whole "
        "definition with the fixed value X).",
    )


def _kind(body: dict[str, Any], key: str, own_kind: str | None = None) -> str:
    kind = body.get("type")
    if kind is not None:
        if kind not in KINDS:
            raise unknown_name(f"{key}.type", kind, KINDS, "type")
        return kind
    if "choices" in body:
        return "categorical"
    if "value" in body:
        return "fixed"
    if "low" in body or "high" in body:
        ints = all(
            isinstance(body.get(b), int) and not isinstance(body.get(b), bool) for b in ("low", "high")
        )
        step = body.get("step")
        ints = ints and (step is None or isinstance(step, int))
        if own_kind in ("float", "int"):  # grad_clip: {low: 1, high: 10} is a float range
            return "int" if own_kind == "int" and ints else "float"
        return "int" if ints and not body.get("log") else "float"
    raise SpecError(key, "cannot tell the parameter's type.", "give low/high, choices, value, or type.")


def _numeric(name: str, kind: str, body: dict[str, Any], key: str, when: dict) -> Dim:
    for bound in ("low", "high"):
        if bound not in body:
            raise SpecError(key, f"a {kind} parameter needs {bound}.", f"add {bound}: <number>.")
        value, at = body[bound], f"{key}.{bound}"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SpecError(
                at, f"must be a finite number, but got {short(value)}.", "write a number, e.g. 1.0e-3."
            )
        if kind == "int" and not float(value).is_integer():
            why, fix = (
                f"an int parameter needs integer bounds, but got {value!r}.",
                "use whole numbers or type: float.",
            )
            raise SpecError(at, why, fix)
    low, high = body["low"], body["high"]
    log = as_bool(body.get("log", False), f"{key}.log")
    step = body.get("step")
    if low >= high:
        raise SpecError(
            key,
            f"low < high must hold, but got low={low!r} and high={high!r}.",
            "swap them, or use a fixed value for a single value.",
        )
    if log and low <= 0:
        raise SpecError(
            f"{key}.low",
            f"low > 0 must hold when log is true, but got low={low!r}.",
            "use a positive low, or set log: false.",
        )
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not step > 0:
            raise SpecError(
                f"{key}.step", f"step > 0 must hold, but got step={short(step)}.", "use a positive step."
            )
        if log:
            raise SpecError(f"{key}.step", "step cannot be combined with log: true.", "drop one of them.")
        if kind == "int" and not float(step).is_integer():
            raise SpecError(
                f"{key}.step",
                f"an int parameter needs an integer step, but got {step!r}.",
                "use a whole-number step, or type: float.",
            )
        _check_step_divides(low, high, step, key)
    if kind == "int":
        low, high = int(low), int(high)
        step = int(step) if step is not None else None
    else:
        low, high = float(low), float(high)
        step = float(step) if step is not None else None
    return Dim(name, kind, low=low, high=high, log=log, step=step, when=when)


def _scalar(value: Any, key: str, fix: str) -> Any:
    if not isinstance(value, _SCALAR):
        raise SpecError(key, f"must be a number, string, boolean or null, but got {short(value)}.", fix)
    return value


def _choices(raw: Any, key: str) -> tuple[Any, ...]:
    if not isinstance(raw, list) or not raw:
        raise SpecError(
            key, f"choices must be a non-empty list, but got {short(raw)}.", "list at least one value."
        )
    for i, item in enumerate(raw):
        _scalar(item, f"{key}[{i}]", "list plain values, e.g. choices: [sgd, adamw] (no nested lists).")
    seen: list[Any] = []
    for item in raw:
        if one_of(item, seen):
            raise SpecError(
                key, f"choices must be distinct, but {item!r} appears twice.", "remove the duplicate."
            )
        seen.append(item)
    return tuple(raw)


def _parse_when(raw: Any, key: str) -> dict[str, tuple[Any, ...]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise SpecError(
            key,
            f"must be a mapping of parameter to value(s), but got {short(raw)}.",
            "write e.g. when: {optimizer: sgd}.",
        )
    out = {}
    for name, values in raw.items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise SpecError(
                f"{key}.{name}",
                "lists no value, so the parameter could never be active.",
                f"list the value(s) of {name} it acts under, e.g. {name}: [a, b], or drop {name} from when.",
            )
        fix = f"list plain values, e.g. {name}: [a, b]."
        out[str(name)] = tuple(_scalar(v, f"{key}.{name}", fix) for v in values)
    return out


def check_conditions(dims: list[Dim], key: str, values: bool = True) -> None:
    """Each ``when`` names another parameter (``values``: and a value it can take); no cycles."""
    by_name = {d.name: d for d in dims}
    for dim in dims:
        for name, allowed in dim.when.items():
            where = f"{key}.{dim.name}.when.{name}"
            if name == dim.name:
                raise SpecError(
                    where,
                    "a parameter cannot depend on itself.",
                    f"drop {name} from its own when (a when names other parameters).",
                )
            if name not in by_name:
                raise unknown_name(where, name, by_name, "parameter in when")
            other = by_name[name]
            if not values:
                continue
            if other.kind == "float" and not other.step:
                raise SpecError(
                    where,
                    f"{name} is a continuous range, which takes {short(list(allowed))} with probability "
                    f"0, so {dim.name} would almost never be active.",
                    f"condition on a parameter with choices (or give {name} a step or choices).",
                )
            possible = [v for v in allowed if other.can_take(v)]
            # A fixed parent (often pinned with --set) simply leaves the parameter inactive.
            if not possible and other.kind != "fixed":
                can = (
                    list(other.choices)
                    if other.kind == "categorical"
                    else ([other.value] if other.kind == "fixed" else _range_words(other))
                )
                raise SpecError(
                    where,
                    f"{name} can never take {short(list(allowed))} (it takes {can}), so "
                    f"{dim.name} would never be active.",
                    f"use a value {name} can take.",
                )
    topological(dims, key)


def _range_words(dim: Any) -> str:
    """The values a range dimension takes, in words: ``integers in [1, 3]``, ``[1, 10] in steps of 3``."""
    what = "integers in " if dim.kind == "int" and not dim.step else ""
    return f"{what}[{dim.low}, {dim.high}]" + (f" in steps of {dim.step}" if dim.step else "")


def _check_step_divides(low: float, high: float, step: float, key: str) -> None:
    """``high - low`` a whole number of steps: else ``high`` is never sampled (Optuna lowers it
    with a warning) and the range validate prints is not the one searched."""
    n = (high - low) / step
    if abs(n - round(n)) > 1e-9 * max(1.0, abs(n)) or round(n) < 1:
        top = low + math.floor(n + 1e-9) * step
        fix = f"set high: {top:g} (low + a whole number of steps)" if top > low else "use a smaller step"
        raise SpecError(
            f"{key}.step",
            f"high - low must be a whole number of steps (at least one), but got low={low!r}, "
            f"high={high!r}, step={step!r}.",
            f"{fix}.",
        )
