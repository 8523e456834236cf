"""The search's rules at their edges (found by an audit of the space, searcher and schedulers): the
reference trial is found and spared whatever the sampler chose for it, the median rule keeps
sparing it, a searched warm-up places the rungs, a ``when`` value must be one the parent can take,
HyperBand's check counts the trials that will run, and only ``mode: max`` is accepted."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import TrialScheduler

from search.errors import SpecError
from search.schedulers import make_scheduler, rungs_for
from search.space_parse import parse_space
from search.spec import load_spec
from search.stopping import RecordingASHA, RecordingMedian, StratifiedHalving

ROOT = Path(__file__).resolve().parents[1]
DET = ROOT / "spaces/det.yaml"
STOP, GO = TrialScheduler.STOP, TrialScheduler.CONTINUE


class _Trial(SimpleNamespace):
    __hash__ = object.__hash__  # Ray's median rule keys its records by trial


def trial(tid: str, **config) -> _Trial:
    return _Trial(trial_id=tid, config=config, status="RUNNING")


# a recipe whose conditional value (backbone_lr_mult, when trainable is backbone_last_k) the trial
# lacks: the recipe's trainable was not among the choices, and the sampler picked heads
REFERENCE = {"lr": 0.01, "optimizer": "sgd", "backbone_lr_mult": 1.0}
REF_TRIAL = {"lr": 0.01, "optimizer": "sgd", "trainable": "heads"}


@pytest.mark.parametrize(
    "make",
    [
        lambda: StratifiedHalving("map50", "max", epochs=8, rungs=(1, 2), reference=REFERENCE),
        lambda: RecordingASHA(
            time_attr="epoch", max_t=8, grace_period=1, reduction_factor=2, reference=REFERENCE
        ),
    ],
    ids=["stratified", "asha"],
)
def test_the_reference_is_found_without_its_inactive_conditional_values(make):
    sched = make()
    if isinstance(sched, RecordingASHA):
        sched.set_search_properties("map50", "max")
    peers = [trial(f"p{i}", **{**REF_TRIAL, "lr": 0.001 * (i + 1)}) for i in range(2)]
    ref = trial("ref", **REF_TRIAL)
    for t in (ref, *peers):
        sched.on_trial_add(None, t)
    assert sched.reference_id == "ref"
    for t, v in zip(peers, (0.5, 0.6), strict=True):
        sched.on_trial_result(None, t, {"epoch": 1, "map50": v})
    assert sched.on_trial_result(None, ref, {"epoch": 1, "map50": 0.1}) == GO
    assert sched.stop_record("ref") is None
    other = StratifiedHalving("map50", "max", epochs=8, rungs=(1,), reference=REFERENCE)
    other.on_trial_add(None, trial("x", **{**REF_TRIAL, "lr": 0.02}))  # another lr: not the reference
    other.on_trial_add(None, trial("y", trainable="heads"))  # no recipe value at all: neither
    assert other.reference_id is None


def test_the_median_rule_spares_the_reference_at_every_result():
    """Ray's rule noted the spared reference as stopped: its next result failed an assertion."""
    sched = RecordingMedian(
        time_attr="epoch", grace_period=1.0, min_samples_required=3, reference={"lr": 0.5}
    )
    sched.set_search_properties("map50", "max")
    controller = SimpleNamespace(get_live_trials=lambda: [])
    ref, peers = trial("r", lr=0.5), [trial(x, lr=0.1) for x in "abc"]
    for t in (ref, *peers):
        sched.on_trial_add(controller, t)
    for epoch in (0, 1, 2, 3):
        for t in peers:
            sched.on_trial_result(controller, t, {"epoch": epoch, "map50": 0.5})
    decisions = [sched.on_trial_result(controller, ref, {"epoch": e, "map50": 0.1}) for e in (0, 1, 2, 3)]
    assert decisions == [GO] * 4 and sched.stop_record("r") is None
    assert len(sched._results[ref]) == 4  # its values still count in the others' medians
    low = trial("d", lr=0.2)
    sched.on_trial_add(controller, low)
    assert [sched.on_trial_result(controller, low, {"epoch": e, "map50": 0.0}) for e in (0, 1)] == [GO, STOP]


