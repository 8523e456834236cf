"""The searcher alone (no Ray trials): what Optuna is told of each trial, and of the scheduler's stops."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import optuna
import pytest
from ray.tune.schedulers import TrialScheduler

from search.samplers import make_sampler
from search.searcher import StudySearch, journal_storage, load_study
from search.space_parse import parse_space
from search.stopping import StratifiedHalving


def study_search(journal, name: str, epochs: int, fixed: dict | None = None) -> StudySearch:
    """A random-sampling searcher over lr (and ``fixed`` constants) on a journal file, objective map."""
    space = parse_space({"lr": {"low": 1e-3, "high": 1e-1, "log": True}, **(fixed or {})})
    return StudySearch(
        space=space.define_by_run,
        metric="map",
        mode="max",
        sampler=optuna.samplers.RandomSampler(seed=0),
        study_name=name,
        storage=journal_storage(journal),
        epochs=epochs,
    )


def test_study_search_states(tmp_path):
    journal = tmp_path / "optuna.journal"

    def searcher():
        return study_search(journal, "u", 3, {"optimizer": "sgd"})

    s = searcher()
    configs = {tid: s.suggest(tid) for tid in "abcde"}
    for config in configs.values():
        assert config["optimizer"] == "sgd" and 1e-3 <= config["lr"] <= 1e-1
    values = [0.0, 0.3, 0.5, 0.4]
    for epoch, v in enumerate(values[:3]):
        s.on_trial_result("a", {"epoch": epoch, "map": v})
    s.on_trial_complete("a", {"epoch": 3, "map": values[3]})  # finished: best epoch, not last
    s.on_trial_result("b", {"epoch": 0, "map": 0.0})
    s.on_trial_complete("b", {"epoch": 1, "map": 0.1})  # stopped by the scheduler at epoch 1
    s.on_trial_result("c", {"epoch": 0, "map": 0.0})
    s.on_trial_complete("c", {"epoch": 1, "map": float("-inf"), "diverged": 1})
    s.on_trial_result("d", {"epoch": 0, "map": 0.0})
    s.on_trial_complete("d", error=True)
    s.on_trial_result("e", {"epoch": 0, "map": 0.0})
    # a hard stop: the searcher's checkpoint misses an Optuna trial asked after it
    ckpt = tmp_path / "searcher.pkl"
    s.save(str(ckpt))
    f_config = s.suggest("f")
    f_number = s.optuna_number("f")
    restored = searcher()
    restored.deadline = 123.0
    restored.restore(str(ckpt))
    assert restored.deadline == 123.0  # runtime state kept
    assert restored.suggest("g") == "FINISHED"  # past the deadline: no new trial
    restored.deadline = None
    assert restored.set_max_concurrency(1) and restored.suggest("g") is None  # "e" still runs
    restored.set_max_concurrency(0)
    # the orphan "f" (asked after the checkpoint) is the next suggestion: same params, same number
    assert restored.suggest("f2") == f_config and restored.optuna_number("f2") == f_number
    assert restored.suggest("h") != f_config and restored.optuna_number("h") == f_number + 1
    assert restored.replaces("f2") == "f" and restored.replaces("h") is None  # for the MLflow run of "f"
    # resume --restart-errored: Ray reruns the errored "d" as a new trial id with d's config; it gets
    # a fresh Optuna trial with the same params
    flat_config = {f"config/{k}": v for k, v in configs["d"].items()}
    for epoch, v in enumerate([0.0, 0.2, 0.3]):
        restored.on_trial_result("d2", {"epoch": epoch, "map": v, **flat_config})
    restored.on_trial_complete("d2", {"epoch": 3, "map": 0.25, **flat_config})

    study = load_study(journal, "u")
    by_id = {t.user_attrs["ray_trial_id"]: t for t in study.trials if "restarted_from" not in t.user_attrs}
    S_ = optuna.trial.TrialState
    (again,) = [t for t in study.trials if "restarted_from" in t.user_attrs]
    assert again.user_attrs["restarted_from"] == by_id["d"].number and again.params == by_id["d"].params
    assert again.state == S_.COMPLETE and again.value == 0.3 and again.user_attrs["ray_trial_id"] == "d2"
    assert by_id["a"].state == S_.COMPLETE and by_id["a"].value == 0.5
    assert by_id["a"].user_attrs["best_epoch"] == 2
    assert by_id["a"].intermediate_values == {0: 0.0, 1: 0.3, 2: 0.5, 3: 0.4}
    assert by_id["b"].state == S_.PRUNED and by_id["b"].intermediate_values == {0: 0.0, 1: 0.1}
    assert by_id["c"].state == S_.FAIL and by_id["c"].intermediate_values == {0: 0.0}
    assert by_id["d"].state == S_.FAIL
    assert by_id["e"].state == S_.RUNNING  # unfinished: resume continues it
    assert "f" not in by_id and by_id["f2"].number == f_number and by_id["f2"].state == S_.RUNNING
    assert len(study.trials) == f_number + 3  # f2 (the orphan, adopted), h, and d's restart


def test_a_trial_the_extrapolation_rule_stopped_is_told_complete_with_its_value(tmp_path):
    """Optuna ranks a PRUNED trial behind every finished one; a trial stopped because its learned
    curve cannot catch up reaches it as COMPLETE with its best value, a collapsed one as PRUNED."""
    journal = tmp_path / "optuna.journal"
    s = study_search(journal, "x", 8)
    s.scheduler = StratifiedHalving("map", "max", 8, (2, 4), extrapolate=True)
    curves = {
        "won": [0.0, 0.3, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6],
        "plateau": [0.0, 0.1, 0.3, 0.38, 0.40, 0.41, 0.41, 0.41, 0.41],  # cannot reach 0.6
        "collapsed": [0.3, 0.5, 0.4, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1],  # below its epoch 0 from epoch 4
    }
    stopped_at = {}
    for tid, curve in curves.items():
        trial = SimpleNamespace(trial_id=tid, config=s.suggest(tid))
        s.scheduler.on_trial_add(None, trial)
        for epoch, value in enumerate(curve):
            result = {"epoch": epoch, "map": value}
            s.on_trial_result(tid, result)
            if s.scheduler.on_trial_result(None, trial, result) == TrialScheduler.STOP or epoch == 8:
                s.on_trial_complete(tid, result)
                stopped_at[tid] = epoch
                break
    assert stopped_at == {"won": 8, "plateau": 5, "collapsed": 4}
    by_id = {t.user_attrs["ray_trial_id"]: t for t in load_study(journal, "x").trials}
    S_ = optuna.trial.TrialState
    assert by_id["won"].state == S_.COMPLETE and by_id["won"].value == 0.6
    assert by_id["plateau"].state == S_.COMPLETE and by_id["plateau"].value == 0.41
    assert by_id["plateau"].user_attrs["stopped"] == "extrapolation"
    assert by_id["collapsed"].state == S_.PRUNED and "stopped" not in by_id["collapsed"].user_attrs
    assert s.outcome("plateau") == "COMPLETE" and s.outcome("collapsed") == "PRUNED"
    # the scheduler is runtime state: not in the searcher's checkpoint, kept across restore
    ckpt = tmp_path / "searcher.pkl"
    s.save(str(ckpt))
    assert b"StratifiedHalving" not in ckpt.read_bytes()
    scheduler = s.scheduler
    s.restore(str(ckpt))
    assert s.scheduler is scheduler


@pytest.mark.parametrize("algorithm", ["gp", "cmaes"])
def test_model_based_samplers_leave_conditional_parameters_to_tpe_quietly(algorithm):
    """``momentum`` exists only beside SGD: GP and CMA-ES leave it to TPE, and say nothing per trial."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("optuna")
    logger.addHandler(handler)

    def objective(trial):
        sgd = trial.suggest_categorical("optimizer", ["sgd", "adamw"]) == "sgd"
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        return -abs(math.log10(lr) + 2) + (trial.suggest_float("momentum", 0.8, 0.99) if sgd else 0.9)

    try:
        study = optuna.create_study(direction="maximize", sampler=make_sampler(algorithm, 0, 6, 2))
        study.optimize(objective, n_trials=6)
    finally:
        logger.removeHandler(handler)
    assert len(study.trials) == 6 and any("momentum" in t.params for t in study.trials[2:])
    assert not [r.getMessage() for r in records if "independent" in r.getMessage()]


