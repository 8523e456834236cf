"""The study's base metric is one number (issue 15 item 1): the unmodified base model's epoch-0
score, whichever trial reports first; status, best and promote read the same function."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from search import select
from search import study as S
from search.launch_text import recipe_plan_text
from search.progress import StudyState


def _trial(i, base, **params):
    return {
        "id": f"t{i}",
        "index": i,
        "params": params,
        "base_metric": base,
        "history": [{"epoch": 0, "map50": base}],
    }


@pytest.mark.parametrize(
    ("trials", "expected", "until_finished"),
    [
        # a trial that swapped activations reported first: its epoch 0 is not the base model's
        ([_trial(0, 0.0003, activation="silu"), _trial(1, 0.0009, activation="keep")], 0.0009, 0.0009),
        ([_trial(0, 0.0003, activation="silu"), _trial(1, 0.0009)], 0.0009, 0.0009),  # keep is the default
        ([_trial(0, 0.0009, lr=0.1), _trial(1, 0.0011, activation="gelu")], 0.0009, 0.0009),  # not the max
        # none kept: a finished study's stand-in is the best epoch 0; until then a plain trial may come
        ([_trial(0, 0.0003, activation="silu"), _trial(1, 0.0005, activation="mish")], 0.0005, None),
        ([], None, None),
    ],
)
def test_study_base_metric_is_the_unmodified_models(trials, expected, until_finished, tmp_path):
    for status in ("finished", "interrupted", "running"):
        want = expected if status == "finished" else until_finished
        state = {"metric": "map50", "mode": "max", "status": status, "trials": {t["id"]: t for t in trials}}
        assert S.study_base_metric(state) == want
        S.write_study(tmp_path, state)
        got = S.status_object(tmp_path)
        assert got["base_metric"] == want == select.base_metric(got)


def test_keeps_base():
    assert S.keeps_base({}) and S.keeps_base({"activation": "keep", "norm": "train", "trainable": "heads"})
    assert not S.keeps_base({"activation": "silu"})


def test_a_late_epoch_0_keeps_the_history_in_epoch_order(tmp_path):
    """The shared base evaluation can report epoch 0 after epoch 1 (trainables.trial); the history
    stays in epoch order, so the stop record takes the value of the trial's last epoch."""
    state = StudyState(tmp_path, "s", "map50", "max", epochs=4)
    trial = SimpleNamespace(trial_id="t0", config={"lr": 0.01}, path=None)
    for epoch, value in ((1, 0.30), (2, 0.35), (0, 0.05)):
        state.on_trial_result(0, [], trial, {"epoch": epoch, "map50": value})
    t = state.state["trials"]["t0"]
    assert [r["epoch"] for r in t["history"]] == [0, 1, 2]
    assert (t["epochs"], t["best_metric"], t["base_metric"]) == (2, 0.35, 0.05)
    state.on_trial_complete(0, [], trial)
    assert t["state"] == S.PRUNED
    assert (t["stopped"]["epoch"], t["stopped"]["value"], t["stopped"]["rule"]) == (2, 0.35, "scheduler")


def test_trials_are_numbered_in_the_order_ray_created_them(tmp_path):
    """The searcher proposes the reference trial first; whichever of two trials starts first, the
    reference is trial 1 in the progress lines and first in status (the launch header says so)."""
    state = StudyState(tmp_path, "s", "map50", "max", epochs=2)
    ref, other = (
        SimpleNamespace(trial_id=i, config={"lr": lr}, path=None) for i, lr in (("r", 0.02), ("o", 0.1))
    )
    state.on_trial_start(0, [ref, other], other)  # the second trial's actor was ready first
    state.on_trial_start(0, [ref, other], ref)
    trials = state.state["trials"]
    assert (trials["r"]["index"], trials["o"]["index"]) == (0, 1)
    assert [t["id"] for t in S.status_object(tmp_path)["trials"]] == ["r", "o"]


@pytest.mark.parametrize(
    "a, b, mode, beats",
    [
        (0.5, 0.4, "max", True),
        (0.5, 0.4, "min", False),
        (0.3, None, "min", True),
        (None, 0.4, "max", False),
        (float("nan"), None, "max", False),  # a trial whose first value is NaN is not the best
        (float("inf"), 0.4, "max", False),
        (0.4, 0.4, "max", False),
    ],
)
def test_one_better_for_trials_and_the_study(a, b, mode, beats):
    from trainables.files import better

    assert S.better is better  # the study and the trial loop judge "best" the same way
    assert better(a, b, mode) is beats