@pytest.mark.parametrize("scheduler", ["auto", "curve", "stratified"])
def test_a_searched_warmup_places_the_rungs_after_its_longest_choice(scheduler):
    spec = load_spec(
        DET,
        ["space.warmup_epochs={choices: [0, 0.5, 2]}", "train.epochs=8", f"search.scheduler={scheduler}"],
    )
    s = spec.search
    assert make_scheduler(spec).rungs == rungs_for(8, s.grace_period, s.reduction_factor, 2.0)


@pytest.mark.parametrize(
    "name,parent,value",
    [
        ("step_epochs", {"low": 1, "high": 3}, 2.5),  # an int range never takes 2.5
        ("grad_clip", {"low": 1, "high": 10, "step": 3}, 2),  # 1, 4, 7, 10
        ("aug.hflip", {"low": 0.1, "high": 0.4, "step": 0.1}, 0.25),
    ],
)
def test_a_when_value_off_the_parents_range_or_step_is_refused(name, parent, value):
    kinds = {"step_epochs": "int", "grad_clip": "float", "aug.hflip": "float", "step_gamma": "float"}
    raw = {name: parent, "step_gamma": {"low": 0.1, "high": 0.5, "when": {name: value}}}
    with pytest.raises(SpecError) as err:
        parse_space(raw, kind_of=kinds.get)
    assert err.value.key == f"space.step_gamma.when.{name}" and "would never be active" in err.value.message
    on_grid = {**raw, "step_gamma": {**raw["step_gamma"], "when": {name: parent["high"]}}}
    assert parse_space(on_grid, kind_of=kinds.get).by_name["step_gamma"].when == {name: (parent["high"],)}


GRID = [
    "search.algorithm=grid",
    "search.reference_trial=false",
    "space={optimizer: {choices: [sgd, adamw]}, trainable: {choices: [all, heads]}, lr: 0.01}",
    "search.num_trials=8",
    "search.scheduler=hyperband",
]


def test_hyperband_counts_the_trials_a_grid_will_run():
    assert load_spec(DET, [*GRID, "search.max_concurrent=4"]).search.max_concurrent == 4
    with pytest.raises(SpecError) as err:
        load_spec(DET, [*GRID, "search.max_concurrent=3"])
    assert err.value.key == "search.max_concurrent" and "got 3 < 4" in err.value.message


def test_hyperband_rules_follow_what_auto_stands_for(monkeypatch):
    """The HyperBand rules compared the scheduler's name, so an ``auto`` meaning HyperBand would
    have skipped them; they now ask what the name runs."""
    from search import schedulers

    monkeypatch.setattr(schedulers, "AUTO", "hyperband")
    auto = [line.replace("=hyperband", "=auto") for line in GRID]
    with pytest.raises(SpecError, match="got 3 < 4"):
        load_spec(DET, [*auto, "search.max_concurrent=3"])


def test_mode_min_is_refused_every_metric_is_better_higher():
    with pytest.raises(SpecError) as err:
        load_spec(DET, ["objective.mode=min"])
    assert err.value.key == "objective.mode" and "better higher" in err.value.message
    assert err.value.fix == "use mode: max."


def test_a_scheduler_pickled_before_extrapolation_existed_still_resumes():
    import pickle

    sched = StratifiedHalving("map50", "max", epochs=8, rungs=(2, 4), reference=None)
    old = pickle.loads(pickle.dumps(sched))
    for name in ("extrapolate", "rise"):
        del old.__dict__[name]  # as a tuner.pkl written by the previous version holds it
    restored = pickle.loads(pickle.dumps(old))
    assert restored.extrapolate is False and restored.rise == 0.25
    assert restored.on_trial_result(None, trial("a", lr=0.1), {"epoch": 2, "map50": 0.3}) == GO
