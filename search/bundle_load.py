"""Load a deployment bundle made by ``python -m search export`` and run it: torch, torchvision,
PIL and PyYAML only (this file is copied into every bundle as ``load.py``).

    from load import load_bundle, predict
    model, meta = load_bundle("path/to/bundle")          # eval mode, on the CPU
    result = predict(model, meta, "image.jpg")            # boxes/labels/scores (+ masks) per image

A bundle folder holds ``model.yaml`` (everything needed to rebuild the model: the torchvision
builder name and keyword arguments, the class count and names, preprocessing, the module swaps
made by the search), ``weights.pt`` (the full fine-tuned ``state_dict``, loadable with
``torch.load(weights_only=True)``), ``metrics.json``, optionally ``model.torchscript.pt``, and
``SHA256SUMS`` (checked on load). The model is built with ``weights=None`` (nothing downloads)
and gets the exact module structure it was trained with before the weights are loaded strictly.

An encrypted bundle (``export --encrypt --key-env NAME``) holds ``weights.pt.enc`` instead:
AES-256-GCM under a key derived with scrypt from the secret in the environment variable NAME
(model.yaml ``encryption`` names it); ``load_bundle`` decrypts it with the same variable (or the
one given as ``key_env``), which needs the ``cryptography`` package. No TorchScript file then, as
it would hold the weights in the clear.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
from pathlib import Path
from typing import Any

FORMAT = "search-bundle/1"
# Activation modules a search may have swapped in (model.yaml "module_swaps"): torch.nn names.
ACTIVATIONS = ("ReLU", "ReLU6", "LeakyReLU", "SiLU", "GELU", "Hardswish", "Mish", "ELU")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


ENCRYPTION = {"cipher": "AES-256-GCM", "kdf": "scrypt", "n": 2**15, "r": 8, "p": 1}
AAD = b"search-bundle/1 weights"  # binds the ciphertext to its role in a bundle
MIN_SECRET = 16  # characters of the secret, at least


def _aes_key(secret: str, enc: dict[str, Any]) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    salt = bytes.fromhex(enc["salt"])
    kdf = Scrypt(salt=salt, length=32, n=int(enc["n"]), r=int(enc["r"]), p=int(enc["p"]))
    return kdf.derive(secret.encode())


def encrypt_weights(data: bytes, key_env: str) -> tuple[bytes, dict[str, Any]]:
    """``(nonce + ciphertext, model.yaml "encryption")`` of ``data`` under the secret in ``key_env``."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    secret = os.environ.get(key_env, "")
    if len(secret) < MIN_SECRET:
        raise ValueError(f"environment variable {key_env} must hold a secret of {MIN_SECRET}+ characters")
    enc = {**ENCRYPTION, "salt": secrets.token_hex(16), "key_env": key_env}
    nonce = secrets.token_bytes(12)
    return nonce + AESGCM(_aes_key(secret, enc)).encrypt(nonce, data, AAD), enc


