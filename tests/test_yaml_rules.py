"""YAML as specs read it: YAML 1.2's booleans and integers (``amp: off`` is the string ``off``,
``010`` is ten), and the did-you-mean rule for a missing space after ':'."""

from __future__ import annotations

from pathlib import Path

import pytest

from search import guards
from search.spec import load_spec

DET = Path(__file__).resolve().parents[1] / "spaces" / "det.yaml"


@pytest.mark.parametrize(
    "value, is_key, says",
    [
        ("high:1e-2", True, " Did you mean 'high'? YAML needs a space after ':' (high: 1e-2)."),
        # an unknown value such as an optimizer choice: 'sgd: x' would be a key, not the fix
        ("sgd:x", False, " Did you mean 'sgd'?"),
        ("sgdd", False, " Did you mean 'sgd'?"),
        ("rmsprop", False, ""),
    ],
)
def test_the_colon_rule_is_said_only_for_keys(value, is_key, says):
    from search.errors import did_you_mean

    assert did_you_mean(value, ["sgd", "adamw", "high", "low"], is_key) == says


@pytest.mark.parametrize(
    "text, value",
    [("true", True), ("False", False), ("TRUE", True)] + [(w, w) for w in ("off", "yes", "on", "no")],
)
def test_booleans_are_yaml_1_2s(text, value):
    """Only true/false are booleans (YAML 1.1 also read yes/no/on/off, so ``amp: off`` was False)."""
    assert guards.load_yaml(f"a: {text}") == {"a": value}


@pytest.mark.parametrize(
    "text, value",
    [("010", 10), ("-7", -7), ("+3", 3), ("0o17", 15), ("0x1F", 31), ("1:30", "1:30"), ("0b11", "0b11")]
    + [("1_000", "1_000"), ("1e-4", 1e-4), ("1.5", 1.5)],
)
def test_integers_are_yaml_1_2s(text, value):
    """010 is ten (YAML 1.1 read octal 8: ``seed: 010`` became 8), 1:30 is no base-60 number."""
    loaded = guards.load_yaml(f"a: {text}")["a"]
    assert loaded == value and type(loaded) is type(value)


def test_amp_off_and_a_yes_for_a_bool_key_load():
    spec = load_spec(DET, ["train.amp=off", "train.eval_base=no"])
    assert spec.train.amp == "off" and spec.train.eval_base is False  # pydantic reads 'no' as False
