"""The world of the fault suites: tiny COCO data and a base weights file (ssdlite320)."""

from __future__ import annotations

import os

import pytest

from tests.faults.common import sha256
from tests.tinydata import make_tiny_coco

ARCH = "ssdlite320_mobilenet_v3_large"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import torch
    import torchvision

    root = tmp_path_factory.mktemp("faults")
    make_tiny_coco(root / "data", n_images=6, size=100)
    base = root / "base" / "ssdlite_base.pt"
    base.parent.mkdir()
    torch.manual_seed(0)
    torch.save(torchvision.models.get_model(ARCH, weights=None, weights_backbone=None).state_dict(), base)
    os.chmod(base, 0o644)
    return {"root": root, "base": base, "sha": sha256(base)}