def weights_bytes(folder: Path, meta: dict[str, Any], weights_file: str, key_env: str | None = None) -> bytes:
    """The weights file's bytes, decrypted when model.yaml says it is encrypted (ValueError naming
    the variable when it is unset or holds the wrong secret)."""
    data = (Path(folder) / weights_file).read_bytes()
    enc = meta.get("encryption")
    if not enc:
        return data
    name = key_env or str(enc.get("key_env") or "")
    secret = os.environ.get(name, "") if name else ""
    if not secret:
        raise ValueError(
            f"the weights in {Path(folder) / weights_file} are encrypted: set the environment variable "
            f"{name or '(see --key-env)'} to the secret they were exported with"
        )
    try:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        raise ValueError("the weights are encrypted: decrypting needs the 'cryptography' package") from None
    try:
        return AESGCM(_aes_key(secret, enc)).decrypt(data[:12], data[12:], AAD)
    except InvalidTag:
        raise ValueError(
            f"the secret in {name} does not decrypt {Path(folder) / weights_file}: wrong key or changed file"
        ) from None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _plain_name(name: str, what: str) -> str:
    """A file name inside the bundle folder: no folder part, no '..', not absolute."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("~"):
        raise ValueError(f"{what} {name!r} must be a plain file name inside the bundle")
    return name


def verify(folder: str | Path, required: tuple[str, ...] = ("model.yaml",)) -> dict[str, str]:
    """Check every file listed in ``SHA256SUMS`` (plain names only), and that every file in
    ``required`` is listed; ValueError names the file. Returns name -> sha256."""
    folder = Path(folder)
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        raise ValueError(f"{folder} has no SHA256SUMS: not a bundle made by search export")
    listed: dict[str, str] = {}
    for line in sums.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if not name:
            continue
        name = _plain_name(name.strip(), "SHA256SUMS entry")
        path = folder / name
        if not path.is_file() or path.is_symlink():
            raise ValueError(f"bundle file {path} is missing (or a link)")
        if sha256_file(path) != digest.strip():
            raise ValueError(f"bundle file {path} does not match its sha256 in SHA256SUMS")
        listed[name] = digest.strip()
    for name in required:
        if name not in listed:
            raise ValueError(f"bundle file {folder / name} has no sha256 in SHA256SUMS: refusing to load it")
    return listed


def read_meta(folder: str | Path) -> dict[str, Any]:
    import yaml

    try:
        meta = yaml.safe_load((Path(folder) / "model.yaml").read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{folder}/model.yaml is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{folder}/model.yaml is not a {FORMAT} file")
    pre = meta.get("preprocessing")
    fields = {
        "arch": isinstance(meta.get("arch"), str),
        "task": meta.get("task") in ("detection", "instance_segmentation", "semantic_segmentation"),
        "num_classes": isinstance(meta.get("num_classes"), int) and meta["num_classes"] >= 2,
        "class_names": isinstance(meta.get("class_names"), list),
        "category_ids": "category_ids" not in meta  # bundles before category ids have none
        or (
            isinstance(meta["category_ids"], list)
            and all(isinstance(c, int) for c in meta["category_ids"])
            and len(meta["category_ids"]) == len(meta.get("class_names") or [])
        ),
        "preprocessing.image_size": isinstance(pre, dict)
        and isinstance(pre.get("image_size"), int)
        and pre["image_size"] > 0,
        "preprocessing.resize": isinstance(pre, dict) and pre.get("resize") in ("square", "long_side"),
    }
    bad = [k for k, ok in fields.items() if not ok]
    if bad:
        raise ValueError(f"{folder}/model.yaml: {bad[0]} is missing or invalid: export the bundle again")
    return meta


def _set_module(model: Any, path: str, module: Any) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def _composed(meta: dict[str, Any]) -> Any:
    """A composed arch (``builder: search``: a classification backbone under a torchvision head),
    built by the search package's own code, which must be importable (else use the bundle's
    ``model.torchscript.pt``)."""
    try:
        from trainables import params as P
        from trainables.config import DataSplit, TrialConfig
        from trainables.models import build_model
    except ImportError as exc:
        raise ImportError(
            f"{meta['arch']} over a composed backbone needs the 'search' package (trainables) to rebuild; "
            "install it, or load model.torchscript.pt with load_torchscript()"
        ) from exc
    here = Path(".")
    cfg = TrialConfig(
        task=meta["task"],
        arch=meta["arch"],
        train=DataSplit(here, here),
        val=DataSplit(here, here),
        out_dir=here,
        model_kwargs=dict(meta.get("builder_kwargs") or {}),
    )
    return build_model(cfg, P.resolve({}), int(meta["num_classes"]))[0]


def build(meta: dict[str, Any]) -> Any:
    """The bundle's model with random weights: the builder + the recorded module swaps."""
    import torch
    from torchvision.models import get_model
    from torchvision.ops.misc import FrozenBatchNorm2d

    if meta.get("builder", "torchvision") == "search":
        model = _composed(meta)
    else:
        model = get_model(
            meta["arch"],
            weights=None,
            weights_backbone=None,
            num_classes=int(meta["num_classes"]),
            **dict(meta.get("builder_kwargs") or {}),
        )
    for path, spec in (meta.get("frozen_batchnorm") or {}).items():
        old = model.get_submodule(path)
        _set_module(model, path, FrozenBatchNorm2d(old.num_features, eps=float(spec.get("eps", 1e-5))))
    for path, spec in (meta.get("module_swaps") or {}).items():
        kind = spec["type"]
        if kind not in ACTIVATIONS:
            raise ValueError(
                f"model.yaml swaps {path} to {kind!r}, which is not an activation this loader knows"
            )
        _set_module(model, path, getattr(torch.nn, kind)(**dict(spec.get("kwargs") or {})))
    return model


def load_bundle(
    folder: str | Path, device: str = "cpu", check: bool = True, key_env: str | None = None
) -> tuple[Any, dict[str, Any]]:
    """``(model, meta)``: the fine-tuned model in eval mode on ``device`` and the parsed model.yaml.

    ``check`` verifies the files against ``SHA256SUMS`` first. ``key_env``: the environment variable
    holding an encrypted bundle's secret (default: the one model.yaml names).
    """
    import torch

    folder = Path(folder)
    listed = verify(folder) if check else None  # model.yaml matches its sha256 before it is parsed
    meta = read_meta(folder)
    weights_file = _plain_name(str(meta.get("weights_file", "weights.pt")), "model.yaml weights_file")
    if listed is not None and weights_file not in listed:
        raise ValueError(
            f"bundle file {folder / weights_file} has no sha256 in SHA256SUMS: refusing to load it"
        )
    model = build(meta)
    data = weights_bytes(folder, meta, weights_file, key_env)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval().to(device)
    return model, meta


