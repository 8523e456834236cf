"""The reference recipe (issue 13): every family has one with its source, its lr scaled to the batch
by each rule, one recipe trial per rule, its projection into a spec's space, and TPE's start-up
sized to the budget and the recipe trials."""

from __future__ import annotations

from pathlib import Path

import pytest

from search.launch_text import recipe_unused_text
from search.space_parse import parse_space
from search.spec import load_spec
from trainables import families, recipes

ROOT = Path(__file__).resolve().parents[1]


def test_every_family_has_a_reference_recipe_with_a_source():
    for name in families.FAMILIES:
        r = recipes.recipe_for(name)
        assert r is not None, name
        assert r.params["optimizer"] in ("sgd", "adamw") and r.params["lr"] > 0 and "references" in r.source


@pytest.mark.parametrize(
    ("family", "batch", "epochs", "lr", "extra"),
    [
        ("fasterrcnn", 2, 26, 0.02 * 2 / 16, {"schedule": "step", "step_epochs": 16}),
        ("fasterrcnn", 16, 10, 0.02, {"step_epochs": 6}),
        ("ssdlite", 4, 8, 0.15 * 4 / 192, {"schedule": "cosine", "weight_decay": 4e-5}),
        ("lraspp", 4, 3, 0.02 * 4 / 32, {"weight_decay": 1e-6, "loss.seg": "ce"}),
        ("retinanet", 8, 4, 0.01 * 8 / 16, {"momentum": 0.9}),
    ],
)
def test_recipe_params_scale_lr_with_batch_and_place_the_step(family, batch, epochs, lr, extra):
    got = recipes.recipe_params(recipes.recipe_for(family), batch, epochs)
    assert got["lr"] == pytest.approx(lr)
    assert got["trainable"] == "all" and got["activation"] == "keep" and got["norm"] == "keep"
    for k, v in extra.items():
        assert got[k] == v, k


@pytest.mark.parametrize(
    ("family", "batch", "scaling", "lr"),
    [
        ("ssdlite", 4, "linear", 0.15 * 4 / 192),
        ("ssdlite", 4, "sqrt", 0.15 * (4 / 192) ** 0.5),
        ("lraspp", 4, "sqrt", 0.02 * (4 / 32) ** 0.5),
        ("fasterrcnn", 16, "sqrt", 0.02),  # at the recipe's own batch every rule gives its lr
        ("fasterrcnn", 64, "sqrt", 0.04),  # above it, sqrt grows slower than linear
    ],
)
def test_recipe_lr_follows_the_scaling_rule(family, batch, scaling, lr):
    recipe = recipes.recipe_for(family)
    got = recipes.recipe_params(recipe, batch, 8, scaling)
    assert got["lr"] == pytest.approx(lr)
    assert {k: v for k, v in got.items() if k != "lr"} == {
        k: v for k, v in recipes.recipe_params(recipe, batch, 8).items() if k != "lr"
    }


LINEAR, SQRT = 0.15 * 4 / 192, 0.15 * (4 / 192) ** 0.5  # ssdlite's recipe at batch 4


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        ([], [("linear", LINEAR)]),
        (["search.reference_scaling=[linear,sqrt]"], [("linear", LINEAR), ("sqrt", SQRT)]),
        (["search.reference_scaling=[sqrt,linear]"], [("sqrt", SQRT), ("linear", LINEAR)]),
        # both clipped to the range's top: the second would repeat the first, so it is left out
        (["search.reference_scaling=[linear,sqrt]", "space.lr.high=0.002"], [("linear", 0.002)]),
        (["search.reference_scaling=[linear,sqrt]", "space.lr=0.01"], [("linear", None)]),  # lr unsearched
        (["search.reference_scaling=[linear,sqrt]", "search.reference_trial=false"], []),
    ],
)
def test_recipe_trials_one_per_scaling_rule(sets, expected):
    spec = load_spec(ROOT / "spaces/det.yaml", ["train.batch_size=4", *sets])
    got = spec.recipe_trials()
    assert [(name, params.get("lr")) for name, params in got] == [
        (name, pytest.approx(lr) if lr else None) for name, lr in expected
    ]
    for _, params in got:  # the rules differ in the lr only
        assert {k: v for k, v in params.items() if k != "lr"} == {
            k: v for k, v in got[0][1].items() if k != "lr"
        }
    assert spec.reference_params() == (got[0][1] if got else None)


