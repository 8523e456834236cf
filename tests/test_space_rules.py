"""Search-space rules a user writing a spec meets: a step that divides the range, choices distinct
by value, boolean words, one form per parameter, and the one-line errors' fixes and did-you-means
(the command line's own included)."""

from __future__ import annotations

import re

import pytest

from search.errors import SpecError, did_you_mean
from search.space_parse import parse_space
from search.spec import build_spec, load_spec
from tests.test_spec import ROOT, spec_dict


@pytest.mark.parametrize(
    ("body", "key", "words"),
    [
        ({"low": 1, "high": 4, "step": 2}, "space.p.step", "set high: 3"),  # 4 is never sampled
        ({"low": 0.0, "high": 1.0, "step": 2.0}, "space.p.step", "use a smaller step"),
        ({"low": 0.0, "high": 1.0, "step": 0}, "space.p.step", "use a positive step"),
        ({"low": 1e-4, "high": 1e-2, "log": "maybe"}, "space.p.log", "write true or false"),
        ({"choices": [1, 2, 1.0]}, "space.p.choices", "1.0 appears twice"),
        ({"type": "int", "low": 1.5, "high": 4}, "space.p.low", "or type: float"),
        ({"low": "abc", "high": 4}, "space.p.low", "write a number"),
        ({"choices": [["sgd"]]}, "space.p.choices[0]", "list plain values"),
        ({"value": [1]}, "space.p.value", "write one plain value"),
        ({"low": 0.1, "high": 0.2, "when": {"p": 0.1}}, "space.p.when.p", "drop p from its own when"),
        ({"low": 0.1, "high": 0.2, "when": {"q": []}}, "space.p.when.q", "drop q from when"),
        ({"low": 0.1, "high": 0.2, "when": {"q": [[1]]}}, "space.p.when.q", "list plain values"),
        # one form per parameter: value won over low/high (0.5, outside the range) and over choices
        ({"low": 0.001, "high": 0.01, "value": 0.5}, "space.p", "but got value and low, high."),
        ({"choices": ["sgd", "adamw"], "value": "rmsprop"}, "space.p", "but got value and choices."),
        ({"choices": [1, 2], "low": 1, "high": 2}, "space.p", "keep one form: remove choices or"),
        ({"value": 1, "step": 1}, "space.p", "exactly one form"),
        ("x", "space", "write e.g. space:"),  # the space itself is not a mapping
    ],
)
def test_space_entries_refused_with_a_fix(body, key, words):
    with pytest.raises(SpecError) as err:
        parse_space({"p": body} if key != "space" else body)
    assert err.value.key == key and words in str(err.value) and err.value.fix


@pytest.mark.parametrize(
    ("body", "check"),
    [
        ({"low": 0.8, "high": 0.95, "step": 0.05}, lambda d: d.high == 0.95),  # float steps: tolerant
        ({"low": 1e-4, "high": 1e-2, "log": "yes"}, lambda d: d.log is True),
        ({"low": 1e-4, "high": 1e-2, "log": "off"}, lambda d: d.log is False),
        ({"choices": [True, 1]}, lambda d: d.choices == (True, 1)),  # a bool and a number differ
    ],
)
def test_space_entries_accepted(body, check):
    assert check(parse_space({"p": body}).by_name["p"])


@pytest.mark.parametrize(
    ("entry", "kind", "value"),
    [
        ("no", "fixed", False),
        ({"choices": ["yes", "no"]}, "categorical", (True, False)),
        ({"value": "on"}, "fixed", True),
    ],
)
def test_a_boolean_parameter_takes_yes_and_no(entry, kind, value):
    spec = build_spec(spec_dict(**{"space.nesterov": entry}), ROOT)
    dim = spec.search_space.by_name["nesterov"]
    assert dim.kind == kind and (dim.value if kind == "fixed" else dim.choices) == value


def test_an_int_range_with_a_fractional_step_names_the_step():
    with pytest.raises(SpecError) as err:
        build_spec(spec_dict(**{"space.step_epochs": {"low": 1, "high": 4, "step": 1.5}}), ROOT)
    assert "fractional step" in err.value.message and "whole-number step" in err.value.fix
    for body, fix in [  # whole numbers written as floats, or type: float: not "a fractional step"
        ({"low": 1.0, "high": 4.0}, "write low: 1, high: 4 without type: float."),
        ({"type": "float", "low": 1, "high": 4}, "write low: 1, high: 4 without type: float."),
        ({"low": 1, "high": 5, "step": 2.0}, "write low: 1, high: 5, step: 2 without type: float."),
    ]:
        with pytest.raises(SpecError) as err:
            build_spec(spec_dict(**{"space.step_epochs": body}), ROOT)
        assert "a float range" in err.value.message and err.value.fix == fix