def test_recipe_plan_lines_close_their_parentheses():
    for i, scaling in ((0, "linear"), (1, "sqrt")):
        line = recipe_plan_text(i, scaling, {"lr": 0.0025, "optimizer": "sgd"})
        assert line.count("(") == line.count(")") and line.endswith(": lr=0.002500 optimizer=sgd"), line
        assert f"trial {i + 1} is" in line and f"by the {scaling} rule" in line


def test_a_copied_or_moved_study_reads_its_own_checkpoints(tmp_path):
    """study.json records absolute paths under the folder the study ran in; read from a copy or a
    moved folder, the trials' paths point into that folder (export once used the original's)."""
    import json

    old, here = tmp_path / "trial_runs" / "s", tmp_path / "moved" / "s"  # a trial_ folder above
    here.mkdir(parents=True)
    trial = {
        "trial_dir": str(old / "trial_a"),
        "checkpoint": str(old / "trial_a" / "checkpoint_000001" / "model.pt"),
        "latest_checkpoint": None,
        "params": {"note": str(old / "trial_a")},  # only the path keys move
    }
    (here / S.STUDY_FILE).write_text(json.dumps({"trials": {"a": trial}}))
    got = S.read_study(here)["trials"]["a"]
    assert got["trial_dir"] == str(here.resolve() / "trial_a")
    assert got["checkpoint"] == str(here.resolve() / "trial_a" / "checkpoint_000001" / "model.pt")
    assert got["latest_checkpoint"] is None and got["params"] == trial["params"]
    (here / S.STUDY_FILE).write_text(json.dumps({"trials": {"a": {**trial, "checkpoint": str(here / "x")}}}))
    assert S.read_study(here)["trials"]["a"]["checkpoint"] == str(here / "x")  # no trial_ part: kept


def test_output_dir_is_where_name_is_looked_up_and_nowhere_else(tmp_path, monkeypatch):
    """``--output-dir D`` names where NAME lives: ./NAME or ./runs/NAME are not taken instead
    (status/resume/export once acted on ./runs/NAME when D/NAME did not exist)."""
    monkeypatch.chdir(tmp_path)
    for d in (tmp_path / "runs" / "k", tmp_path / "k", tmp_path / "other" / "k"):
        d.mkdir(parents=True)
        (d / S.STUDY_FILE).write_text("{}")
    with pytest.raises(S.ExperimentNotFound, match="both .*k and .*runs/k hold a study"):
        S.resolve_experiment("k")  # two studies: neither is guessed (./k was taken silently)
    assert S.resolve_experiment("./k") == (tmp_path / "k").resolve()
    assert S.resolve_experiment("k", tmp_path / "other") == (tmp_path / "other" / "k").resolve()
    with pytest.raises(S.ExperimentNotFound, match="looked in: nowhere/k"):
        S.resolve_experiment("k", Path("nowhere"))
    assert S.resolve_experiment(str(tmp_path / "k"), Path("nowhere")) == (tmp_path / "k").resolve()
    (tmp_path / "k" / S.STUDY_FILE).unlink()
    assert S.resolve_experiment("k") == (tmp_path / "runs" / "k").resolve()


def test_a_misspelt_study_name_is_told_the_studies_that_exist(tmp_path, monkeypatch):
    """A mistyped name got only the folders tried; now the nearest study, or those there."""
    monkeypatch.chdir(tmp_path)
    for name in ("det-study", "seg-x", "not-a-study"):
        (tmp_path / "runs" / name).mkdir(parents=True)
    for name in ("det-study", "seg-x"):
        (tmp_path / "runs" / name / S.STUDY_FILE).write_text("{}")
    with pytest.raises(S.ExperimentNotFound, match="Did you mean 'det-study' in runs[?]"):
        S.resolve_experiment("det-stuyd")
    with pytest.raises(S.ExperimentNotFound, match="Studies in runs: det-study, seg-x[.]"):
        S.resolve_experiment("zzz")
    with pytest.raises(S.ExperimentNotFound) as err:
        S.resolve_experiment("zzz", tmp_path / "elsewhere")
    assert "Studies" not in str(err.value) and "Did you mean" not in str(err.value)