def test_a_scaled_lr_matches_the_choice_that_writes_it_in_decimal():
    """SSDlite's 0.15 x 4/192 came out as 0.0031249999999999997: a choice of 0.003125 did not match
    it, and with nothing else of the recipe searched no reference trial ran, without a word."""
    from search.spec.notes import spec_notes

    lr = recipes.recipe_params(recipes.recipe_for("ssdlite"), 4, 8)["lr"]
    assert lr == 0.003125
    sets = ["train.batch_size=4", "space={lr: {choices: [0.003125, 0.0125]}}"]
    spec = load_spec(ROOT / "spaces/det.yaml", sets)
    assert spec.recipe_trials() == [("linear", {"lr": 0.003125})]
    assert not any("no reference trial runs" in note for note in spec_notes(spec))
    spec = load_spec(
        ROOT / "spaces/det.yaml", ["train.batch_size=4", "space={lr: {choices: [0.003, 0.0125]}}"]
    )
    assert spec.recipe_trials() == [] and spec.reference_params() is None
    said = [note for note in spec_notes(spec) if note.startswith("search.reference")]
    assert said == [
        "search.reference_trial: no reference trial runs: the recipe sets none of the searched "
        "parameters (its lr 0.003125: not among your choices)."
    ]
    both = "search.reference_scaling=[linear,sqrt]"
    twice = load_spec(ROOT / "spaces/det.yaml", [*sets[:1], "space={lr: {choices: [0.003, 0.0125]}}", both])
    assert [n for n in spec_notes(twice) if n.startswith("search.reference")] == said  # said once
    nothing = load_spec(ROOT / "spaces/det.yaml", ["space={lr: 0.003}"])  # nothing searched, nothing missed
    assert not any(n.startswith("search.reference_trial") for n in spec_notes(nothing))


SPACE = {
    "optimizer": {"choices": ["sgd", "adamw"]},
    "lr": {"low": 1e-4, "high": 1e-3, "log": True},
    "momentum": {"low": 0.8, "high": 0.85, "when": {"optimizer": "sgd"}},
    "beta1": {"low": 0.8, "high": 0.95, "when": {"optimizer": "adamw"}},
    "trainable": {"choices": ["heads", "backbone_last_k"]},
    "activation": {"choices": ["keep", "silu"]},
    "step_epochs": {"low": 1, "high": 4, "step": 1},
    "schedule": "cosine",
}


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"lr": 0.02}, {"lr": 1e-3}),  # clipped into the range
        ({"lr": 1e-5}, {"lr": 1e-4}),
        ({"lr": 5e-4}, {"lr": 5e-4}),
        ({"optimizer": "sgd", "momentum": 0.9}, {"optimizer": "sgd", "momentum": 0.85}),
        ({"optimizer": "adamw", "momentum": 0.9}, {"optimizer": "adamw"}),  # momentum inactive
        ({"trainable": "all"}, {}),  # not among the choices: the sampler decides
        ({"activation": "keep"}, {"activation": "keep"}),
        ({"schedule": "step"}, {}),  # unsearched (fixed by the spec): untouched
        ({"step_epochs": 16}, {"step_epochs": 4}),
        ({"step_epochs": 2.4}, {"step_epochs": 2}),
        ({"weight_decay": 1e-4}, {}),  # not in the space
    ],
)
def test_projection_into_the_space(values, expected):
    got = parse_space(SPACE).project(values)
    assert got == pytest.approx(expected) and set(got) == set(expected)
    assert all(type(got[k]) is type(v) for k, v in expected.items())


@pytest.mark.parametrize(("value", "kept"), [(1, True), (True, False), ("1", False), (2.0, False)])
def test_a_categorical_value_is_either_projected_or_left_to_the_sampler(value, kept):
    """``project`` and ``unprojected`` (what the launch header says the sampler picks) apply one
    rule: a choice equal in value and type (``True`` is not the choice ``1``)."""
    space = parse_space({"k": {"choices": [1, 3]}, "lr": {"low": 1e-4, "high": 1e-3}})
    assert (space.project({"k": value}) == {"k": value}) is kept
    assert space.unprojected({"k": value, "lr": 0.5}) == ({} if kept else {"k": value})


@pytest.mark.parametrize(
    ("num_trials", "n_startup", "n_recipes", "expected"),
    [
        (8, None, 0, 2),  # a third of the trials, at least 2
        (8, None, 1, 2),  # the reference trial is one of them
        (8, None, 2, 3),  # a second recipe trial is not random: one more random start-up trial
        (60, None, 2, 11),  # at most 10, plus the second recipe trial
        (8, 4, 2, 4),  # given: as given
    ],
)
def test_tpe_start_up_sized_to_the_budget_and_the_recipe_trials(num_trials, n_startup, n_recipes, expected):
    from search.samplers import make_sampler

    sampler = make_sampler("tpe", 0, num_trials, n_startup, None, n_recipes)
    assert sampler._n_startup_trials == expected


@pytest.mark.parametrize(
    "sets, expected",
    [
        ([], {"loss.weight.loss_mask": 1.0}),  # the demo: weight searched in [0.5, 2]
        (["space.loss.weight.loss_mask.low=1.5"], {"loss.weight.loss_mask": 1.5}),  # clipped
        (["space.loss.weight.loss_mask=0.7"], {}),  # fixed by the user: left as fixed
        (
            ["space.loss.weight.loss_classifier={low: 0.5, high: 2}"],
            {"loss.weight.loss_mask": 1.0, "loss.weight.loss_classifier": 1.0},
        ),
    ],
)
def test_reference_trial_weighs_each_loss_term_as_the_architecture_does(sets, expected):
    """The recipe names no loss weight; the reference trial takes the architecture's own (1.0),
    not a sampled one, for every ``loss.weight.<term>`` the space searches."""
    ref = load_spec(ROOT / "spaces/inst.yaml", sets).reference_params()
    got = {k: v for k, v in ref.items() if k.startswith("loss.weight.")}
    assert got == pytest.approx(expected)


