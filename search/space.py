"""The search space: typed dimensions with conditions, turned into an Optuna define-by-run function.

A spec's ``space`` maps a trial-parameter name (see :mod:`trainables.params`) to either a plain
value (a fixed constant) or a mapping:

- ``{low, high, log?, step?}``: float, or int when ``type: int`` or both bounds are integers
  without ``log``/float ``step``;
- ``{choices: [...]}``: categorical;
- ``{value: X}``: fixed constant (useful with ``when``);
- any of them with ``when: {other: value-or-list}``: the parameter exists only when every named
  parameter is active and takes one of the listed values.

Parsing (each error named by its key path) is :mod:`search.space_parse`. Optuna is imported only
when a study is built, so parsing and validation stay fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from search.errors import SpecError

if TYPE_CHECKING:  # pragma: no cover
    import optuna


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
            return one_of(value, (self.value,))
        if self.kind == "categorical":
            return one_of(value, self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not self.low <= value <= self.high or (self.kind == "int" and value != int(value)):
            return False
        return not self.step or math.isclose(_snap(self, value), value, rel_tol=1e-9, abs_tol=1e-12)

    def default(self) -> Any:
        """The value used when a trial runs without search: log/linear midpoint, first choice."""
        if self.kind == "fixed":
            return self.value
        if self.kind == "categorical":
            return self.choices[0]
        return _snap(self, math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2)

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
        self.dims = topological(dims)
        self.by_name = {d.name: d for d in self.dims}

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    @property
    def searched(self) -> list[Dim]:
        return [d for d in self.dims if d.kind != "fixed"]

    def joint(self) -> dict[str, Any]:
        """The Optuna distributions of the searched parameters every trial has (no ``when``)."""
        return {d.name: d.distribution() for d in self.searched if not d.when}

    def constants(self) -> dict[str, Any]:
        """The spec's fixed (unsearched) parameters and their values."""
        return {d.name: d.value for d in self.dims if d.kind == "fixed"}

    def never_active(self) -> list[str]:
        """Searched dimensions whose ``when`` names a fixed parameter at a value it does not list
        (e.g. ``step_epochs`` when ``schedule: step`` while ``schedule`` is fixed to ``cosine``)."""
        fixed = self.constants()
        return [
            d.name
            for d in self.searched
            if any(k in fixed and not one_of(fixed[k], allowed) for k, allowed in d.when.items())
        ]

    def is_active(self, dim: Dim, values: dict[str, Any]) -> bool:
        return all(k in values and one_of(values[k], allowed) for k, allowed in dim.when.items())

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
        chosen = self.constants()
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
        chosen = {**self.constants(), **kept}
        return {
            d.name: values.get(d.name)
            for d in self.searched
            if d.name not in kept and (not all(k in chosen for k in d.when) or self.is_active(d, chosen))
        }

    def overridden(self, values: dict[str, Any]) -> dict[str, Any]:
        """The ``values`` (e.g. a recipe's) that the space's active fixed constants replace:
        ``{name: {"spec": constant, "given": value}}``."""
        chosen = {**self.constants(), **self.project(values)}
        return {
            d.name: {"spec": d.value, "given": values[d.name]}
            for d in self.dims
            if d.kind == "fixed"
            and d.name in values
            and self.is_active(d, chosen)
            and not one_of(values[d.name], (d.value,))
        }

    def grid(self) -> dict[str, list[Any]]:
        """The grid for Optuna's GridSampler; each dimension must be finite."""
        out = {}
        for dim in self.searched:
            if dim.kind == "categorical":
                out[dim.name] = list(dim.choices)
            else:
                n = int(round((dim.high - dim.low) / dim.step))
                out[dim.name] = [_snap(dim, dim.low + i * dim.step) for i in range(n + 1)]
        return out

    def branch_configs(self) -> list[dict[str, Any]]:
        """Configurations that together take every categorical choice at least once."""
        configs: list[dict[str, Any]] = []
        for dim in self.searched:
            if dim.kind != "categorical":
                continue
            for choice in dim.choices:
                if any(dim.name in c and one_of(c[dim.name], (choice,)) for c in configs):
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
            parent = self.by_name[name]  # a value it can take (a constant: its own), else no branch
            takes = [a for a in allowed if parent.can_take(a)]
            if not takes:
                return None
            forced.setdefault(name, takes[0])
            pending.extend(parent.when.items())
        config = self.defaults(forced)
        return config if dim.name in config and one_of(config[dim.name], (choice,)) else None

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
        return next((c for c in dim.choices if one_of(value, (c,))), None)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return _snap(dim, value)


def _snap(dim: Dim, value: float) -> float | int:
    """``value`` within ``[low, high]``, on the ``step`` grid (a float without the sum's drift:
    0.8 + 0.05 is 0.85, not 0.8500000000000001), an int for an int dimension."""
    v = min(max(float(value), dim.low), dim.high)
    if dim.step:  # low + k * step in decimal, as the spec writes them
        k = round((v - dim.low) / dim.step)
        v = min(float(Decimal(repr(dim.low)) + k * Decimal(repr(dim.step))), dim.high)
    return int(round(v)) if dim.kind == "int" else float(v)


def one_of(value: Any, options: Any) -> bool:
    """``value`` is one of ``options``: an equal plain number (1 and 1.0; True is not 1), else equal
    and of one type. The space's one rule for a value (choices, ``when``, constants)."""
    key = (float, float(value)) if _number(value) else (type(value), value)
    return any(key == ((float, float(o)) if _number(o) else (type(o), o)) for o in options)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def topological(dims: list[Dim], key: str = "space") -> list[Dim]:
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
