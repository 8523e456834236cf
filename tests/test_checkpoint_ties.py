"""A tie between a trial's epochs: the best epoch is the first of them everywhere. Ray's checkpoint
manager keeps the later of two equal scores, so it kept (and export and promote used) another epoch
than the one study.json, status, best and MLflow named; it now ranks by ``checkpoint_rank``, which
only a strictly better epoch carries (search.worker)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from search import study as S
from tests.cli_study import ok_json, search
from tests.tinydata import make_tiny_coco, write_tiny_spec


@pytest.mark.slow
def test_the_kept_checkpoint_is_the_first_of_tied_epochs(tmp_path):
    make_tiny_coco(tmp_path / "data", n_images=4, size=64)
    # an lr that moves nothing and frozen norms: every epoch scores the same
    spec = write_tiny_spec(
        tmp_path,
        "ties",
        space={"optimizer": "sgd", "lr": 1e-12, "norm": "frozen"},
        search={"algorithm": "random", "scheduler": "none", "num_trials": 1, "reference_trial": False},
        epochs=3,
    )
    proc = search("launch", str(spec), "--json", cwd=tmp_path, timeout=600)
    ok_json(proc)
    exp = tmp_path / "runs" / "ties"
    (trial,) = S.status_object(exp)["trials"]
    values = [row["map50"] for row in trial["history"] if row["epoch"] >= 1]
    assert len(values) == 3 and len(set(values)) == 1, values  # the tie this test is about
    # the rank of the epochs that are not better is finite: -inf made Ray's TensorBoard logger warn
    # "NaN or Inf found in input tensor" on stderr at each, and wrote -Infinity into result.json
    rows = [json.loads(line) for line in (Path(trial["trial_dir"]) / "result.json").open()]
    ranks = [row[S.CHECKPOINT_RANK] for row in rows if S.CHECKPOINT_RANK in row]
    assert len(ranks) == 3 and all(math.isfinite(r) for r in ranks) and ranks[1] < 0, ranks
    assert "NaN or Inf" not in proc.stderr, proc.stderr[-2000:]
    assert trial["best_epoch"] == 1
    assert torch.load(trial["checkpoint"], weights_only=True)["epoch"] == 1
    (best,) = ok_json(search("best", "ties", "--output-dir", str(tmp_path / "runs"), "--json", cwd=tmp_path))
    assert best["best_epoch"] == 1 and best["checkpoint"] == trial["checkpoint"]
