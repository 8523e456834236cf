"""Choosing a study's trial and its lineage, on study files written by hand (no study run):
suffixes, ties, and the lineage facts of a study without an MLflow parent run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from search import facts, select
from search import study as S


def test_lineage_without_an_mlflow_parent_comes_from_the_spec(tmp_path):
    """A study run with SEARCH_NO_MLFLOW=1 has no parent run: the lineage facts come from the
    spec (this raised AttributeError: a local dict shadowed the facts module), and a composed
    model over a pretrained backbone file records that file's sha256, not 'none'."""
    from search.launcher import write_spec
    from search.select import lineage
    from search.spec import load_spec
    from trainables.files import sha256_file

    exp = tmp_path / "s"
    exp.mkdir()
    root = Path(__file__).resolve().parents[1]
    spec = load_spec(root / "spaces/det.yaml")
    write_spec(spec, exp)
    (exp / "study.json").write_text(json.dumps({"metric": "map50", "trials": {}}))
    tags = lineage(exp, {"id": "t1", "best_metric": 0.5, "best_epoch": 2})
    assert tags["base_weights_sha256"] == sha256_file(root / "spaces/base/det-base.pt")
    assert len(tags["dataset_fingerprint"]) == 64 and tags["trial"] == "t1"
    backbone = tmp_path / "backbone.pth"
    backbone.write_bytes(b"weights")
    spec.model.weights, spec.model.weights_backbone = None, str(backbone)
    assert facts.base_weights_sha256(spec) == f"backbone:{sha256_file(backbone)}"


def test_a_trial_suffix_shared_by_two_scored_trials_is_ambiguous(tmp_path):
    ids = ["t_00001", "t_00011", "t_00002"]
    trials = {
        i: {
            "id": i,
            "index": n,
            "params": {},
            "state": S.COMPLETE,
            "best_metric": 0.1 * (n + 1),
            "best_epoch": 1,
        }
        for n, i in enumerate(ids)
    }
    S.write_study(tmp_path, {"metric": "map", "mode": "max", "status": "finished", "trials": trials})
    with pytest.raises(select.SelectError, match="'1' is ambiguous: t_00001, t_00011"):
        select.choose_trial(tmp_path, "1")  # both have a best metric: not "has no best metric"
    assert select.choose_trial(tmp_path, "00011")["id"] == "t_00011"
    with pytest.raises(select.SelectError, match="no trial '3'"):
        select.choose_trial(tmp_path, "3")
    # a suffix that also names an errored trial is ambiguous too (the scored one was taken)
    trials["t_00001"].update(state=S.FAILED)
    S.write_study(tmp_path, {"metric": "map", "mode": "max", "status": "finished", "trials": trials})
    with pytest.raises(select.SelectError, match="'1' is ambiguous: t_00001, t_00011"):
        select.choose_trial(tmp_path, "1")
    with pytest.raises(select.SelectError, match="'t_00001' has no best metric"):
        select.choose_trial(tmp_path, "00001")


def test_a_tie_for_best_goes_to_the_first_proposed_trial_everywhere(tmp_path):
    """ranked/best_trial broke ties by the order trials were listed (the tracker's: finish order;
    --keep-top's: study.json's), so the summary or --keep-top could pick another trial than status."""
    trials = [
        {"id": i, "index": n, "state": S.COMPLETE, "best_metric": 0.6 if n else 0.5}
        for n, i in enumerate(["a", "b", "c"])
    ]
    shuffled = [trials[2], trials[0], trials[1]]
    assert [t["id"] for t in S.ranked(shuffled, "max")] == ["b", "c", "a"]
    assert S.best_trial(shuffled, "max")["id"] == "b"
