"""Deployment bundles: a trial's best checkpoint -> a self-contained folder, and running one.

:func:`build_bundle` rebuilds the trial's model exactly as the trial did (``TrialConfig`` + the
checkpoint's params through ``trainables.models.build_model``; a trainable-only checkpoint first
gets the base weights file whose sha256 it records), loads the checkpoint and writes::

    weights.pt            the full fine-tuned state_dict (torch.load(weights_only=True))
    model.yaml            arch, builder kwargs, num_classes, class names, preprocessing, the module
                          swaps (activations, frozen BatchNorm), the trial's params (activation and
                          loss choices), study lineage, torchscript outcome, sha256 of each file
    metrics.json          the trial's best metrics and history
    load.py               a copy of search/bundle_load.py: loader + predict, torch/torchvision only
    model.torchscript.pt  torch.jit.script of the model when it scripts and matches the eager model
    SHA256SUMS            sha256 of every other file (``sha256sum -c`` format)

Before writing, the bundle's own loader (plain torchvision builder + recorded swaps + strict
load) is checked to reproduce the trial model's outputs on validation images; TorchScript is
compared with the eager model the same way, and a failure is recorded in model.yaml, not raised.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from search import bundle_load
from search.bundle_load import FORMAT, load_bundle, sha256_file, verify  # noqa: F401 - public API
from trainables.files import plain

log = logging.getLogger(__name__)

WEIGHTS_FILE, META_FILE, METRICS_FILE, LOADER_FILE, TS_FILE, SUMS_FILE = (
    "weights.pt",
    "model.yaml",
    "metrics.json",
    "load.py",
    "model.torchscript.pt",
    "SHA256SUMS",
)
MATCH_ATOL = 1e-4  # max abs difference allowed between the eager model and its rebuild / TorchScript
CHECK_IMAGES = 2


class BundleError(ValueError):
    """A bundle that cannot be made or used (user-facing, one line)."""


# ---------------------------------------------------------------- the trial's model


def trial_model(cfg: Any, ckpt_path: Path, num_classes: int) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(model in eval mode, checkpoint dict, build info): the trial's model at the checkpoint."""
    from trainables import checkpoint, models, weights
    from trainables import params as P
    from trainables.families import SEMANTIC, family_of

    ckpt = checkpoint.load(ckpt_path)
    params = P.resolve(dict(ckpt.get("params") or {}))
    state = ckpt["model"]
    if ckpt.get("trainable_only") and (cfg.weights or cfg.weights_backbone):
        recorded = ckpt.get("base_sha256")
        if cfg.weights and Path(cfg.weights).is_file() and recorded:
            actual = sha256_file(cfg.weights)
            if actual != recorded:
                raise BundleError(
                    f"the checkpoint {ckpt_path} was trained from base weights with sha256 "
                    f"{recorded[:12]}..., but {cfg.weights} now has {actual[:12]}...: restore that "
                    "file to rebuild the frozen part"
                )
        model, info = models.build_model(cfg, params, num_classes)
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise BundleError(f"checkpoint keys not in the model: {result.unexpected_keys[:5]}")
    else:
        kwargs = dict(cfg.model_kwargs)
        fam = family_of(cfg.arch)
        if fam is not None and fam.task == SEMANTIC and any(k.startswith("aux_classifier.") for k in state):
            kwargs.setdefault("aux_loss", True)
        plain = dataclasses.replace(cfg, weights=None, weights_backbone=None, model_kwargs=kwargs)
        model, info = models.build_model(plain, params, num_classes)
        weights.frozen_bn_like_file(model, state)  # full states saved from FrozenBatchNorm2d layers
        model.load_state_dict(state, strict=True)
    model.eval()
    return model, ckpt, info


