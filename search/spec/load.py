"""Loading a spec: YAML (with :mod:`search.guards`' limits), ``--set`` overrides, pydantic errors
mapped to one line naming the key path, then the cross-section checks of
:mod:`search.spec.checks`. Registry URIs (``models:/``, ``runs:/``) stay URIs here: the commands'
preflight resolves them (:func:`search.registry.resolve_spec_weights`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from search import guards
from search.errors import SpecError, did_you_mean, short
from search.space_parse import parse_space
from search.spec.checks import check_data, check_spec
from search.spec.schema import ENUM_NAME, FIX, SQLITE, Spec


def read_yaml(path: Path) -> dict[str, Any]:
    """The raw mapping of a spec file; SpecError for a missing file or bad YAML."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise SpecError("<file>", f"spec file {str(path)!r} {what}.", "pass the path of a YAML spec.")
    try:
        raw = guards.load_yaml(path.read_text(encoding="utf-8"))
    except guards.YamlRefused as exc:
        if exc.fix:  # e.g. a merge key (<<): the refusal says its own fix
            raise SpecError(exc.key or "<file>", f"{exc}.", exc.fix, str(path)) from None
        if exc.key:  # a duplicate key: YAML would have kept the last one silently
            raise SpecError(exc.key, f"is {exc}.", "keep one of them.", str(path)) from None
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
        where = f"--set {key}" + (f" (its {exc.key})" if exc.key else "")
        raise SpecError(where, f"value is refused: {exc}.", exc.fix or "give a plain value.") from None
    except yaml.YAMLError:
        raise SpecError(f"--set {key}", f"value {value!r} is not valid YAML.", "quote it.") from None