@pytest.mark.parametrize(
    "sets, unused",
    [
        ([], {}),
        (["space.trainable={choices: [heads]}"], {"trainable": "all"}),
        (
            ["space.trainable={choices: [heads]}", "space.activation={choices: [silu]}"],
            {"trainable": "all", "activation": "keep"},
        ),
        (["space.trainable={choices: [heads]}", "search.reference_trial=false"], {}),
    ],
)
def test_the_recipe_values_the_sampler_picks_instead_are_said(sets, unused):
    """A recipe value that is not among the choices leaves the parameter to the sampler; the
    launch header and the dry run say so (the reference was labelled the recipe regardless)."""

    spec = load_spec(ROOT / "spaces/det.yaml", sets)
    assert spec.recipe_unused() == unused
    text = recipe_unused_text(unused)
    assert (text is None) == (not unused) and all(f"{k} (the recipe's " in text for k in unused or {})


WARMUP = {"warmup_epochs": {"spec": 0.3, "given": 0.1}}  # det.yaml fixes 0.3; SSDlite's recipe warms up 0.1
INST = {
    "optimizer": {"spec": "adamw", "given": "sgd"},  # a fixed AdamW stays
    "warmup_epochs": {"spec": 0.3, "given": 0.1},
    "grad_clip": {"spec": 5.0, "given": 0.0},
    "schedule": {"spec": "cosine", "given": "step"},
    "step_epochs": {"spec": 1, "given": 2, "default": True},  # not in inst.yaml's space: its default
}
SEG_WD = {"weight_decay": {"spec": 1e-4, "given": 1e-6, "default": True}}  # not in seg.yaml's space
LEFT_OUT = {  # a space without them: every trial, the reference too, has the defaults (said)
    "weight_decay": {"spec": 1e-4, "given": 4e-5, "default": True},
    "warmup_epochs": {"spec": 0.0, "given": 0.1, "default": True},
}


@pytest.mark.parametrize(
    ("spec", "sets", "unused", "overridden"),
    [
        # what the references do besides their hyperparameters: one lr, no clipping, hflip 0.5
        (
            "det",
            ["space.backbone_lr_mult={low: 0.1, high: 1}", "space.aug.hflip={low: 0, high: 0.5}"],
            {},
            WARMUP,
        ),
        ("seg", ["space.aug.scale={low: 0, high: 0.3}"], {"aug.scale": None}, SEG_WD),  # its random resize
        (
            "det",
            ["space={lr: {low: 0.001, high: 0.2, log: true}, optimizer: {choices: [sgd, adamw]}}"],
            {},
            LEFT_OUT,
        ),
        ("det", ["space.aug.scale={low: 0, high: 0.3}"], {}, WARMUP),  # the detection references: none
        ("det", ["space.momentum=0.8"], {}, {"momentum": {"spec": 0.8, "given": 0.9}, **WARMUP}),  # when sgd
        ("inst", [], {}, INST),
        (
            "seg",
            ["space.momentum={low: 0.8, high: 0.99, when: {optimizer: adamw}}"],
            {},
            SEG_WD,
        ),  # never active
        (
            "det",
            ["space.trainable_k={low: 1, high: 3}", "space.activation_scope=backbone"],
            {},
            WARMUP,
        ),  # no effect
        (  # it acts when the sampler picks backbone_last_k: the sampler picks it too
            "det",
            ["space.trainable={choices: [heads, backbone_last_k]}", "space.trainable_k={low: 1, high: 3}"],
            {"trainable": "all", "trainable_k": None},
            WARMUP,
        ),
        (  # beta1 acts under the AdamW the sampler must pick
            "det",
            [
                "space.optimizer={choices: [adamw]}",
                "space.momentum={value: 0.9}",
                "space.beta1={low: 0.8, high: 0.95}",
            ],
            {"optimizer": "sgd", "beta1": None},
            WARMUP,
        ),
    ],
)
def test_where_the_recipe_trials_differ_from_the_recipe_is_said(spec, sets, unused, overridden):
    """The reference trial ran with a sampled backbone_lr_mult and aug.hflip, and under a fixed
    AdamW, while the header showed only the recipe's values."""

    spec = load_spec(ROOT / f"spaces/{spec}.yaml", sets)
    assert spec.recipe_unused() == unused
    assert spec.recipe_overridden() == overridden
    ref, searched = spec.reference_params(), {d.name for d in spec.search_space.searched}
    for name, value in {"backbone_lr_mult": 1.0, "aug.hflip": 0.5}.items():
        assert ref.get(name) == (value if name in searched else None)
    text = recipe_unused_text(spec.recipe_unused(), spec.recipe_overridden()) or ""
    assert all(k in text for k in [*unused, *overridden])