def describe_structure(model: Any, arch: str, num_classes: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """What distinguishes ``model`` from the plain builder's: frozen BatchNorm layers, swapped
    activations, and (warnings) any other module of a different, non-subclass type."""
    import torch
    from torchvision.ops.misc import FrozenBatchNorm2d

    from trainables.models import skeleton

    plain = skeleton(arch, num_classes, kwargs)  # what the bundle's loader builds, on the meta device
    plain_modules = dict(plain.named_modules())
    frozen, swaps, odd = {}, {}, []
    for path, module in model.named_modules():
        ref = plain_modules.get(path)
        if ref is None or type(module) is type(ref):
            continue
        if isinstance(module, FrozenBatchNorm2d) and isinstance(ref, torch.nn.BatchNorm2d):
            frozen[path] = {"eps": float(module.eps)}
        elif type(module).__name__ in bundle_load.ACTIVATIONS and type(module) is getattr(
            torch.nn, type(module).__name__
        ):
            swaps[path] = {"type": type(module).__name__, "kwargs": _activation_kwargs(module)}
        elif not isinstance(module, type(ref)):
            odd.append(f"{path}: {type(ref).__name__} -> {type(module).__name__}")
    return {"frozen_batchnorm": frozen, "module_swaps": swaps, "unrecorded_changes": odd}


def _activation_kwargs(module: Any) -> dict[str, Any]:
    name = type(module).__name__
    if name == "LeakyReLU":
        return {"negative_slope": float(module.negative_slope)}
    if name == "ELU":
        return {"alpha": float(module.alpha)}
    if name == "GELU":
        return {"approximate": str(module.approximate)}
    return {}


# ---------------------------------------------------------------- checks


def sample_inputs(cfg: Any, n: int = CHECK_IMAGES) -> list[Any]:
    """The first ``n`` validation images, preprocessed by the bundle's own ``preprocess``."""
    from trainables import coco

    index = coco.load_coco(cfg.val.annotations, cfg.val.images, task=cfg.task)
    meta = {"preprocessing": preprocessing(cfg)}
    return [bundle_load.preprocess(bundle_load.read_image(rec.path), meta) for rec in index.images[:n]]


def preprocessing(cfg: Any) -> dict[str, Any]:
    semantic = cfg.task == "semantic_segmentation"
    pre: dict[str, Any] = {
        "image_size": int(cfg.image_size),
        "resize": "square" if semantic else "long_side",
        "color": "RGB",
        "scale": "1/255 (8-bit), 1/65535 (16-bit grayscale); EXIF orientation applied",
        "antialias": True,
    }
    if semantic:
        pre |= {"mean": list(bundle_load.IMAGENET_MEAN), "std": list(bundle_load.IMAGENET_STD)}
    else:
        pre["normalize"] = "inside the model (torchvision detection transform)"
    return pre


def _flat_outputs(outputs: Any, task: str) -> list[Any]:
    """Tensors of model outputs in a fixed order (detection lists of dicts, semantic dicts)."""
    import torch

    if isinstance(outputs, tuple) and len(outputs) == 2 and isinstance(outputs[1], list):
        outputs = outputs[1]  # scripted torchvision detection models return (losses, detections)
    if isinstance(outputs, dict):
        return [outputs["out"]]
    flat = []
    for o in outputs:
        for k in sorted(o):
            flat.append(o[k].float() if torch.is_tensor(o[k]) else torch.tensor(o[k]))
    return flat


def max_difference(a: Any, b: Any, task: str) -> float:
    """Largest absolute difference between two models' outputs (inf when shapes differ)."""
    fa, fb = _flat_outputs(a, task), _flat_outputs(b, task)
    if len(fa) != len(fb):
        return float("inf")
    worst = 0.0
    for x, y in zip(fa, fb, strict=True):
        if x.shape != y.shape:
            return float("inf")
        if x.numel():
            worst = max(worst, float((x.float() - y.float()).abs().max()))
    return worst


def _forward(model: Any, inputs: list[Any], task: str) -> Any:
    import torch

    with torch.inference_mode():
        if task == "semantic_segmentation":
            mean = torch.tensor(bundle_load.IMAGENET_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(bundle_load.IMAGENET_STD).view(1, 3, 1, 1)
            return model((torch.stack(inputs) - mean) / std)
        return model(list(inputs))


def _torchscript(model: Any, inputs: list[Any], task: str, eager_out: Any, path: Path) -> dict[str, Any]:
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scripted = torch.jit.script(model)
            scripted_out = _forward(scripted, inputs, task)
    except Exception as exc:  # noqa: BLE001 - recorded in model.yaml: TorchScript is optional
        first = " ".join(str(exc).split())[:300]
        return {"ok": False, "error": f"{type(exc).__name__}: {first}"}
    diff = max_difference(eager_out, scripted_out, task)
    if diff > MATCH_ATOL:
        return {
            "ok": False,
            "error": f"scripted outputs differ from the eager model by {diff:.3g}",
            "max_abs_diff": diff,
        }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted.save(str(path))
    return {
        "ok": True,
        "file": TS_FILE,
        "max_abs_diff": diff,
        "checked_images": len(inputs),
        "returns": "(losses, detections)" if task != "semantic_segmentation" else "{'out': logits}",
    }


# ---------------------------------------------------------------- building


def _model_yaml(
    cfg: Any, ckpt_path: Path, ckpt: dict, info: dict, model: Any, class_names: list[str], study: dict | None
) -> dict[str, Any]:
    """The content of ``model.yaml`` (before the rebuild check and the files)."""
    num_classes = len(class_names) + 1
    kwargs = dict(cfg.model_kwargs)
    if getattr(model, "aux_classifier", None) is not None:
        kwargs["aux_loss"] = True
    structure = describe_structure(model, cfg.arch, num_classes, kwargs)
    params = dict(ckpt.get("params") or {})
    meta: dict[str, Any] = {
        "format": FORMAT,
        "builder": "search" if "compose" in kwargs else "torchvision",
        "task": cfg.task,
        "arch": cfg.arch,
        "builder_kwargs": kwargs,
        "num_classes": num_classes,
        "class_names": list(class_names),
        "labels": "0 = background; label i = class_names[i - 1]"
        if cfg.task != "semantic_segmentation"
        else "mask value 0 = background; value i = class_names[i - 1]",
        "preprocessing": preprocessing(cfg),
        "weights_file": WEIGHTS_FILE,
        "frozen_batchnorm": structure["frozen_batchnorm"],
        "module_swaps": structure["module_swaps"],
        "choices": {
            "activation": params.get("activation"),
            "activation_scope": params.get("activation_scope"),
            "losses": info.get("losses"),
            "trainable": params.get("trainable"),
        },
        "params": params,
        "checkpoint": {
            "path": str(ckpt_path),
            "epoch": ckpt.get("epoch"),
            "base_sha256": ckpt.get("base_sha256"),
            "trainable_only": bool(ckpt.get("trainable_only")),
        },
        "base_weights": {"source": info.get("weights"), "sha256": info.get("sha256")},
        "study": dict(study or {}),
        "metrics": dict(ckpt.get("metrics") or {}),
    }
    if structure["unrecorded_changes"]:
        meta["warnings"] = structure["unrecorded_changes"]
    return meta


def _rebuild_checked(cfg: Any, model: Any, meta: dict[str, Any]) -> tuple[Any, list, Any]:
    """The model rebuilt by the bundle's own loader from ``meta``, checked to reproduce the trial
    model's outputs on sample images; returns (rebuilt, inputs, eager outputs)."""
    rebuilt = bundle_load.build(meta)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    rebuilt.eval()
    inputs = sample_inputs(cfg)
    eager = _forward(model, inputs, cfg.task)
    diff = max_difference(eager, _forward(rebuilt, inputs, cfg.task), cfg.task)
    if diff > MATCH_ATOL:
        raise BundleError(
            f"the bundle's loader does not reproduce the trial model (outputs differ by {diff:.3g}); "
            f"unrecorded changes: {meta.get('warnings') or 'none'}"
        )
    meta["rebuild_check"] = {"max_abs_diff": diff, "checked_images": len(inputs)}
    return rebuilt, inputs, eager


def _write_files(tmp: Path, rebuilt: Any, meta: dict[str, Any], study: dict | None, ts: Any) -> None:
    """The bundle's files in ``tmp``: weights, TorchScript (``ts``: a callable or None), loader,
    metrics, ``model.yaml`` (with every file's sha256) and ``SHA256SUMS``."""
    import torch
    import yaml

    torch.save(rebuilt.state_dict(), tmp / WEIGHTS_FILE)
    meta["torchscript"] = ts(tmp / TS_FILE) if ts else {"ok": False, "error": "skipped (--no-torchscript)"}
    meta["onnx"] = (
        "not exported: torchvision detection models need a traced, fixed-size variant; use TorchScript"
    )
    shutil.copyfile(Path(bundle_load.__file__), tmp / LOADER_FILE)
    kept = ("metric", "mode", "best_metric", "best_epoch", "base_metric", "improvement", "history")
    metrics = {
        "metrics_at_checkpoint": meta["metrics"],
        **{k: v for k, v in (study or {}).items() if k in kept},
    }
    (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=1, default=str))
    meta["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / META_FILE).write_text(yaml.safe_dump(plain(meta), sort_keys=False))
    sums = [f"{sha256_file(p)}  {p.name}" for p in sorted(tmp.iterdir()) if p.is_file()]
    (tmp / SUMS_FILE).write_text("\n".join(sums) + "\n")


def build_bundle(
    cfg: Any,
    ckpt_path: Path,
    class_names: list[str],
    out_dir: Path,
    study: dict[str, Any] | None = None,
    torchscript: bool = True,
) -> dict[str, Any]:
    """Write the bundle of ``ckpt_path`` (a trial checkpoint of ``cfg``) into ``out_dir`` (must
    not exist or be empty; written whole or not at all); returns the model.yaml content."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise BundleError(f"--out {out_dir} exists and is not empty: choose a new folder")
    model, ckpt, info = trial_model(cfg, Path(ckpt_path), len(class_names) + 1)
    meta = _model_yaml(cfg, Path(ckpt_path), ckpt, info, model, class_names, study)
    rebuilt, inputs, eager = _rebuild_checked(cfg, model, meta)

    def ts(path: Path) -> dict[str, Any]:
        return _torchscript(rebuilt, inputs, cfg.task, eager, path)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _write_files(tmp, rebuilt, meta, study, ts if torchscript else None)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


# ---------------------------------------------------------------- predict


PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
]


def predict_files(
    bundle_dir: Path,
    images: list[Path],
    out_dir: Path | None = None,
    min_score: float = 0.3,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run a bundle on image files. Returns the JSON-able result; with ``out_dir`` also writes
    ``predictions.json``, ``<stem>.annotated.png`` per image and masks as PNG
    (``<stem>.mask<k>.png`` per instance, 0/255; ``<stem>.mask.png`` class map for semantic)."""
    bundle_dir = Path(bundle_dir)
    if not (bundle_dir / META_FILE).is_file():
        raise BundleError(f"{bundle_dir} is not a bundle (no {META_FILE}); make one with 'search export'")
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise BundleError(f"image file(s) not found: {', '.join(missing[:5])}")
    try:
        model, meta = load_bundle(bundle_dir, device=device)
    except ValueError as exc:
        raise BundleError(str(exc)) from None
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    results = []
    for i, path in enumerate(images):
        r = bundle_load.predict(model, meta, path, min_score=min_score)
        entry = {k: r[k] for k in ("image", "width", "height", "input_size")}
        stem = (
            f"{i:03d}_{Path(path).stem}"
            if len({Path(p).stem for p in images}) < len(images)
            else Path(path).stem
        )
        if meta["task"] == "semantic_segmentation":
            mask = r["mask"]
            counts = mask.flatten().bincount(minlength=meta["num_classes"]).tolist()
            names = ["background", *meta["class_names"]]
            entry["pixels"] = {
                names[k] if k < len(names) else str(k): int(c) for k, c in enumerate(counts) if c
            }
            if out_dir is not None:
                entry["mask"] = str(_save_class_map(mask, Path(out_dir) / f"{stem}.mask.png"))
                entry["annotated"] = str(
                    _annotate_semantic(path, mask, Path(out_dir) / f"{stem}.annotated.png")
                )
        else:
            entry["detections"] = r["detections"]
            if out_dir is not None:
                masks = r.get("masks")
                if masks is not None:
                    entry["masks"] = [
                        str(_save_binary(m, Path(out_dir) / f"{stem}.mask{k}.png"))
                        for k, m in enumerate(masks)
                    ]
                entry["annotated"] = str(
                    _annotate(path, r["detections"], masks, Path(out_dir) / f"{stem}.annotated.png")
                )
        results.append(entry)
    out = {
        "bundle": str(bundle_dir.resolve()),
        "task": meta["task"],
        "arch": meta["arch"],
        "min_score": min_score,
        "images": results,
    }
    if out_dir is not None:
        (Path(out_dir) / "predictions.json").write_text(json.dumps(out, indent=1))
    return out


def _save_binary(mask: Any, path: Path) -> Path:
    from PIL import Image

    Image.fromarray((mask.numpy().astype("uint8") * 255), mode="L").save(path)
    return path


def _save_class_map(mask: Any, path: Path) -> Path:
    from PIL import Image

    img = Image.fromarray(mask.numpy().astype("uint8"), mode="P")
    flat = [0, 0, 0] + [c for colour in PALETTE * 26 for c in colour]
    img.putpalette(flat[: 256 * 3])
    img.save(path)
    return path


def _annotate(path: Path, detections: list[dict[str, Any]], masks: Any, out: Path) -> Path:
    import numpy as np
    from PIL import Image, ImageDraw

    img = Image.fromarray((bundle_load.read_image(path).permute(1, 2, 0).numpy() * 255).astype("uint8"))
    if masks is not None and len(masks):
        arr = np.asarray(img).astype(np.float32)
        for det, m in zip(detections, masks, strict=True):
            colour = np.array(PALETTE[det["label"] % len(PALETTE)], dtype=np.float32)
            sel = m.numpy()
            arr[sel] = 0.55 * arr[sel] + 0.45 * colour
        img = Image.fromarray(arr.astype("uint8"))
    draw = ImageDraw.Draw(img)
    for det in detections:
        colour = PALETTE[det["label"] % len(PALETTE)]
        x1, y1, x2, y2 = det["box"]
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        draw.text((x1 + 2, max(0, y1 - 11)), f"{det['class']} {det['score']:.2f}", fill=colour)
    img.save(out)
    return out


def _annotate_semantic(path: Path, mask: Any, out: Path) -> Path:
    import numpy as np
    from PIL import Image

    base = (bundle_load.read_image(path).permute(1, 2, 0).numpy() * 255).astype(np.float32)
    lut = np.array([(0, 0, 0)] + PALETTE * 26, dtype=np.float32)[:256]
    m = mask.numpy().astype(np.int64)
    colour = lut[m]
    sel = m > 0
    base[sel] = 0.55 * base[sel] + 0.45 * colour[sel]
    Image.fromarray(base.astype("uint8")).save(out)
    return out