def apply_override(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted ``key`` in the raw mapping. Under ``space.`` the longest existing (or the
    whole) parameter name wins: ``space.loss.box=giou`` fixes ``loss.box``, while
    ``space.lr.low=0.001`` edits ``lr``'s bound (``space.lr.value=X`` fixes it, as ``space.lr=X``)."""
    parts = key.split(".")
    if parts[0] == "space" and len(parts) > 1:
        space = raw.get("space") if isinstance(raw.get("space"), dict) else {}
        raw["space"] = space
        rest = parts[1:]
        for cut in range(len(rest), 0, -1):
            name, field = ".".join(rest[:cut]), rest[cut:]
            if name not in space or not field:
                continue
            node = space[name]
            if field == ["value"]:  # fixes it, as space.lr=X does (not a value beside low/high)
                when = node.get("when") if isinstance(node, dict) else None
                space[name] = value if when is None else {"value": value, "when": when}
                return
            if field == ["when"] and not isinstance(node, dict):  # a plain constant
                space[name] = {"value": node, "when": value}
                return
            fixed = not isinstance(node, dict) or "value" in node
            if fixed and len(field) == 1 and field[0] in _DIM_FIELDS:
                shown = node.get("value") if isinstance(node, dict) else node
                raise SpecError(
                    f"--set {key}",
                    f"space.{name} is a fixed value ({short(shown)}), which has no {field[0]}.",
                    f"set the whole parameter, e.g. --set 'space.{name}={{low: ..., high: ...}}'.",
                )
            if isinstance(node, dict):
                _set_path(node, field, value, f"space.{name}")
                return
        name = ".".join(rest)
        old = space.get(name)
        keeps_when = isinstance(old, dict) and "when" in old and not isinstance(value, dict)
        space[name] = {"value": value, "when": old["when"]} if keeps_when else value
        return
    _set_path(raw, parts, value, "")


_DIM_FIELDS = ("low", "high", "step", "log", "choices", "type")  # the fields of a searched parameter


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
    ``study=False`` (the ``trial`` command) skips the checks that only matter to a study: its
    scheduling (``grace_period``, HyperBand's concurrency), grid search, the reference trial and
    the GPUs Ray gives a trial."""
    path = Path(path)
    raw = read_yaml(path)
    for text in overrides:
        key, value = parse_override(text)
        apply_override(raw, key, from_cwd(key, value))
    try:
        return build_spec(raw, path.resolve().parent, source=path, study=study)
    except SpecError as err:  # a value given with --set is named by its key (never its value: a secret?)
        keys = [parse_override(text)[0] for text in overrides]
        given = [key for key in keys if _same_entry(key, err.key)]
        raise err.with_source(f"{path} (--set {given[-1]})" if given else str(path)) from None


def _same_entry(given: str, key: str) -> bool:
    """``--set given`` changed the entry the error names: that key, one below it (space.lr for
    space.lr.low), or one above it (space.lr.low for a rule of space.lr)."""
    return bool(key) and (
        given == key or key.startswith((f"{given}.", f"{given}[")) or given.startswith((f"{key}.", f"{key}["))
    )


# The spec's path keys, one list for both rules: a relative path in the file resolves against the
# file's folder (_resolve_paths); one given with --set, like any path typed on a command line,
# against the current directory (from_cwd, before the file's folder is applied).
PATH_KEYS = (
    "output_dir",
    "data.train.images",
    "data.train.annotations",
    "data.val.images",
    "data.val.annotations",
    "model.weights",
    "model.weights_backbone",
    "tracking.uri",  # a relative sqlite:/// store
)


def from_cwd(key: str, value: Any) -> Any:
    """An override's value with its relative paths made absolute against the current directory:
    ``--set output_dir=runs`` run from ``~/w`` means ``~/w/runs`` whatever folder the spec is in.
    A section given whole (``--set data.val={images: v, annotations: v.json}``) has its path keys
    made absolute too; weight names, URIs and ``none`` stay as written."""
    for path_key in PATH_KEYS:
        if path_key == key:
            return _absolute(path_key, value)
        if not path_key.startswith(key + "."):
            continue
        *parents, leaf = path_key[len(key) + 1 :].split(".")
        node = value
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node[leaf] = _absolute(path_key, node[leaf])
    return value


def _absolute(path_key: str, value: Any) -> Any:
    if not isinstance(value, str) or not value.strip():
        return value
    return _against(path_key, value, Path.cwd())


def _against(path_key: str, value: str | Path, base: Path) -> str | Path:
    """The value of one of :data:`PATH_KEYS` with a relative path made absolute against ``base``
    (the same type back); weight names, URIs and ``none`` as they are."""
    if path_key == "tracking.uri":
        return sqlite_against(str(value), base)
    if path_key.startswith("model.") and not _is_file(str(value)):
        return value
    path = (base / Path(value).expanduser()).resolve()  # ~/runs: the home folder's, as in a shell
    return path if isinstance(value, Path) else str(path)


def sqlite_against(uri: str | None, base: Path) -> str | None:
    """``sqlite:///mlflow.db`` (a relative file) as ``sqlite:////<base>/mlflow.db``: a study's store
    must not depend on the directory a later command (``resume``, ``best``, ``ui``) runs in. Other
    URIs (an absolute sqlite file, ``:memory:``, a server) stay as written."""
    if not uri or not uri.startswith(SQLITE):
        return uri
    rest = uri[len(SQLITE) :]
    if not rest or rest.startswith("/") or rest.startswith(":memory:"):
        return uri
    return SQLITE + str((base / rest).resolve())


def _is_file(weights: str) -> bool:
    """Whether a ``model.weights``/``weights_backbone`` value names a file (not ``none``, a weight
    enum name or a URI)."""
    text = weights.strip()
    return not (text.lower() == "none" or ENUM_NAME.fullmatch(text) or "://" in text or ":/" in text)


def build_spec(
    raw: dict[str, Any],
    base: Path,
    source: Path | None = None,
    study: bool = True,
    outputs: bool = True,
    classes: dict[str, Any] | None = None,
) -> Spec:
    """Validate a raw mapping; relative paths resolve against ``base``. ``outputs=False`` skips the
    checks of the folders a launch writes (a study's saved spec read by export and promote, whose
    folder may have moved away from its ``output_dir``) and of the base weights file (a checkpoint
    holding every tensor needs none; the bundle asks for it where a checkpoint does); ``classes``
    (a study's ``facts.json``: ``class_names``, ``category_ids``) stand for the data, which is
    then not read (nor needed)."""
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
    spec._space = parse_space(spec.space, kind_of=_param_kind, conditions=False)  # check_spec: after values
    check_spec(spec, study, data=classes is None, weights=outputs)
    guards.check_uri_secrets(spec.tracking.uri)
    if outputs:
        guards.check_spec_outputs(spec)
    if classes is None:
        check_data(spec)
    else:
        spec._class_names, spec._category_ids = list(classes["class_names"]), list(classes["category_ids"])
        spec._num_classes = len(spec._class_names)
    return spec


# ---------------------------------------------------------------- pydantic errors → one line

_FIX = {
    "missing": "add it.",
    "int_parsing": "use a whole number.",
    "int_from_float": "use a whole number.",
    "int_parsing_size": "use a whole number of a sensible size.",
    "float_parsing": "use a number.",
    "finite_number": "use a finite number.",
    "bool_parsing": "use true or false.",
    "greater_than_equal": "raise the value.",
    "greater_than": "raise the value.",
    "less_than_equal": "lower the value.",
    "less_than": "lower the value.",
    "literal_error": "write one of those values.",
    "dict_type": "write a mapping (key: value lines).",
    "model_type": "write a mapping (key: value lines).",
    "string_type": "write a string.",
    "list_type": "write a list.",
    "int_type": "write a whole number.",
    "float_type": "write a number.",
    "bool_type": "write true or false.",
    "path_type": "write a path, e.g. runs or data/images (quote it if YAML reads it as a number).",
}
# pydantic's own wording where it names Python types, as the spec's reader words it
_MSG = {"path_type": "must be a path"}


def _from_pydantic(exc: ValidationError) -> SpecError:
    # the deepest error: in a union ("a list, or a list of lists") the member that got furthest
    err = max(exc.errors(include_url=False), key=lambda e: len(e["loc"]))
    loc = [str(p) for p in err["loc"] if "[" not in str(p)]  # no union tags ("list[float]")
    key = ".".join(loc)
    value = err.get("input")
    kind = err["type"]
    if kind == "extra_forbidden":
        fields = _fields_at(loc[:-1])
        close = did_you_mean(loc[-1], fields, is_key=True)
        return SpecError(
            key,
            f"unknown key {loc[-1]!r}.{close}",
            ("rename it; " if close else "remove it; ") + f"valid keys here: {', '.join(fields)}.",
        )
    if kind == "missing":
        return SpecError(key, "is required but missing.", _FIX["missing"])
    msg, _, fix = _MSG.get(kind, err["msg"]).removeprefix("Value error, ").partition(FIX)
    msg = msg[0].lower() + msg[1:] if msg else msg
    fix = fix or _FIX.get(kind)
    if kind == "string_type" and isinstance(value, (bool, int, float)):
        what = "true/false" if isinstance(value, bool) else "a number"
        fix = f"quote it as written ({loc[-1]}: '...'; in --set: {key}=\"'...'\"): YAML reads it as {what}."
    got = "null" if value is None else short(value)  # YAML's word for None
    return SpecError(key, f"{msg}, but got {got}." if "but got" not in msg else msg + ".", fix)


def _param_kind(name: str) -> str | None:
    from trainables import params

    row = params.lookup(name)
    return row.kind if row is not None else None


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
    for path_key in PATH_KEYS:
        *parents, leaf = path_key.split(".")
        node = spec
        for part in parents:
            node = getattr(node, part)
        value = getattr(node, leaf)
        if value is not None:
            setattr(node, leaf, _against(path_key, value, base))
