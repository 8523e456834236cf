"""Shared fixtures. ``ray_local``: one real local Ray per test module (2 CPUs, no dashboard);
``hub``: an empty torch hub cache for one test.

``shared_file(relative)``: a file of the shared data and weights folder ``../shared`` beside the
repository root (``shared/weights/...``, ``shared/data/...``), found from this file, never by an
absolute path. A missing one skips the test, naming the path; when the ``CI`` environment
variable is set it fails the test instead (CI runs a clone with ``../shared`` beside it, so a
skip there would hide a broken layout).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MOBILENET_V2 = "weights/mobilenet_v2-b0353104.pth"  # torchvision's ImageNet MobileNetV2 (IMAGENET1K_V1)

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


@pytest.fixture
def hub(tmp_path):
    """An empty torch hub cache for the test, the previous one restored after."""
    import torch

    old = torch.hub.get_dir()
    path = tmp_path / "hub"
    path.mkdir()
    torch.hub.set_dir(str(path))
    yield path
    torch.hub.set_dir(old)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray cluster for the module's tests (started once; shut down after the module)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()


def shared_file(relative: str) -> Path:
    """``../shared/<relative>`` (from the repository root); skip when it is absent, fail under CI."""
    path = SHARED / relative
    if path.is_file():
        return path
    why = f"{path} is absent (the shared data and weights beside the repository root, {SHARED})"
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI is set, so a missing shared file is a failure, not a skip", pytrace=False)
    pytest.skip(why)


@pytest.fixture
def mobilenet_v2_file() -> Path:
    """The shared ImageNet MobileNetV2 weights (``torchvision`` ``MobileNet_V2_Weights.IMAGENET1K_V1``)."""
    return shared_file(MOBILENET_V2)


from tests.cli_study import cli_bundle, cli_study  # noqa: E402,F401  (session fixtures)