def load_torchscript(folder: str | Path, device: str = "cpu") -> Any:
    """The TorchScript model of a bundle (None when export could not script it).

    Detection models scripted by torchvision return ``(losses, detections)``."""
    import torch

    path = Path(folder) / "model.torchscript.pt"
    if not path.is_file():
        return None
    verify(folder, ("model.yaml", path.name))  # a TorchScript file runs code: only a listed, matching one
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        return torch.jit.load(str(path), map_location=device)


def read_image(path: str | Path) -> Any:
    """RGB float32 (3, H, W) in [0, 1]; EXIF orientation applied; 16-bit grayscale scaled by 1/65535."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I"):
            gray = np.clip(np.asarray(img, dtype=np.float32) / 65535.0, 0.0, 1.0)
            arr = np.repeat(gray[:, :, None], 3, axis=2)
        elif img.mode == "F":
            gray = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
            arr = np.repeat(gray[:, :, None], 3, axis=2)
        else:
            if img.mode != "RGB":
                img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "PA") else img.convert("RGB")
            arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


def preprocess(image: Any, meta: dict[str, Any]) -> Any:
    """The network input for an image tensor from :func:`read_image` (model.yaml preprocessing):
    detection resizes the long side to ``image_size`` (aspect kept, antialiased); semantic
    segmentation resizes to ``image_size`` square (normalisation happens in :func:`run`)."""
    from torchvision.transforms.v2 import functional as F

    pre = meta["preprocessing"]
    size = int(pre["image_size"])
    if pre["resize"] == "square":
        return F.resize(image, [size, size], antialias=True)
    h, w = image.shape[-2:]
    if min(h, w) * size < max(h, w):  # the short side would be 0 px (e.g. 5000 x 1): keep 1
        return F.resize(image, [size, 1] if h > w else [1, size], antialias=True)
    return F.resize(image, size=None, max_size=size, antialias=True)


def run(model: Any, meta: dict[str, Any], images: list[Any]) -> list[dict[str, Any]]:
    """Raw model outputs for preprocessed images, in network-input coordinates: detection dicts
    (``boxes``, ``labels``, ``scores``, ``masks``), or ``{"logits": C x H x W}`` for semantic."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        if meta["task"] == "semantic_segmentation":
            mean = torch.tensor(meta["preprocessing"].get("mean", IMAGENET_MEAN), device=device).view(
                1, 3, 1, 1
            )
            std = torch.tensor(meta["preprocessing"].get("std", IMAGENET_STD), device=device).view(1, 3, 1, 1)
            batch = (torch.stack([im.to(device) for im in images]) - mean) / std
            out = model(batch)["out"]
            return [{"logits": o.cpu()} for o in out]
        outputs = model([im.to(device) for im in images])
        return [{k: v.cpu() for k, v in o.items()} for o in outputs]


def predict(model: Any, meta: dict[str, Any], path: str | Path, min_score: float = 0.0) -> dict[str, Any]:
    """One image end to end; coordinates and masks in the ORIGINAL image's pixels.

    Detection: ``{"detections": [{"label", "class", "category_id", "score", "box": [x1, y1, x2, y2]}],
    "masks": [H x W bool tensor per detection] (instance segmentation)}``, ``category_id`` the
    dataset's COCO id of the class (None in a bundle that does not record them); semantic
    segmentation: ``{"mask": H x W int64 class map}``. Also ``width``, ``height``, ``input_size``.
    """
    import torch
    import torch.nn.functional as TF

    image = read_image(path)
    h, w = image.shape[-2:]
    x = preprocess(image, meta)
    ih, iw = x.shape[-2:]
    out = run(model, meta, [x])[0]
    names = ["__background__", *meta["class_names"]]
    ids = [None, *meta.get("category_ids", [None] * len(meta["class_names"]))]  # the dataset's COCO ids
    result: dict[str, Any] = {
        "image": str(path),
        "width": int(w),
        "height": int(h),
        "input_size": [int(ih), int(iw)],
    }
    if meta["task"] == "semantic_segmentation":
        logits = TF.interpolate(out["logits"][None], size=(h, w), mode="bilinear", align_corners=False)[0]
        result["mask"] = logits.argmax(0)
        return result
    keep = (out["scores"] >= min_score) & (out["labels"] != 0)  # as evaluated: label 0 (a sigmoid
    # head's background column, RetinaNet/FCOS) is no class, and trials never scored it
    scale = torch.tensor([w / iw, h / ih, w / iw, h / ih])
    boxes = out["boxes"][keep] * scale
    labels, scores = out["labels"][keep], out["scores"][keep]
    result["detections"] = [
        {
            "label": int(lab),
            "class": names[int(lab)] if int(lab) < len(names) else str(int(lab)),
            "category_id": ids[int(lab)] if int(lab) < len(ids) else None,
            "score": float(sc),
            "box": [float(v) for v in box],
        }
        for box, lab, sc in zip(boxes, labels, scores, strict=True)
    ]
    if "masks" in out:
        masks = out["masks"][keep]
        if len(masks):
            masks = TF.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        result["masks"] = [m > 0.5 for m in masks]
    return result