def test_did_you_mean_ignores_case():
    assert did_you_mean("mIoU", ["miou", "pixel_acc"]) == " Did you mean 'miou'?"
    assert did_you_mean("MAP50", ["map", "map50"]) == " Did you mean 'map50'?"


def test_a_trainable_set_named_like_a_preset_is_refused():
    """``trainable_sets: {heads: [...]}`` replaced the preset ``heads`` without a word."""
    with pytest.raises(SpecError) as err:
        build_spec(spec_dict(**{"model.trainable_sets": {"heads": ["head.*"]}}), ROOT)
    assert err.value.key == "model.trainable_sets.heads" and "my_heads" in err.value.fix
    build_spec(spec_dict(**{"model.trainable_sets": {"my_heads": ["head.*"]}}), ROOT)


def test_validate_says_which_searched_parameters_can_never_be_active():
    space = parse_space(
        {
            "schedule": "cosine",
            "step_epochs": {"low": 1, "high": 3, "when": {"schedule": "step"}},
            "lr": {"low": 0.001, "high": 0.1},
        }
    )
    assert space.never_active() == ["step_epochs"]
    assert (
        parse_space(
            {"schedule": "step", "step_epochs": {"low": 1, "high": 3, "when": {"schedule": "step"}}}
        ).never_active()
        == []
    )


def test_a_field_of_a_fixed_parameter_is_refused_as_such():
    """``--set space.warmup_epochs.low=0.1`` on a fixed ``warmup_epochs`` said "unknown trial
    parameter 'warmup_epochs.low'": the parameter exists, it has no range to edit."""
    from search.spec import load_spec

    with pytest.raises(SpecError) as err:
        load_spec(ROOT / "spaces/det.yaml", ["space.warmup_epochs.low=0.1"])
    assert (
        "is a fixed value (0.3), which has no low" in str(err.value)
        and "space.warmup_epochs={" in err.value.fix
    )
    dims = load_spec(ROOT / "spaces/det.yaml", ["space.warmup_epochs.value=0.2"]).search_space.by_name
    assert dims["warmup_epochs"].value == 0.2  # its value and condition can be set
    dims = load_spec(
        ROOT / "spaces/det.yaml", ["space.warmup_epochs.when={optimizer: sgd}"]
    ).search_space.by_name
    assert (dims["warmup_epochs"].value, dims["warmup_epochs"].when) == (0.3, {"optimizer": ("sgd",)})


@pytest.mark.parametrize(
    ("sets", "name", "expected"),
    [  # README: --set space.lr=X fixes a range (keeping its when); space.lr.low=X edits one field
        (["space.lr=0.01"], "lr", {"type": "fixed", "value": 0.01}),
        (["space.lr.value=0.02"], "lr", {"type": "fixed", "value": 0.02}),  # fixes it, no mixed form
        (["space.lr.low=0.001"], "lr", {"type": "float", "low": 0.001, "high": 0.03, "log": True}),
        (["space.momentum=0.9"], "momentum", {"type": "fixed", "value": 0.9, "when": {"optimizer": ["sgd"]}}),
        (
            ["space.momentum.value=0.9"],
            "momentum",
            {"type": "fixed", "value": 0.9, "when": {"optimizer": ["sgd"]}},
        ),
        (
            ["space.momentum=0.9", "space.momentum.low=0.1"],
            "momentum",
            "is a fixed value (0.9), which has no low",
        ),
        (["space.lr={low: 0.001, high: 0.01, value: 0.5}"], "lr", "but got value and low, high."),
    ],
)
def test_set_fixes_edits_or_refuses_a_parameter(sets, name, expected):
    if isinstance(expected, str):
        with pytest.raises(SpecError, match=re.escape(expected)) as err:
            load_spec(ROOT / "spaces/det.yaml", sets)
        assert err.value.fix
        return
    assert load_spec(ROOT / "spaces/det.yaml", sets).search_space.by_name[name].describe() == expected


