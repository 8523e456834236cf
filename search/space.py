"""The search space: typed dimensions with conditions, turned into an Optuna define-by-run function.

A spec's ``space`` maps a trial-parameter name (see :mod:`trainables.params`) to either a plain
value (a fixed constant) or a mapping:

- ``{low, high, log?, step?}``: float, or int when ``type: int`` or both bounds are integers
  without ``log``/float ``step``;
- ``{choices: [...]}``: categorical;
- ``{value: X}``: fixed constant (useful with ``when``);
- any of them with ``when: {other: value-or-list}``: the parameter exists only when every named
  parameter is active and takes one of the listed values.

Optuna is imported only when a study is built, so parsing and validation stay fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from search.errors import SpecError, short, unknown_name
from search.space_words import as_bool, bool_words

if TYPE_CHECKING:  # pragma: no cover
    import optuna

KINDS = ("float", "int", "categorical", "fixed")
_KEYS = {"type", "low", "high", "log", "step", "choices", "value", "when"}
_SCALAR = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class Dim:
    """One dimension. ``when`` maps a parameter name to the tuple of values that activate it."""

    name: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()
    value: Any = None
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def can_take(self, value: Any) -> bool:
        """Whether this dimension can ever take ``value`` (used to check ``when`` conditions)."""
        if self.kind == "fixed":
            return value == self.value
        if self.kind == "categorical":
            return any(value == c and type(value) is type(c) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return self.low <= value <= self.high

    def default(self) -> Any:
        """The value used when a trial runs without search: log/linear midpoint, first choice."""
        if self.kind == "fixed":
            return self.value
        if self.kind == "categorical":
            return self.choices[0]
        mid = math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2
        if self.step:
            mid = self.low + round((mid - self.low) / self.step) * self.step
        return int(round(mid)) if self.kind == "int" else float(mid)

    def distribution(self) -> optuna.distributions.BaseDistribution | None:
        """The Optuna distribution (None for a fixed constant)."""
        from optuna import distributions as d

        if self.kind == "float":
            return d.FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return d.IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        if self.kind == "categorical":
            return d.CategoricalDistribution(self.choices)
        return None

    def describe(self) -> dict[str, Any]:
        """A plain dict (for artifacts and ``--dry-run``)."""
        out: dict[str, Any] = {"type": self.kind}
        if self.kind in ("float", "int"):
            out.update(low=self.low, high=self.high, log=self.log)
            if self.step:
                out["step"] = self.step
        elif self.kind == "categorical":
            out["choices"] = list(self.choices)
        else:
            out["value"] = self.value
        if self.when:
            out["when"] = {k: list(v) for k, v in self.when.items()}
        return out


class SearchSpace:
    """Dimensions in dependency order (every ``when`` names an earlier dimension)."""

    def __init__(self, dims: list[Dim]):
        self.dims = _topological(dims)
        self.by_name = {d.name: d for d in self.dims}

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    @property
    def searched(self) -> list[Dim]:
        return [d for d in self.dims if d.kind != "fixed"]

    def never_active(self) -> list[str]:
        """Searched dimensions whose ``when`` names a fixed parameter at a value it does not list
        (e.g. ``step_epochs`` when ``schedule: step`` while ``schedule`` is fixed to ``cosine``)."""
        fixed = {d.name: d.value for d in self.dims if d.kind == "fixed"}
        return [
            d.name
            for d in self.searched
            if any(k in fixed and fixed[k] not in allowed for k, allowed in d.when.items())
        ]

    def is_active(self, dim: Dim, values: dict[str, Any]) -> bool:
        return all(k in values and values[k] in allowed for k, allowed in dim.when.items())

    def sample(self, trial: optuna.Trial) -> dict[str, Any]:
        """Suggest every active dimension on an Optuna trial; fixed ones are included as values."""
        values: dict[str, Any] = {}
        for dim in self.dims:
            if not self.is_active(dim, values):
                continue
            if dim.kind == "fixed":
                values[dim.name] = dim.value
            elif dim.kind == "float":
                values[dim.name] = trial.suggest_float(
                    dim.name, dim.low, dim.high, log=dim.log, step=dim.step
                )
            elif dim.kind == "int":
                values[dim.name] = trial.suggest_int(
                    dim.name, dim.low, dim.high, log=dim.log, step=dim.step or 1
                )
            else:
                values[dim.name] = trial.suggest_categorical(dim.name, list(dim.choices))
        return values

    def define_by_run(self, trial: optuna.Trial) -> dict[str, Any]:
        """Ray's ``OptunaSearch(space=...)`` form: suggest on ``trial``, return the constants."""
        values = self.sample(trial)
        return {d.name: values[d.name] for d in self.dims if d.kind == "fixed" and d.name in values}

    def defaults(self, fixed: dict[str, Any] | None = None) -> dict[str, Any]:
        """One configuration without search: each active dimension at its default."""
        values: dict[str, Any] = {}
        for dim in self.dims:
            if self.is_active(dim, values):
                values[dim.name] = (fixed or {}).get(dim.name, dim.default())
        return values

    def project(self, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` (e.g. a reference recipe) projected into the searched dimensions: numbers
        clipped into ``[low, high]`` (snapped to ``step``, rounded for ints), a categorical value
        kept only when it is one of the choices. Fixed (unsearched) dimensions are left out, as
        are names the values do not give and inactive conditional dimensions: the sampler, or the
        spec's constant, decides those."""
        out: dict[str, Any] = {}
        chosen: dict[str, Any] = {d.name: d.value for d in self.dims if d.kind == "fixed"}
        for dim in self.dims:
            if dim.kind == "fixed" or dim.name not in values:
                continue
            if dim.when and all(k in chosen for k in dim.when) and not self.is_active(dim, chosen):
                continue
            v = _project_value(dim, values[dim.name])
            if v is not None:
                out[dim.name] = chosen[dim.name] = v
        return out

    def unprojected(self, values: dict[str, Any]) -> dict[str, Any]:
        """The searched parameters the sampler picks in a trial of the projected ``values``: a value
        :meth:`project` cannot keep (not among the choices), or None where ``values`` names none
        (only those that can be active there)."""
        kept = self.project(values)
        chosen = {**{d.name: d.value for d in self.dims if d.kind == "fixed"}, **kept}
        return {
            d.name: values.get(d.name)
            for d in self.searched
            if d.name not in kept and (not all(k in chosen for k in d.when) or self.is_active(d, chosen))
        }

    def overridden(self, values: dict[str, Any]) -> dict[str, Any]:
        """The ``values`` (e.g. a recipe's) that the space's active fixed constants replace:
        ``{name: {"spec": constant, "given": value}}``."""
        chosen = {**{d.name: d.value for d in self.dims if d.kind == "fixed"}, **self.project(values)}
        return {
            d.name: {"spec": d.value, "given": values[d.name]}
            for d in self.dims
            if d.kind == "fixed"
            and d.name in values
            and self.is_active(d, chosen)
            and not (values[d.name] == d.value and type(values[d.name]) is type(d.value))
            and not (_numbers(values[d.name], d.value) and float(values[d.name]) == float(d.value))
        }

    def grid(self) -> dict[str, list[Any]]:
        """The grid for Optuna's GridSampler; each dimension must be finite."""
        out = {}
        for dim in self.searched:
            if dim.kind == "categorical":
                out[dim.name] = list(dim.choices)
            else:
                n = int(round((dim.high - dim.low) / dim.step))
                out[dim.name] = [dim.low + i * dim.step for i in range(n + 1)]
        return out

    def branch_configs(self) -> list[dict[str, Any]]:
        """Configurations that together take every categorical choice at least once."""
        configs: list[dict[str, Any]] = []
        for dim in self.searched:
            if dim.kind != "categorical":
                continue
            for choice in dim.choices:
                if any(c.get(dim.name) == choice for c in configs):
                    continue
                config = self._forced(dim, choice)
                if config is not None:
                    configs.append(config)
        return configs or [self.defaults()]

    def _forced(self, dim: Dim, choice: Any) -> dict[str, Any] | None:
        """Defaults, but with ``dim`` at ``choice`` and its conditions' first values forced."""
        forced = {dim.name: choice}
        pending = list(dim.when.items())
        while pending:
            name, allowed = pending.pop()
            forced.setdefault(name, allowed[0])
            pending.extend(self.by_name[name].when.items())
        config = self.defaults(forced)
        return config if config.get(dim.name) == choice else None

    def describe(self) -> dict[str, Any]:
        return {d.name: d.describe() for d in self.dims}

    def fixed(self, name: str, value: Any) -> SearchSpace:
        """A copy where ``name`` is the constant ``value`` (keeping its condition)."""
        when = self.by_name[name].when if name in self.by_name else {}
        dims = [d for d in self.dims if d.name != name] + [Dim(name, "fixed", value=value, when=when)]
        return SearchSpace(dims)


def _project_value(dim: Dim, value: Any) -> Any:
    """One value projected into ``dim`` (None: it cannot be, the sampler chooses)."""
    if dim.kind == "categorical":
        return next((c for c in dim.choices if c == value and type(c) is type(value)), None)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    v = min(max(float(value), dim.low), dim.high)
    if dim.step:
        v = min(dim.low + round((v - dim.low) / dim.step) * dim.step, dim.high)
    return int(round(v)) if dim.kind == "int" else float(v)


# ---------------------------------------------------------------- parsing and validation


def parse_space(
    raw: Any, key: str = "space", kind_of: Callable[[str], str | None] | None = None
) -> SearchSpace:
    """Parse a spec's ``space`` mapping; raises :class:`SpecError` naming the key path.
    ``kind_of(name)``: a parameter's own type ("float", "int"; None when unknown), which a range
    without ``type`` takes (else int when both bounds are integers)."""
    if raw is None:
        return SearchSpace([])
    if not isinstance(raw, dict):
        raise SpecError(key, f"must be a mapping of parameter name to definition, but got {short(raw)}.")
    kind_of = kind_of or (lambda name: None)
    dims = [parse_dim(str(name), body, f"{key}.{name}", kind_of(str(name))) for name, body in raw.items()]
    _check_conditions(dims, key)
    return SearchSpace(dims)


def parse_dim(name: str, body: Any, key: str, own_kind: str | None = None) -> Dim:
    """One dimension from its YAML body (``own_kind``: the parameter's type, see parse_space)."""
    if not name or name != name.strip():
        raise SpecError(key, f"parameter name must be non-empty without spaces, but got {name!r}.")
    if own_kind == "bool":  # nesterov: no (YAML 1.2 reads the word as a string)
        body = bool_words(body)
    if isinstance(body, _SCALAR):
        return Dim(name, "fixed", value=body)
    if isinstance(body, list):
        raise SpecError(
            key, f"a bare list is ambiguous, got {short(body)}.", f"write {{choices: {short(body)}}}."
        )
    if not isinstance(body, dict):
        raise SpecError(key, f"must be a value or a mapping, but got {short(body)}.")
    extra = set(body) - _KEYS
    if extra:
        raise unknown_name(f"{key}.{sorted(extra)[0]}", sorted(extra)[0], _KEYS, "key", is_key=True)
    when = _parse_when(body.get("when"), f"{key}.when")
    kind = _kind(body, key, own_kind)
    if kind == "fixed":
        if "value" not in body:
            raise SpecError(key, "type fixed needs a value.", "add value: X.")
        return Dim(name, "fixed", value=_scalar(body["value"], f"{key}.value"), when=when)
    if kind == "categorical":
        return Dim(name, "categorical", choices=_choices(body.get("choices"), f"{key}.choices"), when=when)
    return _numeric(name, kind, body, key, when)


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


def _scalar(value: Any, key: str) -> Any:
    if not isinstance(value, _SCALAR):
        raise SpecError(key, f"must be a number, string, boolean or null, but got {short(value)}.")
    return value


def _choices(raw: Any, key: str) -> tuple[Any, ...]:
    if not isinstance(raw, list) or not raw:
        raise SpecError(
            key, f"choices must be a non-empty list, but got {short(raw)}.", "list at least one value."
        )
    for i, item in enumerate(raw):
        _scalar(item, f"{key}[{i}]")
    seen: list[Any] = []
    for item in raw:
        if any(item == s and (type(item) is type(s) or _numbers(item, s)) for s in seen):
            raise SpecError(
                key, f"choices must be distinct, but {item!r} appears twice.", "remove the duplicate."
            )
        seen.append(item)
    return tuple(raw)


def _numbers(a: Any, b: Any) -> bool:
    """Both plain numbers (1 and 1.0 are one choice; True and 1 are not)."""
    return all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))


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
            raise SpecError(f"{key}.{name}", "lists no value, so the parameter could never be active.")
        out[str(name)] = tuple(_scalar(v, f"{key}.{name}") for v in values)
    return out


def _check_conditions(dims: list[Dim], key: str) -> None:
    by_name = {d.name: d for d in dims}
    for dim in dims:
        for name, allowed in dim.when.items():
            where = f"{key}.{dim.name}.when.{name}"
            if name == dim.name:
                raise SpecError(where, "a parameter cannot depend on itself.")
            if name not in by_name:
                raise unknown_name(where, name, by_name, "parameter in when")
            other = by_name[name]
            possible = [v for v in allowed if other.can_take(v)]
            # A fixed parent (often pinned with --set) simply leaves the parameter inactive.
            if not possible and other.kind != "fixed":
                can = (
                    list(other.choices)
                    if other.kind == "categorical"
                    else ([other.value] if other.kind == "fixed" else f"[{other.low}, {other.high}]")
                )
                raise SpecError(
                    where,
                    f"{name} can never take {short(list(allowed))} (it takes {can}), so "
                    f"{dim.name} would never be active.",
                    f"use a value {name} can take.",
                )
    _topological(dims, key)


def _topological(dims: list[Dim], key: str = "space") -> list[Dim]:
    """Order so that conditions come first; a cycle is a :class:`SpecError`."""
    by_name = {d.name: d for d in dims}
    order: list[Dim] = []
    state: dict[str, int] = {}

    def visit(dim: Dim, stack: list[str]) -> None:
        if state.get(dim.name) == 2:
            return
        if state.get(dim.name) == 1:
            cycle = " -> ".join(stack[stack.index(dim.name) :] + [dim.name])
            raise SpecError(
                f"{key}.{dim.name}.when",
                f"conditions form a cycle: {cycle}.",
                "make one of them unconditional.",
            )
        state[dim.name] = 1
        for name in dim.when:
            if name in by_name:
                visit(by_name[name], stack + [dim.name])
        state[dim.name] = 2
        order.append(dim)

    for dim in dims:
        visit(dim, [])
    return order


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
