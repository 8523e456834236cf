"""Fine-tuning-aware search (issue 13; the recipe itself: tests/test_recipes.py): the scheduler
table, group-wise rungs and the collapse rule, the stop record, and a real study that runs the
reference trial first and reports it (study.json, status --json, MLflow tags)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import TrialScheduler

from search import study as S
from search.errors import SpecError
from search.schedulers import AUTO, SCHEDULER_NAMES, SCHEDULERS, group_of, rungs_for, scheduler_label
from search.spec import load_spec
from search.stopping import RecordingASHA, StratifiedHalving
from tests.tinydata import make_tiny_coco, write_tiny_spec
from trainables import recipes

ROOT = Path(__file__).resolve().parents[1]
STOP, GO = TrialScheduler.STOP, TrialScheduler.CONTINUE


def trial(tid: str, **config) -> SimpleNamespace:
    return SimpleNamespace(trial_id=tid, config=config)


# ---------------------------------------------------------------- the table and the spec


def test_scheduler_table_is_what_the_spec_accepts():
    assert SCHEDULER_NAMES == tuple(SCHEDULERS)
    assert {"auto", "stratified", "curve", "asha", "hyperband", "median", "none"} <= set(SCHEDULER_NAMES)
    spec = load_spec(ROOT / "spaces/det.yaml")
    assert spec.search.scheduler == "auto"
    built = {}
    for name in SCHEDULER_NAMES:
        spec.search.scheduler = name
        built[name] = SCHEDULERS[name].factory(spec)
        assert hasattr(built[name], "stop_record"), name
    # the default is what BENCHMARKS.md §3 measured best: curve (stratified + extrapolation)
    assert isinstance(built["auto"], StratifiedHalving) and built["auto"].extrapolate
    assert built["curve"].extrapolate and not built["stratified"].extrapolate
    assert AUTO == "curve" and type(built["auto"]) is type(built[AUTO])
    assert scheduler_label("auto") == "auto (curve)" and scheduler_label("asha") == "asha"


def test_unknown_scheduler_exits_2_listing_the_names():
    done = subprocess.run(
        [sys.executable, "-m", "search", "validate", "--quick", "spaces/det.yaml"]
        + ["--set", "search.scheduler=ashaa"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert "search.scheduler" in line and "'ashaa'" in line and "Did you mean 'asha'" in line
    assert all(name in line for name in SCHEDULER_NAMES)


def test_reference_params_of_the_demo_specs():
    det = load_spec(ROOT / "spaces/det.yaml")
    ref = det.reference_params()
    assert ref == pytest.approx(
        {
            "optimizer": "sgd",
            "lr": 0.15 * det.train.batch_size / 192,
            "momentum": 0.9,
            "weight_decay": 4e-5,
            "trainable": "all",
            "activation": "keep",
        }
    )
    assert load_spec(ROOT / "spaces/det.yaml", ["search.reference_trial=false"]).reference_params() is None


def test_reference_trial_refused_without_a_recipe_or_with_grid(monkeypatch):
    with pytest.raises(SpecError) as err:
        load_spec(ROOT / "spaces/det.yaml", ["search.reference_trial=true", "search.algorithm=grid"])
    assert err.value.key == "search.reference_trial" and "grid" in err.value.message
    monkeypatch.delitem(recipes.RECIPES, "ssdlite")
    with pytest.raises(SpecError) as err:
        load_spec(ROOT / "spaces/det.yaml", ["search.reference_trial=true"])
    assert err.value.key == "search.reference_trial" and "'ssdlite'" in err.value.message
    assert load_spec(ROOT / "spaces/det.yaml").reference_params() is None  # default: on when a recipe exists


# ---------------------------------------------------------------- rungs, groups, collapse


@pytest.mark.parametrize(
    ("epochs", "grace", "rf", "warmup", "rungs"),
    [
        (8, 1, 2, 0.3, (2, 4)),
        (8, 3, 2, 0.0, (4,)),
        (3, 1, 2, 0.0, (1, 2)),
        (6, 1, 2, 1.5, (2, 3)),
        (2, 1, 2, 0, (1,)),
    ],
)
def test_rungs_after_warmup_from_the_schedule(epochs, grace, rf, warmup, rungs):
    assert rungs_for(epochs, grace, rf, warmup) == rungs


def test_group_of_uses_structural_choices_only():
    a = group_of(
        {"lr": 0.1, "trainable": "all", "optimizer": "sgd", "loss.box": "giou", "loss.weight.x": 2.0}
    )
    assert a == "loss.box=giou,optimizer=sgd,trainable=all"
    assert group_of({"lr": 0.1}) == "all trials"
    assert group_of({"norm": "train", "lr": 1}) != group_of({"norm": "frozen", "lr": 1})
    # a key without effect there does not split groups (the two recipe trials differed in it)
    assert group_of({"trainable": "all", "trainable_k": 2}) == group_of(
        {"trainable": "all", "trainable_k": 3}
    )
    assert group_of({"activation": "keep", "activation_scope": "backbone"}) == "activation=keep"
    last_k = {"trainable": "backbone_last_k", "trainable_k": 2}
    assert group_of(last_k) != group_of({**last_k, "trainable_k": 3})


def _feed(sched, rows):
    """(trial, epoch, value) rows -> decisions."""
    return [sched.on_trial_result(None, t, {"epoch": e, "map50": v}) for t, e, v in rows]


def test_rungs_compare_only_within_a_group():
    sched = StratifiedHalving("map50", "max", epochs=8, rungs=(2, 4), reference=None, collapse_from=8)
    heads = [trial(f"h{i}", trainable="heads") for i in range(3)]
    full = trial("f0", trainable="all")
    # the 'all' trial is far below every 'heads' trial at rung 2, but alone in its group: it goes on
    decisions = _feed(sched, [(heads[0], 2, 0.30), (heads[1], 2, 0.35), (full, 2, 0.01), (heads[2], 2, 0.10)])
    assert decisions == [GO, GO, GO, STOP]
    record = sched.stop_record("h2")
    assert record["epoch"] == 2 and record["value"] == 0.10 and record["group"] == "trainable=heads"
    assert record["rule"] == "halving" and 0.10 < record["cut"] <= 0.35
    assert sched.stop_record("f0") is None
    assert _feed(sched, [(full, 3, 0.0)]) == [GO]  # not a rung, no collapse rule before epoch 8


def test_collapse_stops_the_first_at_a_rung_but_never_the_reference():
    ref_params = {"lr": 0.01, "trainable": "all"}
    sched = StratifiedHalving("map50", "max", epochs=8, rungs=(2, 4), reference=ref_params)
    ref, bad, slow = trial("r", **ref_params), trial("b", lr=0.3, trainable="all"), trial("s", lr=0.001)
    for t in (ref, bad, slow):
        sched.on_trial_add(None, t)
    assert sched.reference_id == "r"
    assert _feed(sched, [(ref, 0, 0.05), (bad, 0, 0.05), (slow, 0, 0.02)]) == [GO, GO, GO]
    assert _feed(sched, [(ref, 2, 0.01), (bad, 2, 0.0), (slow, 2, 0.0)]) == [GO, GO, GO]  # before half
    assert _feed(sched, [(ref, 4, 0.40), (slow, 4, 0.25), (bad, 4, 0.018)]) == [GO, GO, STOP]
    assert sched.stop_record("b") == {
        "epoch": 4,
        "value": 0.018,
        "cut": 0.20,
        "group": "trainable=all",
        "rule": "collapse",
    }
    assert _feed(sched, [(ref, 5, 0.0)]) == [GO]  # the reference itself is never stopped
    assert _feed(sched, [(slow, 5, 0.01)]) == [STOP]  # below its own start (epoch 0) after half the epochs
    assert sched.stop_record("s")["cut"] == 0.02
    assert sched.stop_record("s")["rule"] == "collapse"


def test_resume_restores_the_curves_the_launch_had_seen():
    """Ray restores a scheduler as the launch built it (no curves, no reference): the collapse cut
    and the rungs come back from study.json's records, so a resumed study stops what the
    uninterrupted one would have (the reference's epoch 4 was reported before the interruption)."""
    ref_params = {"lr": 0.01, "trainable": "all"}
    stop = {"epoch": 2, "value": 0.0, "cut": 0.3, "group": "trainable=all", "rule": "halving"}
    records = [
        {"id": "r", "reference": True, "params": ref_params, "history": [{"epoch": 4, "map50": 0.40}]},
        {"id": "p", "params": {"lr": 0.02, "trainable": "all"}, "history": [{"epoch": 2, "map50": 0.30}]},
        {"id": "q", "params": {"lr": 0.03, "trainable": "all"}, "history": [{"epoch": 2, "map50": 0.32}]},
        {"id": "z", "params": {"lr": 0.9, "trainable": "all"}, "stopped_by": "scheduler", "stopped": stop},
    ]
    bad, low = trial("b", lr=0.3, trainable="all"), trial("l", lr=0.2, trainable="all")
    for restored in (False, True):
        sched = StratifiedHalving("map50", "max", epochs=8, rungs=(2, 4), reference=ref_params)
        if restored:
            sched.restore_history(records)
        assert sched.reference_id == ("r" if restored else None)
        assert sched.stop_record("z") == (stop if restored else None)  # a stop made before it
        # 'l' is the third of its group at rung 2 only with the restored values; 'b' collapses
        # (below half the reference's 0.40 at epoch 4) only when the reference's curve is known
        want = [STOP, STOP] if restored else [GO, GO]
        assert _feed(sched, [(low, 2, 0.05), (bad, 4, 0.018)]) == want


def _curve_sched(mode="max", reference=None):
    return StratifiedHalving("map50", mode, epochs=8, rungs=(2,), reference=reference, extrapolate=True)


LEADER = [0.01, 0.05, 0.30, 0.55, 0.58, 0.59, 0.60, 0.60]  # epochs 1..8 of the best trial


@pytest.mark.parametrize(
    ("curve", "config", "stop_at"),
    [
        # rose, then flattened far below the leader: at 4 its gain of epoch 3 still allows
        # 0.40 + 4 * 0.13 >= 0.55; at 5 it does not (0.41 + 3 * 0.02 < 0.58)
        ([0.05, 0.25, 0.38, 0.40, 0.41, 0.41, 0.41, 0.41], {}, 5),
        # still climbing: 0.40 + 3 * 0.10 >= 0.58 at 5; flattened at 6 (0.42 + 2 * 0.05 < 0.59)
        ([0.02, 0.10, 0.25, 0.35, 0.40, 0.42, 0.43, 0.43], {}, 6),
        # a flat start that has not started learning (seg's winner took off at epoch 6): never judged
        ([0.419, 0.419, 0.427, 0.436, 0.431, 0.48, 0.574, 0.661], {}, None),
        # a step schedule: its drop is still ahead, the recent slope says nothing
        ([0.05, 0.25, 0.38, 0.40, 0.41, 0.41, 0.41, 0.41], {"schedule": "step"}, None),
        # as good as the leader: never stopped
        ([0.01, 0.06, 0.31, 0.55, 0.58, 0.59, 0.60, 0.61], {}, None),
        # the study's leader, falling back: at 5 its bound 0.50 + 3 * 0.02 is below the other's
        # 0.58, but its own best (0.60 at epoch 4) is not: it has nobody to catch up with
        ([0.02, 0.30, 0.58, 0.60, 0.50, 0.49, 0.49, 0.49], {}, None),
    ],
)
def test_extrapolation_stops_only_risen_flattened_curves_that_cannot_catch_up(curve, config, stop_at):
    sched = _curve_sched()
    lead, other = trial("lead", lr=0.01), trial("x", lr=0.02, **config)
    stopped = None
    for epoch, (a, b) in enumerate(zip(LEADER, curve, strict=True), start=1):
        assert sched.on_trial_result(None, lead, {"epoch": epoch, "map50": a}) == GO
        if sched.on_trial_result(None, other, {"epoch": epoch, "map50": b}) == STOP:
            stopped = epoch
            break
    assert stopped == stop_at
    record = sched.stop_record("x")
    if stop_at is None:
        assert record is None
    else:
        assert record["rule"] == "extrapolation" and record["epoch"] == stop_at
        assert record["value"] == curve[stop_at - 1] and record["cut"] == max(LEADER[:stop_at])
        assert "cannot catch up" in S.stop_text(record, "map50")


def test_extrapolation_is_off_in_stratified_and_spares_the_reference():
    plain = StratifiedHalving("map50", "max", epochs=8, rungs=(2,), reference=None)
    ref_params = {"lr": 0.001}
    sched = _curve_sched(reference=ref_params)
    lead, ref = trial("lead", lr=0.01), trial("r", **ref_params)
    sched.on_trial_add(None, ref)
    flat = [0.05, 0.25, 0.38, 0.40, 0.41, 0.41, 0.41, 0.41]
    for s in (plain, sched):
        for epoch, (a, b) in enumerate(zip(LEADER, flat, strict=True), start=1):
            s.on_trial_result(None, lead, {"epoch": epoch, "map50": a})
            assert s.on_trial_result(None, ref, {"epoch": epoch, "map50": b}) == GO
        assert s.stop_record("r") is None


def test_extrapolation_in_min_mode():
    sched = _curve_sched(mode="min")
    lead, other = trial("lead", lr=0.01), trial("x", lr=0.02)
    for epoch, (a, b) in enumerate(
        zip((4.0, 3.0, 2.0, 1.0, 0.9), (4.0, 3.0, 2.6, 2.5, 2.5), strict=True), start=1
    ):
        sched.on_trial_result(None, lead, {"epoch": epoch, "map50": a})
        decision = sched.on_trial_result(None, other, {"epoch": epoch, "map50": b})
    # at 4: 2.5 - 4 * 0.4 = 0.9 could still beat 1.0; at 5: 2.5 - 3 * 0.1 = 2.2 cannot beat 0.9
    assert decision == STOP and sched.stop_record("x")["epoch"] == 5 and sched.stop_record("x")["cut"] == 0.9


def test_min_mode_cuts_the_other_way():
    sched = StratifiedHalving("loss", "min", epochs=4, rungs=(2,), reference=None, min_group=3)
    ts = [trial(f"t{i}", optimizer="sgd") for i in range(3)]
    out = [
        sched.on_trial_result(None, t, {"epoch": 2, "loss": v})
        for t, v in zip(ts, (1.0, 2.0, 5.0), strict=True)
    ]
    assert out == [GO, GO, STOP] and sched.stop_record("t2")["cut"] < 5.0


def test_recording_asha_records_the_cut_and_spares_the_reference():
    ref = {"lr": 0.5}
    sched = RecordingASHA(time_attr="epoch", max_t=4, grace_period=1, reduction_factor=2, reference=ref)
    sched.set_search_properties("map50", "max")
    ts = [trial("r", lr=0.5), trial("a", lr=0.1, trainable="all"), trial("b", lr=0.2, trainable="heads")]
    for t in ts:
        sched.on_trial_add(None, t)
    out = [
        sched.on_trial_result(None, t, {"epoch": 1, "map50": v})
        for t, v in zip(ts, (0.0, 0.5, 0.1), strict=True)
    ]
    assert out[0] == GO and out[2] == STOP  # the reference came first at 0.0: nothing to compare with
    rec = sched.stop_record("b")
    assert rec["rule"] == "halving" and rec["epoch"] == 1 and rec["cut"] > 0.1
    assert rec["group"] == "all trials"  # Ray's ASHA cuts over every trial, whatever its structure
    # at rung 2 the reference falls below the cut ASHA computes from 'a': it is still not stopped
    assert sched.on_trial_result(None, ts[1], {"epoch": 2, "map50": 0.5}) == GO
    assert sched.on_trial_result(None, ts[0], {"epoch": 2, "map50": 0.0}) == GO
    assert sched.stop_record("r") is None


# ---------------------------------------------------------------- a real study


RULES = ["linear", "sqrt"]  # the reference study runs the recipe twice: trials 1 and 2


@pytest.fixture(scope="module")
def reference_study(ray_local, tmp_path_factory):
    from search.launcher import launch

    root = tmp_path_factory.mktemp("reference")
    make_tiny_coco(root / "data", n_images=6, size=100)
    path = write_tiny_spec(
        root,
        "refstudy",
        space={
            "optimizer": {"choices": ["sgd", "adamw"]},
            "lr": {"low": 1e-3, "high": 1e-1, "log": True},
            "trainable": {"choices": ["all", "heads"]},
        },
        search={"algorithm": "tpe", "num_trials": 3, "max_concurrent": 2, "reference_scaling": RULES},
        epochs=2,
    )
    spec = load_spec(path)
    summary = launch(spec)
    return spec, summary, root


def test_the_reference_trial_runs_and_is_reported(reference_study):
    from search import mlflow_store

    spec, summary, root = reference_study
    exp_dir = root / "runs" / "refstudy"
    refs = [t for t in summary["trials"] if t.get("reference")]
    assert len(refs) == 1 and len(summary["trials"]) == 3
    assert refs[0]["params"] == pytest.approx(spec.reference_params())
    assert refs[0]["state"] == S.COMPLETE
    # trial 2 is the recipe again, its lr scaled by the square root of the batch ratio
    (linear, ref_params), (sqrt, sqrt_params) = spec.recipe_trials()
    assert (linear, sqrt) == ("linear", "sqrt") and sqrt_params["lr"] > ref_params["lr"]
    by_number = sorted(summary["trials"], key=lambda t: t["optuna_number"])
    assert [t["recipe"] for t in by_number] == [*RULES, None]
    assert by_number[0]["reference"] and not by_number[1]["reference"]
    assert by_number[1]["params"] == pytest.approx(sqrt_params)
    assert summary["reference"]["id"] == refs[0]["id"]
    assert summary["reference"]["best_metric"] == refs[0]["best_metric"]
    best = summary["best"]["best_metric"]
    assert summary["reference"]["best_vs_reference"] == pytest.approx(best - refs[0]["best_metric"])

    done = subprocess.run(
        [sys.executable, "-m", "search", "status", str(exp_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert [t["id"] for t in status["trials"] if t.get("reference")] == [refs[0]["id"]]
    assert [t["id"] for t in status["trials"]] == [t["id"] for t in by_number]  # reference first
    assert [t["id"] for t in status["trials"] if t.get("recipe") == "sqrt"] == [by_number[1]["id"]]
    done = subprocess.run(
        [sys.executable, "-m", "search", "status", str(exp_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )
    assert done.returncode == 0 and "recipe, lr scaled to the batch by the sqrt rule" in done.stdout

    mlc = mlflow_store.client(mlflow_store.tracking_uri(spec))
    exp = mlc.get_experiment_by_name(spec.name)
    runs = mlc.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    flags = sorted(r.data.tags.get("search.reference") for r in children)
    assert flags == ["false", "false", "true"]
    parent = next(r for r in runs if not r.data.tags.get("mlflow.parentRunId"))
    assert parent.data.tags.get("summary.reference_trial") == refs[0]["id"]
    assert parent.data.metrics["reference_map50"] == pytest.approx(refs[0]["best_metric"])
    ref_run = next(r for r in children if r.data.tags.get("search.reference") == "true")
    assert ref_run.data.tags["search.run_key"].endswith(":" + refs[0]["id"])
    tags_of = {r.data.tags["search.run_key"].rsplit(":", 1)[1]: r.data.tags for r in children}
    # each recipe trial's lr rule as a tag, none on TPE's trial
    assert [tags_of[t["id"]].get("search.recipe") for t in by_number] == [*RULES, None]


def test_optuna_records_the_reference_trial(reference_study):
    from search.searcher import load_study

    spec, summary, root = reference_study
    ot = load_study(root / "runs" / "refstudy" / S.JOURNAL_FILE, spec.name).get_trials()
    marked = [t for t in ot if t.user_attrs.get("reference")]
    assert len(marked) == 1 and marked[0].number == 0
    assert marked[0].params == pytest.approx(spec.reference_params())
    assert [t.user_attrs.get("recipe") for t in sorted(ot, key=lambda t: t.number)] == [*RULES, None]
    assert ot[1].params == pytest.approx(spec.recipe_trials()[1][1])


def test_hyperband_halves_its_bracket_when_every_trial_exists(ray_local, tmp_path):
    """Ray's synchronous HyperBand pauses trials at a bracket's milestone and halves the bracket
    once all its trials are there; the spec demands max_concurrent >= num_trials for it (below
    that it stops nothing). max_t 4, rf 2: a bracket of 3 that never halves, then one of 3 halved
    at epoch 2. Paused trials resume from their checkpoints: every trial reports each epoch once
    (a trial paused before the shared epoch-0 evaluation reached it reports the epoch 0 it owes
    after resuming, so the order may differ)."""
    from search.launcher import launch

    make_tiny_coco(tmp_path / "data", n_images=4, size=64)
    path = write_tiny_spec(
        tmp_path,
        "hbstudy",
        space={"lr": {"low": 1e-3, "high": 1e-1, "log": True}},
        search={
            "algorithm": "random",
            "scheduler": "hyperband",
            "num_trials": 6,
            "max_concurrent": 6,
            "reference_trial": False,
        },
        epochs=4,
    )
    summary = launch(load_spec(path))
    trials = summary["trials"]
    assert len(trials) == 6
    stopped = [t for t in trials if t["state"] == S.PRUNED]
    assert 1 <= len(stopped) <= 2 and all(t["epochs"] == 2 for t in stopped), trials
    for t in stopped:  # Ray stops paused trials from another's result: recorded all the same
        last = [r["map50"] for r in t["history"] if r.get("epoch") == 2]
        assert t["stopped"]["rule"] == "hyperband" and t["stopped"]["epoch"] == 2, t["stopped"]
        assert t["stopped"]["value"] == pytest.approx(last[-1])
    for t in trials:
        epochs = [r["epoch"] for r in t["history"] if "epoch" in r]
        assert sorted(epochs) == list(range(t["epochs"] + 1)), (t["id"], epochs)
        if t["state"] != S.PRUNED:
            assert t["state"] == S.COMPLETE and t["epochs"] == 4


def test_extrapolation_judges_against_the_other_trials_curves_as_they_stand_now():
    """The best another trial has reported is kept per trial as its curve stands: a curve rewritten
    by a resumed trial (an epoch reported again from an earlier checkpoint) counts as rewritten,
    and a scheduler pickled before those per-trial bests existed rebuilds them from the curves."""
    import pickle

    flat = [0.05, 0.25, 0.38, 0.40, 0.41]  # bound at 5: 0.41 + 3 * 0.02 = 0.47
    high = [0.10, 0.30, 0.50, 0.60]
    for rewrite, old_pickle, expect in ((False, False, STOP), (True, False, GO), (False, True, STOP)):
        sched = _curve_sched()
        lead, other = trial("lead", lr=0.01), trial("x", lr=0.02)
        for epoch, v in enumerate(high, start=1):
            sched.on_trial_result(None, lead, {"epoch": epoch, "map50": v})
        if rewrite:  # the leader resumed from epoch 1: its later epochs came back far lower
            for epoch, v in enumerate([0.20, 0.30, 0.45], start=2):
                sched.on_trial_result(None, lead, {"epoch": epoch, "map50": v})
        for epoch, v in enumerate(flat[:-1], start=1):
            assert sched.on_trial_result(None, other, {"epoch": epoch, "map50": v}) == GO
        if old_pickle:
            sched = pickle.loads(pickle.dumps(sched))
            del sched.__dict__["_tops"]  # as a tuner.pkl written by the previous version holds it
            sched = pickle.loads(pickle.dumps(sched))
        decision = sched.on_trial_result(None, other, {"epoch": 5, "map50": flat[-1]})
        assert decision == expect, (rewrite, old_pickle)


class _RayTrial:
    """What Ray's HyperBand reads of a trial (hashable: its brackets key on the trial)."""

    def __init__(self, tid: str, **config):
        self.trial_id, self.config, self.status, self.is_saving = tid, config, "RUNNING", False


def test_hyperband_halving_never_stops_the_reference():
    """Ray's HyperBand stopped a bracket's worst trials whatever they were, the reference trial too
    (README: no scheduler ever stops it). max_t 4, rf 2: Ray fills a bracket of 3 that never
    halves, then one of 3 that keeps 2 at epoch 2; there the reference is the worst, and goes on."""
    from search.stopping import RecordingHyperBand

    sched = RecordingHyperBand(time_attr="epoch", max_t=4, reduction_factor=2, reference={"lr": 0.5})
    sched.set_search_properties("map50", "max")
    stopped: list[str] = []
    controller = SimpleNamespace(stop_trial=lambda t: stopped.append(t.trial_id))
    first = [_RayTrial(f"f{i}", lr=0.01) for i in range(3)]
    ts = [_RayTrial("a", lr=0.1), _RayTrial("r", lr=0.5), _RayTrial("b", lr=0.2)]
    for t in first + ts:
        sched.on_trial_add(controller, t)
    decisions = {}
    for t, value in zip(ts, (0.5, 0.0, 0.4), strict=True):
        decisions[t.trial_id] = sched.on_trial_result(controller, t, {"epoch": 2, "map50": value})
        if decisions[t.trial_id] == TrialScheduler.PAUSE:
            t.status = "PAUSED"
    assert sched.reference_id == "r" and decisions["a"] == decisions["r"] == TrialScheduler.PAUSE
    assert not stopped and decisions["b"] != STOP, (decisions, stopped)  # the halving kept all 3
    assert sched.stop_record("r") is None
    later = _RayTrial("n", lr=0.2)  # the bracket kept one more than Ray's count: it is still full
    sched.on_trial_add(controller, later)
    assert sched._trial_info[later][0] is not sched._trial_info[ts[1]][0]