def test_an_interrupted_run_leaves_no_stand_in_base_and_resume_records_the_plain_one(tmp_path):
    """Interrupted before a trial that keeps the base model reported epoch 0: MLflow got the
    activation-swapped trial's epoch 0 as ``base_map`` and kept it after resume (status showed the
    real one). Now no base until a plain trial reports; the resumed run records that one."""
    from search import mlflow_store, run_map, tracking
    from search.spec import load_spec
    from tests.test_tracking import write_spec

    spec = load_spec(write_spec(tmp_path, name="basefix"))
    exp_dir = Path(spec.output_dir) / spec.name
    exp_dir.mkdir(parents=True)
    silu = SimpleNamespace(trial_id="a", config={"activation": "silu"}, path="", status="RUNNING")
    plain = SimpleNamespace(trial_id="b", config={"activation": "keep"}, path="", status="PENDING")
    record = {
        "id": "a",
        "index": 0,
        "params": silu.config,
        "history": [{"epoch": 0, "map": 0.05}],
        "reference": True,
    }
    S.write_study(exp_dir, {"metric": "map", "mode": "max", "status": "running", "trials": {"a": record}})
    cb = tracking.make_callback(spec, exp_dir, resume=False)
    cb.setup()
    cb.on_trial_result(0, [silu], silu, {"epoch": 0, "map": 0.05})
    cb.on_experiment_end([silu, plain])
    mlc = mlflow_store.client(mlflow_store.tracking_uri(spec))
    runs = json.loads((exp_dir / run_map.RUNS_FILE).read_text())["runs"]
    parent = mlc.get_run(runs["parent"])
    assert "base_map" not in parent.data.metrics and parent.data.tags["summary.status"] == "interrupted"
    killed = mlc.get_run(runs["a"]).data.tags  # an interrupted trial's run says what it is
    assert (killed["interrupted"], killed["search.state"], killed["search.reference"]) == (
        "true",
        "PENDING",
        "true",
    )

    cb = tracking.make_callback(spec, exp_dir, resume=True)
    cb.setup()
    for trial, value in ((plain, 0.1), (silu, 0.4)):
        cb.on_trial_result(0, [silu, plain], trial, {"epoch": 0 if value == 0.1 else 1, "map": value})
        cb.on_trial_complete(0, [silu, plain], trial)
    cb.on_experiment_end([silu, plain])
    parent = mlc.get_run(parent.info.run_id)
    assert parent.data.metrics["base_map"] == pytest.approx(0.1)
    assert float(parent.data.tags["summary.improvement"]) == pytest.approx(0.3)
    assert parent.data.tags["summary.status"] == "finished"
    cb = tracking.make_callback(spec, exp_dir, resume=True, expected=3)  # 3 trials: 2 = interrupted
    cb.setup()
    cb.on_experiment_end([silu, plain])
    assert mlc.get_run(parent.info.run_id).data.tags["summary.status"] == "interrupted"


def test_an_interrupted_parents_summary_names_the_trial_its_best_value_is(tmp_path):
    """Interrupted while a better trial ran: the parent's summary.best_trial and best_vs_reference
    were that trial's, its best_map and improvement the finished reference's."""
    from search import mlflow_store, run_map, tracking
    from search.spec import load_spec
    from tests.test_tracking import write_spec

    spec = load_spec(write_spec(tmp_path, name="partial"))
    exp_dir = Path(spec.output_dir) / spec.name
    exp_dir.mkdir(parents=True)
    ref = SimpleNamespace(trial_id="r", config={"lr": 0.01}, path="", status="TERMINATED")
    fast = SimpleNamespace(trial_id="f", config={"lr": 0.02}, path="", status="RUNNING")
    history = {
        "r": [{"epoch": 0, "map": 0.002}, {"epoch": 1, "map": 0.009}],
        "f": [{"epoch": 1, "map": 0.031}],
    }
    records = {
        "r": {"id": "r", "index": 0, "state": S.COMPLETE, "reference": True, "best_metric": 0.009},
        "f": {"id": "f", "index": 1, "state": S.RUNNING, "best_metric": 0.031},
    }
    for tid, record in records.items():
        record |= {"params": {}, "history": history[tid], "best_epoch": 1}
    S.write_study(exp_dir, {"metric": "map", "mode": "max", "status": "interrupted", "trials": records})
    cb = tracking.make_callback(spec, exp_dir, resume=False)
    cb.setup()
    for trial in (ref, fast):
        for row in history[trial.trial_id]:
            cb.on_trial_result(0, [ref, fast], trial, row)
    cb.on_trial_complete(0, [ref, fast], ref)
    cb.on_experiment_end([ref, fast])
    mlc = mlflow_store.client(mlflow_store.tracking_uri(spec))
    runs = json.loads((exp_dir / run_map.RUNS_FILE).read_text())["runs"]
    tags = mlc.get_run(runs["parent"]).data.tags
    assert tags["summary.best_trial"] == "r"
    assert float(tags["summary.best_map"]) == pytest.approx(0.009)
    assert float(tags["summary.best_vs_reference"]) == 0.0 and tags["summary.status"] == "interrupted"