@pytest.mark.parametrize(("value", "refused"), [("99", True), ("{low: 1, high: 9}", True), ("5", False)])
def test_trainable_k_at_most_the_backbones_stages(value, refused):
    """lraspp's MobileNetV3 has 5 stages: trainable_k 99 trained all 5 and validate said ok."""
    from search.spec import deep_check, load_spec

    spec = load_spec(ROOT / "spaces/seg.yaml", [f"space.trainable_k={value}"])
    if not refused:
        deep_check(spec)
        return
    with pytest.raises(SpecError) as err:
        deep_check(spec)
    assert (
        err.value.key == "space.trainable_k"
        and "has 5 stages" in str(err.value)
        and "at most 5" in err.value.fix
    )


def test_when_compares_values_as_the_choices_do():
    """1 and 1.0 are one value in a when, as in choices; True is not 1."""
    space = parse_space(
        {"momentum": {"choices": [0.5, 1.0]}, "nesterov": {"choices": [True, False], "when": {"momentum": 1}}}
    )
    nesterov = space.by_name["nesterov"]
    assert space.is_active(nesterov, {"momentum": 1.0}) and not space.is_active(nesterov, {"momentum": True})
    with pytest.raises(SpecError, match="flag can never take"):
        parse_space({"flag": {"choices": [True, False]}, "p": {"choices": [1, 2], "when": {"flag": 1}}})


def test_grid_points_and_defaults_sit_on_the_step_without_float_drift():
    space = parse_space(
        {"lr": {"low": 0.1, "high": 0.3, "step": 0.1}, "momentum": {"low": 0.8, "high": 0.95, "step": 0.05}}
    )
    assert space.grid() == {"lr": [0.1, 0.2, 0.3], "momentum": [0.8, 0.85, 0.9, 0.95]}
    assert space.defaults() == {"lr": 0.2, "momentum": 0.85}
    assert space.project({"momentum": 0.9, "lr": 1.0}) == {"momentum": 0.9, "lr": 0.3}


def test_grid_search_refuses_a_parameter_that_acts_only_in_one_branch():
    sets = ["search.algorithm=grid", "search.reference_trial=false"]
    branch = "momentum: {low: 0.8, high: 0.9, step: 0.05, when: {optimizer: sgd}}"
    with pytest.raises(SpecError) as err:
        load_spec(
            ROOT / "spaces/det.yaml", [*sets, f"space={{optimizer: {{choices: [sgd, adamw]}}, {branch}}}"]
        )
    assert (
        err.value.key == "space.momentum.when" and "when optimizer is sgd would repeat" in err.value.message
    )
    spec = load_spec(ROOT / "spaces/det.yaml", [*sets, f"space={{optimizer: sgd, {branch}}}"])  # always acts
    assert spec.search_space.grid() == {"momentum": [0.8, 0.85, 0.9]}
    every = (
        "space={optimizer: {choices: [sgd, adamw]}, "
        "lr: {choices: [0.1, 0.2], when: {optimizer: [sgd, adamw]}}}"
    )
    assert load_spec(ROOT / "spaces/det.yaml", [*sets, every]).search_space.grid()["lr"] == [0.1, 0.2]


def test_branches_keep_a_fixed_parent_and_force_only_values_it_can_take():
    """The dry run's branches: a branch under a fixed parent's other value is never built (the
    study runs the constant); a when listing a value the parent cannot take forces one it can."""
    space = parse_space(
        {"optimizer": "adamw", "nesterov": {"choices": [True, False], "when": {"optimizer": "sgd"}}}
    )
    assert space.branch_configs() == [{"optimizer": "adamw"}]
    space = parse_space(
        {
            "optimizer": {"choices": ["sgd", "adamw"]},
            "nesterov": {"choices": [True, False], "when": {"optimizer": ["lion", "sgd"]}},
        }
    )
    configs = space.branch_configs()
    assert {c["optimizer"] for c in configs} == {"sgd", "adamw"}
    assert {c.get("nesterov") for c in configs} >= {True, False}


@pytest.mark.parametrize(
    ("argv", "line"),
    [  # argparse printed its usage and the error: 2 to 4 lines
        (
            ["validate", "--quik", "s.yaml"],
            "error: validate: unrecognized arguments: --quik. Did you mean '--quick'? "
            "Fix: see python -m search validate --help.",
        ),
        (
            ["launch", "s.yaml", "--keep-top", "abc"],
            "error: launch: argument --keep-top: invalid int value: 'abc'. "
            "Fix: see python -m search launch --help.",
        ),
        (["frob"], "error: unknown command 'frob'. Fix: use one of: validate, trial, launch, status,"),
        (["bst"], "error: unknown command 'bst'. Did you mean 'best'? Fix: use one of: validate,"),
        ([], "error: the following arguments are required: COMMAND. Fix: see python -m search --help."),
        (["status", "x", "--output-dir"], "error: status: argument --output-dir: expected one argument."),
    ],
)
def test_command_line_errors_are_one_line(capsys, argv, line):
    from search import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(line), err


