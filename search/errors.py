"""User-facing errors: one line naming the key path, the bad value, the rule and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

FILE_KEY = "<file>"  # the key of an error about the spec file as a whole (not printed)


class BadInput(Exception):
    """Input the user must fix (not a spec key): the CLI prints it as one line and exits 2."""


class SpecError(ValueError):
    """A spec (or ``--set`` override) that breaks a rule. The CLI prints ``str(err)`` and exits 2."""

    def __init__(self, key: str, message: str, fix: str | None = None, source: str | None = None):
        self.key = key
        self.message = message
        self.fix = fix
        self.source = source
        super().__init__(self.line())

    def line(self) -> str:
        where = f"{self.source}: " if self.source else ""
        key = (
            "" if self.key == FILE_KEY else f"{self.key or 'spec'}: "
        )  # a whole-file error: the file names it
        text = f"{where}{key}{self.message}"
        if self.fix:  # the message a sentence of its own (a dataset's "unknown category id 7 Fix:")
            text += ("" if text.rstrip().endswith((".", "?", "!")) else ".") + f" Fix: {self.fix}"
        return " ".join(text.split())  # one line, whatever the parts held

    def with_source(self, source: str) -> SpecError:
        return SpecError(self.key, self.message, self.fix, source)

    def __str__(self) -> str:
        return self.line()


def did_you_mean(value: str, choices: Iterable[str], is_key: bool = False) -> str:
    """'; did you mean X?' for the closest choice, or '' when none is close. An unknown *key*
    ``key:value`` whose key is a choice is YAML's plain scalar for a missing space after the colon,
    and says so (for a value, ``sgd: x`` would not be the fix)."""
    choices = list(choices)
    key, colon, rest = str(value).partition(":")
    if is_key and colon and rest and key.strip() in choices:
        key = key.strip()
        return f" Did you mean {key!r}? YAML needs a space after ':' ({key}: {rest.strip()})."
    same_case = [c for c in choices if str(c).lower() == str(value).lower()]  # mIoU -> miou
    close = same_case or difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def unknown_name(
    key: str, value: Any, choices: Iterable[str], what: str = "name", is_key: bool = False
) -> SpecError:
    """An unknown name (``is_key``: a mapping key), listing the valid choices and the closest one."""
    choices = sorted(set(choices))
    shown = ", ".join(choices) if len(choices) <= 40 else ", ".join(choices[:40]) + ", ..."
    return SpecError(
        key,
        f"unknown {what} {value!r}.{did_you_mean(str(value), choices, is_key)}",
        f"use one of: {shown}.",
    )


def short(value: Any, limit: int = 80) -> str:
    """repr() cut to ``limit`` characters, for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
