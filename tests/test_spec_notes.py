"""Settings that are valid but do nothing: one note each, said by validate, the dry run and launch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from search.cli import main
from search.spec import load_spec
from search.spec.notes import spec_notes

ROOT = Path(__file__).resolve().parents[1]
DET, SEG = ROOT / "spaces/det.yaml", ROOT / "spaces/seg.yaml"
GRID = "space={lr: {choices: [0.01, 0.02]}, optimizer: {choices: [sgd, adamw]}}"


@pytest.mark.parametrize(
    ("spec", "sets", "said"),
    [
        (SEG, [], []),
        (SEG, ["search.n_startup_trials=2"], []),  # a start-up shorter than the study
        (SEG, ["search.reference_trial=false"], []),  # the default rule: nothing to say
        (
            SEG,
            ["search.reference_trial=false", "search.reference_scaling=[linear, sqrt]"],
            ["search.reference_scaling ['linear', 'sqrt'] has no effect: search.reference_trial is false."],
        ),
        (DET, ["search.reference_scaling=[linear, sqrt]"], []),  # two recipe trials: both run
        (
            DET,  # the lr fixed: the sqrt rule's recipe trial is the linear one's, so it was dropped silently
            ["space.lr.value=0.005", "search.reference_scaling=[linear, sqrt]"],
            [
                "search.reference_scaling ['sqrt']: no trial of its own, as its recipe trial would be "
                "that of ['linear'] (the lr fixed, or clipped to the same bound)."
            ],
        ),
        (
            DET,
            ["search.algorithm=grid", GRID, "search.num_trials=4", "search.reference_scaling=[sqrt]"],
            ["search.reference_scaling ['sqrt'] has no effect: grid search takes no recipe trial."],
        ),
        (
            SEG,
            ["search.num_trials=4", "search.n_startup_trials=4"],
            [
                "search.n_startup_trials 4 >= search.num_trials 4: every trial is a random start-up (or "
                "recipe) trial, so tpe never proposes one from a model (this is random search)."
            ],
        ),
        (SEG, ["search.algorithm=gp", "search.num_trials=4", "search.n_startup_trials=3"], []),
        (
            SEG,
            ["search.algorithm=qmc", "search.n_startup_trials=3"],
            ["search.n_startup_trials has no effect: qmc has no start-up trials."],
        ),
        (
            DET,
            ["search.algorithm=grid", GRID, "search.num_trials=9"],
            ["search.num_trials 9: the grid has 4 point(s), so the study runs 4 trials."],
        ),
        (DET, ["search.algorithm=grid", GRID, "search.num_trials=4"], []),
        (
            DET,  # fewer trials than the grid's points: which run was said nowhere (an audit)
            ["search.algorithm=grid", GRID, "search.num_trials=3"],
            [
                "search.num_trials 3: the grid has 4 points, so the study runs 3 of them, which the sampler "
                "picks."
            ],
        ),
        # settings whose controller the space never lets act (an audit: each validated without a word)
        (
            DET,
            ["space.optimizer=adamw", "space.nesterov=true"],
            ["space.nesterov has no effect: it acts under no optimizer the space allows (['adamw'])."],
        ),
        (
            DET,
            ["space.schedule=cosine", "space.step_epochs=2"],
            ["space.step_epochs has no effect: it acts under no schedule the space allows (['cosine'])."],
        ),
        (
            DET,
            ["space.trainable_k={low: 1, high: 3}"],
            [
                "space.trainable_k has no effect: it acts under no trainable the space allows "
                "(['all', 'heads'])."
            ],
        ),
        (
            DET,
            ["space.trainable={choices: [heads, backbone_last_k]}", "space.trainable_k={low: 1, high: 3}"],
            [],
        ),
        (
            DET,  # its when picks the optimizer under which it does nothing
            ["space.momentum={low: 0.8, high: 0.9, when: {optimizer: adamw}}"],
            ["space.momentum has no effect: it acts under no optimizer the space allows (['adamw'])."],
        ),
        (DET, ["space.optimizer=adamw"], []),  # momentum's when (sgd) cannot hold: inactive, not noted here
        # scheduler settings the scheduler does not read (given in the file or with --set)
        (
            DET,
            ["search.scheduler=none"],
            [
                "search.grace_period has no effect: scheduler none does not read it.",
                "search.reduction_factor has no effect: scheduler none does not read it.",
            ],
        ),
        (
            DET,
            ["search.scheduler=median"],
            ["search.reduction_factor has no effect: scheduler median does not read it."],
        ),
        (SEG, ["search.scheduler=none"], []),  # left at their defaults: nothing to say
        (SEG, ["search.scheduler=asha", "search.grace_period=2"], []),
        # lr schedules no trial lives to see (the warmup is capped at the whole run)
        (DET, ["space.warmup_epochs=2.9"], []),
        (
            DET,
            ["space.warmup_epochs=3"],
            [
                "space.warmup_epochs 3 >= train.epochs 3: every trial warms up for all of its training (its "
                "lr reaches the searched value only at the last step) and space.schedule never acts."
            ],
        ),
        (
            DET,
            ["space.warmup_epochs={low: 0, high: 5}"],
            [
                "space.warmup_epochs reaches train.epochs 3: the trials that draw 3 or more warm up for all "
                "of their training (their lr reaches the searched value only at the last step)."
            ],
        ),
        (DET, ["space.schedule=step", "space.step_epochs=2"], []),  # 0.3 + 2 < 3: one drop
        (
            DET,
            ["space.schedule={choices: [cosine, step]}", "space.step_epochs={low: 3, high: 4}"],
            [
                "space.step_epochs 3 after a warmup of 0.3 reaches train.epochs 3: the step schedule never "
                "drops the lr (a constant lr after warmup)."
            ],
        ),
    ],
)
def test_a_setting_without_effect_is_noted(spec, sets, said):
    assert spec_notes(load_spec(spec, sets)) == said


def test_validate_says_the_notes_in_text_and_json(capsys):
    sets = ["--set", "search.algorithm=random", "--set", "search.n_startup_trials=3"]
    assert main(["validate", str(SEG), "--quick", *sets]) == 0
    text = capsys.readouterr().out
    assert "  note: search.n_startup_trials has no effect: random has no start-up trials.\n" in text
    assert main(["validate", str(SEG), "--quick", "--json", *sets]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["notes"] == ["search.n_startup_trials has no effect: random has no start-up trials."]
    assert main(["validate", str(SEG), "--quick", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == []


def test_the_launch_header_says_the_notes(tmp_path, capsys):
    from search.launch_text import print_header

    spec = load_spec(DET, ["search.algorithm=grid", GRID, "search.num_trials=9"])
    print_header(spec, tmp_path, {"nodes": 1, "hosts": ["here"]})
    out = capsys.readouterr().out
    assert "grid + auto (curve), 4 trials x" in out
    assert "  note: search.num_trials 9: the grid has 4 point(s), so the study runs 4 trials.\n" in out


def test_weights_out_says_the_activation_a_state_dict_cannot_hold():
    from search.spec.notes import weights_note
    from trainables import params

    assert weights_note(params.resolve({})) is None
    note = weights_note(params.resolve({"activation": "silu"}))
    assert "space.activation: silu and space.activation_scope: heads" in note


def test_a_class_the_train_split_never_annotates_is_noted(tmp_path, capsys):
    """An audit: a class with no training annotation (or a category no annotation uses) passed
    validate without a word; the model never learns it while its val objects count in the metric."""
    data = json.loads((ROOT / "spaces/data/bccd/annotations/instances_train.json").read_text())
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 3]  # no Platelets
    train = tmp_path / "train.json"
    train.write_text(json.dumps(data))
    images = ROOT / "spaces/data/bccd/images"
    sets = ["--set", f"data.train.annotations={train}", "--set", f"data.train.images={images}"]
    assert main(["validate", str(DET), "--quick", "--json", *sets]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert notes == [
        "data.train annotates no object of class(es) ['Platelets']: no trial learns them, and their "
        "objects in the val split (if any) count against every trial."
    ]
    assert main(["validate", str(DET), "--quick", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == []


def test_val_images_that_are_train_images_are_noted(capsys):
    """An audit: data.val the training file itself (or a file holding train images) passed without
    a word; the objective then scores images the trials train on."""
    train = load_spec(DET).data.train
    sets = ["--set", f"data.val.annotations={train.annotations}", "--set", f"data.val.images={train.images}"]
    assert main(["validate", str(DET), "--quick", "--json", *sets]) == 0
    (note,) = json.loads(capsys.readouterr().out)["notes"]
    n = len(json.loads(Path(train.annotations).read_text())["images"])
    assert note.startswith(f"data.val shares {n} of its {n} images with data.train (e.g. "), note


def test_base_weights_that_leave_tensors_random_are_noted(capsys):
    """An audit: a base file that fits the model only in part (here the demo's Mask R-CNN file for
    an FPN of 64 channels, not its 256) passed validate, trial and launch without a word, its FPN
    random: epoch 0 was not the file's model. The class predictors, replaced anyway, are not counted."""
    inst = ROOT / "spaces/inst.yaml"
    assert main(["validate", str(inst), "--json", "--set", "model.fpn_channels=64"]) == 0
    (note,) = json.loads(capsys.readouterr().out)["notes"]
    assert note.startswith("model.weights leaves ") and "'backbone.fpn.inner_blocks.0.0.weight'" in note
    assert "predictor" not in note.split("random")[1], note
    assert main(["validate", str(inst), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == []
