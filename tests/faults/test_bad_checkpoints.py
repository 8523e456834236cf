"""Checkpoints a trial resumes from or a command loads: a code-running pickle is refused unread
(one line, torch's own warnings silenced), another architecture's checkpoint names its keys."""

from __future__ import annotations

import pickle
import warnings

import pytest

from tests.faults.test_bad_data import Evil


def test_checkpoint_code_pickle_refused_on_resume(tmp_path):
    """A Ray checkpoint replaced by a code-running pickle: the trial's resume refuses it, naming it."""
    import torch

    from tests.tinydata import make_tiny_coco, trial_config
    from trainables import checkpoint
    from trainables.config import DataSplit
    from trainables.params import resolve
    from trainables.trial import run_trial

    marker = tmp_path / "EVIL_CODE_RAN"
    evil = tmp_path / "latest.pt"
    torch.save({"format": 1, "model": Evil(str(marker))}, evil)  # torch.save's own pickle format
    images, ann = make_tiny_coco(tmp_path / "data", n_images=4, size=64)
    cfg = trial_config(DataSplit(images, ann), tmp_path / "out", image_size=64, epochs=1, metric="map50")
    with pytest.raises(checkpoint.CheckpointError, match="refused by torch.load") as err:
        run_trial(cfg, resolve({}), resume_from=evil)
    assert str(evil) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists(), "unpickling ran code"
    evil.write_bytes(evil.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError, match="cannot be read"):
        checkpoint.load(evil)
    with warnings.catch_warnings(record=True) as seen, pytest.raises(checkpoint.CheckpointError):
        warnings.simplefilter("always")
        evil.write_bytes(pickle.dumps({"format": 1, "model": Evil(str(marker))}, protocol=4))
        checkpoint.load(evil)  # a plain pickle: torch warned of its protocol before refusing it
    assert not [w for w in seen if issubclass(w.category, UserWarning)], [str(w.message) for w in seen]


def test_checkpoint_wrong_architecture_lists_keys(tmp_path):
    """A full checkpoint of another architecture: missing and unexpected keys, no unpickling surprise."""
    import torchvision

    from tests.tinydata import trial_config
    from trainables import checkpoint
    from trainables.config import DataSplit
    from trainables.params import resolve

    model = torchvision.models.resnet18(weights=None)
    path = checkpoint.save(
        tmp_path / "other.pt",
        model=model,
        optimizer=None,
        scheduler=None,
        epoch=1,
        metrics={},
        params={},
        base_sha256=None,
        trainable_only=False,
    )
    assert checkpoint.load(path)["epoch"] == 1
    cfg = trial_config(DataSplit(tmp_path, tmp_path), tmp_path, image_size=64)
    with pytest.raises(RuntimeError) as err:
        checkpoint.load_trained(cfg, resolve({}), 3, path)
    text = str(err.value)
    assert "Missing key(s)" in text and "Unexpected key(s)" in text and "fc.weight" in text