def test_a_failed_reference_is_said_and_compared_with_nothing():
    """A diverged reference trial was still "the reference" at its last value, and the best trial
    was said to be above it (summary, status, best, MLflow's best_vs_reference)."""
    ref = {"id": "r", "index": 0, "reference": True, "state": S.FAILED, "best_metric": 0.0051}
    other = {"id": "b", "index": 1, "state": S.COMPLETE, "best_metric": 0.0076}
    summary = S.reference_summary({"mode": "max", "trials": {"r": ref, "b": other}})
    assert summary["best_metric"] is None and summary["best_vs_reference"] is None
    assert (
        S.reference_text(summary, "map50")
        == "reference trial (torchvision recipe) r failed: no comparison with it"
    )
    ref["state"] = S.COMPLETE
    summary = S.reference_summary({"mode": "max", "trials": {"r": ref, "b": other}})
    assert summary["best_vs_reference"] == pytest.approx(0.0025)


def test_a_trial_that_predicts_background_only_is_flagged(tmp_path):
    """A seg study's best trial was a constant all-background model (miou 0.4324 at every epoch,
    the background's share) and nothing said so; ``fg_miou`` 0 at its best epoch now does."""
    rows = [{"epoch": 0, "miou": 0.08, "fg_miou": 0.01}, {"epoch": 1, "miou": 0.4324, "fg_miou": 0.0}]
    flat = {
        "id": "f",
        "index": 0,
        "state": S.COMPLETE,
        "best_metric": 0.4324,
        "best_epoch": 1,
        "history": rows,
    }
    good = {**flat, "id": "g", "index": 1, "best_metric": 0.40, "history": [{"epoch": 1, "fg_miou": 0.2}]}
    S.write_study(
        tmp_path, {"metric": "miou", "mode": "max", "status": "finished", "trials": {"f": flat, "g": good}}
    )
    status = S.status_object(tmp_path)
    assert [t.get("background_only") for t in status["trials"]] == [True, None]
    assert status["best"]["background_only"] and "no foreground" in S.BACKGROUND_ONLY


def test_an_interrupted_study_records_each_trials_disk_use(tmp_path):
    """A trial stopped by Ctrl-C before its first checkpoint report showed 0 B beside its files."""
    folder = tmp_path / "trial_t0"
    (folder / "checkpoint_000000").mkdir(parents=True)
    (folder / "checkpoint_000000" / "model.pt").write_bytes(b"x" * 1000)
    state = StudyState(tmp_path, "s", "map50", "max", epochs=4)
    trial = SimpleNamespace(trial_id="t0", config={"lr": 0.01}, path=str(folder))
    state.on_trial_start(0, [trial], trial)
    state.finish("interrupted")
    t = state.state["trials"]["t0"]
    assert t["state"] == S.PAUSED and t["disk_bytes"] >= 1000


@pytest.mark.parametrize(("mode", "side", "gain"), [("max", "below", "+0.2000"), ("min", "above", "-0.2000")])
def test_what_a_minimised_objective_reads(mode, side, gain, capsys):
    """For objective.mode min a stopped trial is above its cut (the words said below), and the
    summary's gain over the base is base - best, as best and MLflow have it (it printed best - base)."""
    from search.launch_text import print_summary

    record = {"epoch": 2, "value": 0.9, "cut": 0.7, "group": "all trials", "rule": "halving"}
    assert f": {side} the rung's cut 0.7000 among all trials" in S.stop_text(record, "loss", mode)
    for rule in ("collapse", "extrapolation"):
        assert f"{side} 0.7000" in S.stop_text({**record, "rule": rule}, "loss", mode)
    best = {"id": "b", "best_metric": 0.7, "best_epoch": 2, "params": {"lr": 0.0031249999999999997}}
    summary = {"experiment_dir": "x", "name": "s", "status": "finished", "counts": {S.COMPLETE: 1}}
    summary |= {"trials": [], "metric": "loss", "mode": mode, "best": best, "base_metric": 0.5, "mlflow": "-"}
    print_summary(summary)
    out = capsys.readouterr().out
    assert f"vs base model (epoch 0) 0.5000 ({gain})" in out and "params: lr=0.003125" in out


