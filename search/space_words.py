"""Words a spec writes for booleans: true/false, or yes/no/on/off (what pydantic takes for the spec's
other boolean keys; YAML 1.2 reads those words as strings), for a search space's boolean keys
(``log``) and boolean parameters."""

from __future__ import annotations

from typing import Any

from search.errors import SpecError, short

_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def as_bool(value: Any, key: str) -> bool:
    """A boolean key's value: true/false, or yes/no/on/off as words (what pydantic takes for the
    spec's other boolean keys; YAML 1.2 reads those words as strings)."""
    if isinstance(v := _bool_word(value), bool):
        return v
    raise SpecError(key, f"must be true or false, but got {short(value)}.", "write true or false.")


def _bool_word(v: Any) -> Any:
    """A yes/no/on/off/true/false word as a boolean; anything else unchanged."""
    return _BOOL_WORDS.get(v.strip().lower(), v) if isinstance(v, str) else v


def bool_words(body: Any) -> Any:
    """A boolean parameter's yes/no/on/off words (as a value, a fixed ``value`` or ``choices``) as
    booleans; anything else unchanged (the parameter checks report it)."""
    if isinstance(body, dict):
        body = dict(body)
        if "value" in body:
            body["value"] = _bool_word(body["value"])
        if isinstance(body.get("choices"), list):
            body["choices"] = [_bool_word(v) for v in body["choices"]]
        return body
    return _bool_word(body)