def test_qmc_never_restarts_its_sequence_when_the_first_finished_trial_lacks_a_conditional():
    """An audit saw QMC repeat a trial: Optuna's QMCSampler took its space from the first finished
    trial (an AdamW one, without ``momentum``), which differed from the running trials' union, so
    its point count started again and the next trial got an earlier trial's lr. With the spec's
    unconditional parameters as its fixed space, every proposal is a new point."""
    space = parse_space(
        {
            "optimizer": {"choices": ["sgd", "adamw"]},
            "lr": {"low": 1e-4, "high": 1e-1, "log": True},
            "weight_decay": {"low": 1e-6, "high": 1e-3, "log": True},
            "momentum": {"low": 0.8, "high": 0.99, "when": {"optimizer": "sgd"}},
        }
    )
    sampler = make_sampler("qmc", 0, 8, None, None, 1, space.joint())
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.enqueue_trial({"optimizer": "sgd", "lr": 0.02, "weight_decay": 1e-4, "momentum": 0.9})
    running = [study.ask() for _ in range(2)]  # the reference and the first proposal
    for t in running:
        space.sample(t)
    lrs = [running[1].params["lr"]]
    study.tell(running[1], state=optuna.trial.TrialState.PRUNED)  # finishes first, reference still runs
    for _ in range(4):
        t = study.ask()
        space.sample(t)
        lrs.append(t.params["lr"])
        study.tell(t, 0.5)
    assert len({round(v, 12) for v in lrs}) == len(lrs), lrs


