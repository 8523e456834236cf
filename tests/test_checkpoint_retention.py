"""Checkpoint retention and crash safety (a crash-fuzz audit): Ray deleted a trial's previous
checkpoint as soon as it registered the next one, while the newest signed state (search.durable),
which a resume installs, still named the deleted folder until the end of that loop step; a kill
in between lost the trial for good (resume: "Could not recover from checkpoint as it does not
exist on storage anymore", the trial FAILED). Ray now keeps every checkpoint and the study deletes
the superseded ones once a snapshot naming their successors is current."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ray.tune import Callback

from search import durable
from search import study as S
from search.progress import superseded_checkpoints
from tests.test_launcher import tiny_data, write_spec


class SignedNamesExist(Callback):
    """Driver callback: after each checkpoint Ray registered (and, before, deleted the one it
    replaced), every checkpoint folder the current signed snapshot names must exist: it is what a
    kill at this moment leaves to ``resume``. Module level: Ray pickles it by reference."""

    def __init__(self, exp_dir: Path) -> None:
        self.exp_dir, self.checked, self.missing = exp_dir, 0, []

    def on_trial_save(self, iteration, trials, trial, **info):
        snap = durable.current_snapshot(self.exp_dir)
        if snap is None or not (snap / S.STUDY_FILE).is_file():
            return
        for t in json.loads((snap / S.STUDY_FILE).read_text())["trials"].values():
            for key in ("checkpoint", "latest_checkpoint"):
                if t.get(key):
                    self.checked += 1
                    if not Path(t[key]).parent.is_dir():
                        self.missing.append((t["id"], key, Path(t[key]).parent.name))


def test_the_signed_state_never_names_a_deleted_checkpoint(ray_local, tmp_path_factory):
    from search.launcher import launch
    from search.spec import load_spec

    root = tiny_data(tmp_path_factory)
    space = {"optimizer": "sgd", "lr": {"choices": [0.01, 0.02]}}
    path = write_spec(
        root, "keep", space, {"algorithm": "grid", "scheduler": "none", "num_trials": 2}, epochs=3
    )
    exp_dir = root / "runs" / "keep"
    check = SignedNamesExist(exp_dir)
    os.environ["SEARCH_NO_MLFLOW"] = "1"
    try:
        summary = launch(load_spec(path), extra_callbacks=[check])
    finally:
        os.environ.pop("SEARCH_NO_MLFLOW", None)
    assert check.checked and not check.missing, check.missing
    for t in summary["trials"]:  # in the end the best and the latest are kept, nothing else
        kept = {p.name for p in Path(t["trial_dir"]).glob("checkpoint_*")}
        assert kept == {Path(t["checkpoint"]).parent.name, Path(t["latest_checkpoint"]).parent.name}, kept
        assert t["epochs"] == 3 and Path(t["latest_checkpoint"]).is_file()


def test_superseded_checkpoints_spare_the_best_the_latest_and_newer_folders(tmp_path):
    trial_dir = tmp_path / "trial_a"
    for i in range(5):
        (trial_dir / f"checkpoint_{i:06d}").mkdir(parents=True)
    t = {
        "trial_dir": str(trial_dir),
        "checkpoint": str(trial_dir / "checkpoint_000001" / S.MODEL_FILE),
        "latest_checkpoint": str(trial_dir / "checkpoint_000003" / S.MODEL_FILE),
    }  # checkpoint_000004: handed over by the worker, not yet registered (the next step's)
    state = {"trials": {"a": t, "b": {"trial_dir": str(tmp_path / "trial_b"), "latest_checkpoint": None}}}
    assert [p.name for p in sorted(superseded_checkpoints(state, delete=True))] == [
        "checkpoint_000000",
        "checkpoint_000002",
    ]
    assert sorted(p.name for p in trial_dir.iterdir()) == [f"checkpoint_{i:06d}" for i in (1, 3, 4)]
    state["trials"]["a"]["checkpoints_removed"] = True  # --keep-top's: left alone
    assert superseded_checkpoints(state) == []


def test_keep_top_trims_an_ended_kept_trial_to_its_best(tmp_path):
    """--keep-top left each kept trial its latest checkpoint too (74 MB with AdamW's state), which
    nothing reads once the trial ended; a failed or paused trial's stays (a resume continues it)."""
    from search.study_folder import trim_kept

    trials = {}
    for tid, state in (
        ("done", S.COMPLETE),
        ("stopped", S.PRUNED),
        ("failed", S.FAILED),
        ("paused", S.PAUSED),
    ):
        trial_dir = tmp_path / f"trial_{tid}"
        for i in (1, 3):
            (trial_dir / f"checkpoint_{i:06d}").mkdir(parents=True)
            (trial_dir / f"checkpoint_{i:06d}" / S.MODEL_FILE).write_bytes(b"x" * 100)
        trials[tid] = {
            "id": tid,
            "state": state,
            "trial_dir": str(trial_dir),
            "checkpoint": str(trial_dir / "checkpoint_000001" / S.MODEL_FILE),
            "latest_checkpoint": str(trial_dir / "checkpoint_000003" / S.MODEL_FILE),
        }
    assert trim_kept({"trials": trials}) == 2
    for tid in trials:
        left = sorted(p.name for p in (tmp_path / f"trial_{tid}").iterdir())
        ended = tid in ("done", "stopped")
        assert left == (["checkpoint_000001"] if ended else ["checkpoint_000001", "checkpoint_000003"]), tid
        assert (trials[tid]["latest_checkpoint"] == trials[tid]["checkpoint"]) is ended
    assert trim_kept({"trials": trials}) == 0  # nothing left to trim


def test_a_checkpoint_the_disk_cannot_hold_raises_the_disk_error(tmp_path):
    """torch's writer turned a full disk into 'RuntimeError: [enforce fail at inline_container.cc]
    unexpected pos', which search.failures could not tell from a trial's own failure (no retry from
    the last checkpoint); the OSError now comes through, and no temporary file stays."""
    import subprocess
    import sys

    code = (
        "import errno, resource, signal, sys, torch; from pathlib import Path\n"
        "from trainables.checkpoint import save_weights\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))\n"
        "try:\n    save_weights(torch.nn.Linear(500, 500), Path(sys.argv[1]))\n"
        "except OSError as e:\n    print('OSError', e.errno == errno.EFBIG)\n"
    )
    target = tmp_path / "w.pt"
    done = subprocess.run(
        [sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=120
    )
    assert done.stdout.strip() == "OSError True", done.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_keep_top_keeps_the_best_of_a_lower_is_better_study(tmp_path):
    """--keep-top ranked the trials as if higher were better whatever the study's mode: in a
    "min" study it kept the worst trial's checkpoint and removed the best's."""
    from search.study_folder import remove_outside_top

    trials = {}
    for n, value in enumerate((0.5, 0.1, 0.9)):
        trial_dir = tmp_path / f"trial_{n}"
        (trial_dir / "checkpoint_000001").mkdir(parents=True)
        (trial_dir / "checkpoint_000001" / S.MODEL_FILE).write_bytes(b"x" * 10)
        ckpt = str(trial_dir / "checkpoint_000001" / S.MODEL_FILE)
        trials[f"t{n}"] = {"id": f"t{n}", "index": n, "state": S.COMPLETE, "best_metric": value}
        trials[f"t{n}"].update(trial_dir=str(trial_dir), checkpoint=ckpt, latest_checkpoint=ckpt)
    state = {"metric": "loss", "mode": "min", "trials": trials}
    assert sorted(remove_outside_top(state, 1)) == ["t0", "t2"]
    assert [n for n in range(3) if (tmp_path / f"trial_{n}" / "checkpoint_000001").is_dir()] == [1]
    assert Path(trials["t1"]["checkpoint"]).is_file() and trials["t0"]["checkpoint"] is None
    assert trials["t2"]["checkpoints_removed"] and not trials["t1"].get("checkpoints_removed")
