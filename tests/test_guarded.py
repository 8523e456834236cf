"""Single decisions that no other test pinned down (a mutation audit): ``promote`` refuses a trial
that only ties the base model, and ``--set`` splits at the first ``=`` (a URI's query or a path may
hold more)."""

from __future__ import annotations

from pathlib import Path

import pytest

from search import promote, select
from search import study as S
from search.spec import load_spec
from search.spec.load import parse_override

ROOT = Path(__file__).resolve().parents[1]


def _study(folder: Path, mode: str, best: float, base: float) -> Path:
    """A finished one-trial study.json (as the launcher writes it) whose trial's best is ``best``
    and whose epoch 0, the base model's score, was ``base``."""
    history = [{"epoch": 0, "map50": base}, {"epoch": 1, "map50": best}]
    trial = {"id": "t_00000", "index": 0, "params": {}, "state": S.COMPLETE, "history": history}
    trial.update(best_metric=best, best_epoch=1, epochs=1)
    folder.mkdir(parents=True)
    state = {"metric": "map50", "mode": mode, "status": "finished", "trials": {"t_00000": trial}}
    S.write_study(folder, state)
    return folder


@pytest.mark.parametrize("mode", ["max", "min"])
def test_promote_refuses_a_trial_that_only_ties_the_base_model(tmp_path, mode):
    """A tie counted as beating the base model: promote went on to register a model no better than
    the one the study started from. A trial that does beat it gets past the check (here to the
    missing MLflow run: this study was never tracked)."""
    tie = _study(tmp_path / "tie", mode, best=0.5, base=0.5)
    with pytest.raises(promote.Refused, match="does not beat the base model's epoch-0 map50 0.5000"):
        promote.promote(tie, "tiny-det")
    better = _study(tmp_path / "better", mode, best=0.6 if mode == "max" else 0.4, base=0.5)
    with pytest.raises(select.SelectError, match="has no MLflow run: .* is not there, so the study was not"):
        promote.promote(better, "tiny-det")
    (better / "mlflow_runs.json").write_text('{"runs": {"par')  # cut: not 'never recorded'
    with pytest.raises(select.SelectError, match="cannot be read .*Fix: put back"):
        promote.promote(better, "tiny-det")
    (better / "mlflow_runs.json").write_text('{"runs": {"parent": "p1"}}')  # a resume without MLflow ran it
    with pytest.raises(select.SelectError, match="it ran without MLflow .*Fix: promote a trial that has one"):
        promote.promote(better, "tiny-det")


def test_set_splits_at_the_first_equals_sign(tmp_path):
    """``--set KEY=VALUE`` split at the last '=': a tracking URI with a query, or a path with '=' in
    a name, lost its key (the key became 'tracking.uri=http://h:5000/?a')."""
    assert parse_override("tracking.uri=http://h:5000/?a=b") == ("tracking.uri", "http://h:5000/?a=b")
    where = tmp_path / "a=b" / "runs"
    assert parse_override(f"output_dir={where}") == ("output_dir", str(where))
    spec = load_spec(ROOT / "spaces/det.yaml", ["tracking.uri=http://h:5000/?a=b", f"output_dir={where}"])
    assert spec.tracking.uri == "http://h:5000/?a=b" and Path(spec.output_dir) == where