def test_help_is_argparses_own(capsys):
    from search import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["launch", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and out.startswith("usage: search launch [-h]") and "--keep-top K" in out


def test_a_misspelt_choice_is_named_before_the_when_that_depends_on_it():
    """``optimizer: {choices: [sgd, adam]}`` beside ``beta2: {when: {optimizer: adamw}}`` said
    "optimizer can never take ['adamw']", steering the user to edit the when; the typo itself is
    what to name."""
    beta2 = "space.beta2={low: 0.9, high: 0.999, when: {optimizer: adamw}}"
    with pytest.raises(SpecError) as err:
        load_spec(ROOT / "spaces/det.yaml", ["space.optimizer={choices: [sgd, adam]}", beta2])
    assert err.value.key == "space.optimizer" and "Did you mean 'adamw'" in str(err.value), str(err.value)


def test_a_when_on_one_point_of_a_continuous_range_is_refused():
    """``when: {lr: 0.001}`` with lr a range: never (probability 0) active, accepted silently."""
    lr = {"low": 1e-4, "high": 1e-2}
    with pytest.raises(SpecError) as err:
        parse_space({"lr": lr, "p": {"low": 0.1, "high": 0.2, "when": {"lr": 0.001}}})
    assert err.value.key == "space.p.when.lr" and "continuous range" in str(err.value) and err.value.fix
    stepped = {"low": 0.1, "high": 0.3, "step": 0.1}  # a stepped range takes its points
    parse_space({"w": stepped, "p": {"low": 0.1, "high": 0.2, "when": {"w": 0.2}}})


def test_an_error_line_has_one_fix_after_a_full_sentence():
    """A dataset's message ended without a period ("unknown category id 7 Fix: ...") or carried a
    fix of its own before the spec's ("...; fix the JSON or the image Fix: fix the dataset ...")."""
    from trainables.coco import DatasetError
    from trainables.data import check_image_files

    assert SpecError("data.train", "unknown category id 7", "fix it.").line() == (
        "data.train: unknown category id 7. Fix: fix it."
    )
    assert SpecError("k", "is wrong (see x).", "fix it.").line() == "k: is wrong (see x). Fix: fix it."

    class Rec:
        path, width, height, id = ROOT / "spaces/data/bccd/images/BloodImage_00000.jpg", 1, 2, 1

    with pytest.raises(DatasetError) as err:
        check_image_files([Rec()])
    assert "fix" not in str(err.value).lower() and err.value.fix.startswith("fix the JSON's width")


def test_error_object_names_source():
    """A value given with --set is named by its key (an audit: the file alone was named, so the user
    looked there for a value the command line had set); one from the file names the file."""
    with pytest.raises(SpecError) as info:
        load_spec(ROOT / "spaces" / "det.yaml", ["train.epochs=-3"])
    assert str(info.value).startswith(f"{ROOT / 'spaces' / 'det.yaml'} (--set train.epochs): train.epochs: ")
    with pytest.raises(SpecError) as info:
        load_spec(ROOT / "spaces" / "det.yaml", ["train.epochs=2", "space.lr.low=-1"])
    assert "(--set space.lr.low): space.lr.low: " in str(info.value)
    with pytest.raises(SpecError) as info:
        load_spec(ROOT / "spaces" / "det.yaml", ["train.epochs=2", "search.num_trials=0"])
    assert "(--set search.num_trials): search.num_trials: " in str(info.value)


def test_validate_json_lists_the_never_active_parameters(tmp_path):
    """validate --json listed a searched parameter whose when cannot hold among the others; only
    its text said so."""
    import json
    import subprocess
    import sys

    step = "space.step_epochs={low: 1, high: 3, when: {schedule: step}}"
    args = ["validate", str(ROOT / "spaces/det.yaml"), "--quick", "--json", "--set", "space.schedule=cosine"]
    proc = subprocess.run(
        [sys.executable, "-m", "search", *args, "--set", step], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["never_active"] == ["step_epochs"] and "step_epochs" in out["space"]