def test_a_rerun_of_the_reference_trial_is_still_the_reference(tmp_path):
    """``resume --restart-errored`` reran an errored reference trial under a new id as a plain
    trial: no ``reference``/``recipe`` in Optuna or study.json, no reference line in the summary."""
    journal = tmp_path / "optuna.journal"
    s = study_search(journal, "ref", 3)
    s.enqueue_recipes([("linear", {"lr": 0.02})])
    config = s.suggest("r")
    assert config["lr"] == 0.02 and s.reference_id == "r" and s.recipe_of("r") == "linear"
    s.on_trial_result("r", {"epoch": 0, "map": 0.0})
    s.on_trial_complete("r", error=True)
    flat = {f"config/{k}": v for k, v in config.items()}
    s.on_trial_result("r2", {"epoch": 0, "map": 0.0, **flat})  # Ray's rerun of r, a new id
    assert s.reference_id == "r2" and s.recipe_of("r2") == "linear"
    (rerun,) = [t for t in load_study(journal, "ref").trials if "restarted_from" in t.user_attrs]
    assert rerun.user_attrs["reference"] is True and rerun.user_attrs["recipe"] == "linear"


def test_a_journal_cut_off_mid_record_is_mended_before_it_is_written_again(tmp_path, caplog):
    """A full disk cut the journal's last record; the next resume appended to it, gluing two records
    into a line Optuna could not read, and every later resume failed."""
    import pickle

    journal = tmp_path / "optuna.journal"
    s = study_search(journal, "cut", 3)
    s.suggest("a")
    s.on_trial_complete("a", {"epoch": 3, "map": 0.4})
    s.suggest("b")
    ckpt = tmp_path / "searcher-state.pkl"
    s.save(str(ckpt))  # Ray's save: its backend remembers where each record it read begins
    whole = journal.read_bytes()
    journal.write_bytes(whole[:-30])  # the last record, not saved whole
    again = pickle.loads(pickle.dumps(s))  # resume: the searcher comes from tuner.pkl, as Ray pickled it
    again.restore(str(ckpt))
    again.suggest("c")
    study = load_study(journal, "cut")  # a line Optuna cannot read raised here
    assert [t.state for t in study.trials][:1] == [optuna.trial.TrialState.COMPLETE]
    assert "was cut off" in caplog.text
    assert journal.read_bytes().endswith(b"\n") and journal.read_bytes().startswith(
        whole[: whole.rfind(b"\n", 0, len(whole) - 30) + 1]
    )