def test_a_trial_ray_continues_under_its_own_id_after_restart_errored_keeps_its_history(tmp_path):
    """``resume --restart-errored`` sets the errored trials aside, as Ray restarts them under new
    ids; a trial whose worker died Ray continued under its own id from its epoch-1 checkpoint, and
    study.json showed epochs [2, 3] only, the failed record aside, the old Optuna number."""
    old = {"id": "w", "index": 0, "state": S.FAILED, "failure": S.ERROR, "error": "RayActorError: dead"}
    rows = [{"epoch": 0, "map50": 0.1}, {"epoch": 1, "map50": 0.2}]
    old.update(params={"lr": 0.01}, epochs=1, history=rows, optuna_number=1)
    previous = {**S.new_study("s", "map50", "max"), "trials": {}, "restarted_errored": [old]}
    state = StudyState(tmp_path, "s", "map50", "max", epochs=3, previous=previous)
    state.searcher = SimpleNamespace(optuna_number=lambda tid: 4, outcome=lambda tid: "COMPLETE")  # reopened
    trial = SimpleNamespace(trial_id="w", config={"lr": 0.01}, path=None)
    state.on_trial_start(0, [trial], trial)
    for epoch, value in ((2, 0.3), (3, 0.35)):
        state.on_trial_result(0, [trial], trial, {"epoch": epoch, "map50": value})
    state.on_trial_complete(0, [trial], trial)
    t = state.state["trials"]["w"]
    assert [r["epoch"] for r in t["history"]] == [0, 1, 2, 3] and t["state"] == S.COMPLETE
    assert (t["error"], t.get("failure"), t["optuna_number"]) == (None, None, 4)
    assert t["last_error"] == "RayActorError: dead"
    assert state.state["restarted_errored"] == []


def test_a_write_the_disk_cannot_hold_leaves_the_file_and_no_temporary(tmp_path):
    """A full disk left an empty .study.json.<pid>.tmp (and .mlflow_runs.json's) at every stop."""
    import subprocess
    import sys

    target = tmp_path / S.STUDY_FILE
    target.write_text("{}")
    code = (
        "import resource, signal, sys; from pathlib import Path; from search.study import atomic_write_text\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))\n"
        "try:\n    atomic_write_text(Path(sys.argv[1]), 'x' * 5000)\n"
        "except OSError as e:\n    print(e.errno)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "27", done.stderr  # EFBIG, as ENOSPC would be
    assert sorted(p.name for p in tmp_path.iterdir()) == [S.STUDY_FILE] and target.read_text() == "{}"


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1]",
        json.dumps({"class_names": [], "category_ids": []}),
        json.dumps({"class_names": ["a", 2], "category_ids": []}),
        json.dumps({"class_names": ["a", "b"], "category_ids": [1]}),
        json.dumps({"class_names": ["a"], "category_ids": [True]}),
        json.dumps({"class_names": ["a"]}),
        json.dumps({"class_names": ["a"], "category_ids": []}),  # export refused it: 0 ids for 1 class
    ],
)
def test_a_facts_file_not_as_written_is_not_read(tmp_path, text):
    from search import facts

    (tmp_path / facts.FACTS_FILE).write_text(text)
    assert facts.read_facts(tmp_path) is None


def test_a_resume_trains_the_classes_its_study_began_with(tmp_path):
    """A resume on annotations whose categories changed since the launch trained heads whose
    labels no longer meant what the study's checkpoints learnt."""
    from search import facts
    from search.errors import SpecError
    from search.spec import load_spec
    from search.study_folder import check_classes
    from tests.tinydata import make_tiny_coco, write_tiny_spec

    make_tiny_coco(tmp_path / "data", n_images=2, size=64)
    spec = load_spec(write_tiny_spec(tmp_path, "cls", space={"lr": 0.01}, search={"num_trials": 1}, epochs=1))
    exp_dir = tmp_path / "exp"
    exp_dir.mkdir()
    check_classes(spec, exp_dir)  # a study from before facts.json: none is made from today's data
    assert facts.read_facts(exp_dir) is None and spec.class_names == ["red", "blue"]
    facts.write_facts(spec, exp_dir)
    check_classes(spec, exp_dir)
    for names, ids in ((["red", "green"], [3, 7]), (["red", "blue"], [3, 8])):  # a name, or an id
        (exp_dir / facts.FACTS_FILE).write_text(json.dumps({"class_names": names, "category_ids": ids}))
        said = f"data: the dataset's classes ['red', 'blue'] (ids [3, 7]) are not the {names} (ids {ids})"
        with pytest.raises(SpecError, match=re.escape(said)):
            check_classes(spec, exp_dir)
    # the parent run's tags: facts.json's (hashed once at launch)
    (exp_dir / facts.FACTS_FILE).write_text(
        json.dumps({"class_names": ["red", "blue"], "category_ids": [3, 7], "dataset_fingerprint": "then"})
    )
    assert facts.parent_record(spec, exp_dir)[0]["dataset_fingerprint"] == "then"
