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

import contextlib
import dataclasses
import errno
import io
import json
import logging
import os
import secrets
import shutil
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
        _check_base_files(cfg, ckpt_path, recorded)
        if cfg.weights and Path(cfg.weights).is_file() and recorded:
            actual = sha256_file(cfg.weights)
            if actual != recorded:
                raise BundleError(
                    f"the checkpoint {ckpt_path} was trained from base weights with sha256 "
                    f"{recorded[:12]}..., but {cfg.weights} now has {actual[:12]}...: restore that "
                    "file to rebuild the frozen part"
                )
        model, info = models.build_model(cfg, params, num_classes)
        _check_shapes(model, state, num_classes)
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
        _check_shapes(model, state, num_classes)
        model.load_state_dict(state, strict=True)
    model.eval()
    return model, ckpt, info


def _check_base_files(cfg: Any, ckpt_path: Path, recorded: str | None) -> None:
    """A checkpoint of the trained tensors alone takes its frozen part from the base weights file
    (a study's saved spec is not refused for a missing one: a full checkpoint needs none)."""
    from search.spec.schema import is_registry_uri
    from trainables.weights import is_enum_name

    for key, value in (("weights", cfg.weights), ("weights_backbone", cfg.weights_backbone)):
        named = value and not is_enum_name(str(value)) and not is_registry_uri(str(value))
        if named and not Path(value).is_file():
            sha = f" (sha256 {recorded[:12]}...)" if recorded and key == "weights" else ""
            raise BundleError(
                f"the checkpoint {ckpt_path} holds only the trained tensors; the rest comes from the base "
                f"weights file {value}{sha} (model.{key}), which is not there. Fix: put that file back"
            )


def _check_shapes(model: Any, state: dict[str, Any], num_classes: int) -> None:
    """The checkpoint's tensors fit the model built for the study's classes (a class list that is
    not the one the model learnt failed in torch's "size mismatch" text)."""
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if wrong:
        raise BundleError(
            f"the checkpoint's {wrong[0]} (and {len(wrong) - 1} more) do not fit a model of "
            f"{num_classes - 1} classes: the class list (facts.json, or the annotation files) is not "
            "the one its model learnt"
        )


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


def sample_inputs(cfg: Any, n: int = CHECK_IMAGES) -> tuple[list[Any], str]:
    """The images the bundle's checks run, preprocessed by its own ``preprocess``, and what they
    are: the first ``n`` validation images, or, when the study's data is not here (a study copied
    without it), ``n`` seeded noise images at the image size, square and 4:3."""
    import torch

    from trainables import coco

    meta = {"preprocessing": preprocessing(cfg)}
    if Path(cfg.val.annotations).is_file() and Path(cfg.val.images).is_dir():
        index = coco.load_coco(cfg.val.annotations, cfg.val.images, task=cfg.task)
        images = [bundle_load.read_image(rec.path) for rec in index.images[:n]]
        what = f"the first {len(images)} validation images"
    else:  # not here (a study copied without its data): a broken file is still an error
        gen, size = torch.Generator().manual_seed(0), int(cfg.image_size)
        images = [torch.rand(3, size * (3 + i % 2) // 4, size, generator=gen) for i in range(1, n + 1)]
        what = f"{n} noise images (the study's validation images are not here)"
    return [bundle_load.preprocess(image, meta) for image in images], what


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
    buf = io.BytesIO()  # written by Python: torch's writer on a full disk aborted the process
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(scripted, buf)
    path.write_bytes(buf.getvalue())
    return {
        "ok": True,
        "file": TS_FILE,
        "max_abs_diff": diff,
        "checked_images": len(inputs),
        "returns": "(losses, detections)" if task != "semantic_segmentation" else "{'out': logits}",
    }


# ---------------------------------------------------------------- building


def _model_yaml(
    cfg: Any,
    ckpt_path: Path,
    ckpt: dict,
    info: dict,
    model: Any,
    classes: tuple[list[str], list[int] | None],
    study: dict | None,
) -> dict[str, Any]:
    """The content of ``model.yaml`` (before the rebuild check and the files)."""
    from trainables import models
    from trainables import params as P

    class_names, category_ids = classes
    unit = "label" if cfg.task != "semantic_segmentation" else "mask value"
    num_classes = len(class_names) + 1
    kwargs = models.inference_kwargs(cfg)  # with the input size the trial's model was built with
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
        **({"category_ids": list(category_ids)} if category_ids else {}),
        "labels": f"{unit} 0 = background; {unit} i = class_names[i - 1]"
        + (", whose COCO category id is category_ids[i - 1]" if category_ids else ""),
        "preprocessing": preprocessing(cfg),
        "weights_file": WEIGHTS_FILE,
        "frozen_batchnorm": structure["frozen_batchnorm"],
        "module_swaps": structure["module_swaps"],
        "choices": {
            "activation": params.get("activation"),
            "activation_scope": params.get("activation_scope"),
            "losses": info.get("losses")
            if cfg.task != "semantic_segmentation"  # box/cls losses: detection heads only
            else {k: v for k, v in params.items() if k.startswith("loss.")},
            "trainable": params.get("trainable"),
        },
        "params": P.in_effect(params, cfg.task, cfg.arch),  # what acted on this model
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
    inputs, what = sample_inputs(cfg)
    eager = _forward(model, inputs, cfg.task)
    diff = max_difference(eager, _forward(rebuilt, inputs, cfg.task), cfg.task)
    if diff > MATCH_ATOL:
        raise BundleError(
            f"the bundle's loader does not reproduce the trial model (outputs differ by {diff:.3g}); "
            f"unrecorded changes: {meta.get('warnings') or 'none'}"
        )
    meta["rebuild_check"] = {"max_abs_diff": diff, "checked_images": len(inputs), "images": what}
    return rebuilt, inputs, eager


def _write_weights(tmp: Path, rebuilt: Any, meta: dict[str, Any], key_env: str | None) -> None:
    """``weights.pt``, or with ``key_env`` ``weights.pt.enc`` (AES-256-GCM, see bundle_load)."""
    from trainables.checkpoint import save_state  # a full disk: its OSError, not torch's text

    if key_env is None:
        with open(tmp / WEIGHTS_FILE, "wb") as f:
            save_state(rebuilt.state_dict(), f)
        return
    buf = io.BytesIO()
    save_state(rebuilt.state_dict(), buf)
    try:
        data, meta["encryption"] = bundle_load.encrypt_weights(buf.getvalue(), key_env)
    except ValueError as exc:
        raise BundleError(str(exc)) from None
    meta["weights_file"] = WEIGHTS_FILE + ".enc"
    (tmp / meta["weights_file"]).write_bytes(data)


def _write_files(
    tmp: Path, rebuilt: Any, meta: dict[str, Any], study: dict | None, ts: Any, key_env: str | None = None
) -> None:
    """The bundle's files in ``tmp``: weights (encrypted under ``key_env``'s secret when given),
    TorchScript (``ts``: a callable or None), loader, metrics, ``model.yaml`` (with every file's
    sha256) and ``SHA256SUMS``."""
    import yaml

    _write_weights(tmp, rebuilt, meta, key_env)
    if key_env is not None:  # a scripted model carries its weights in the clear
        skipped = "skipped (--encrypt: TorchScript would hold the weights)"
    else:
        skipped = None if ts else "skipped (--no-torchscript)"
    meta["torchscript"] = ts(tmp / TS_FILE) if skipped is None else {"ok": False, "error": skipped}
    meta["onnx"] = (
        "not exported: torchvision detection models need a traced, fixed-size variant; use TorchScript"
        if meta["task"] != "semantic_segmentation"
        else "not exported (this tool exports TorchScript only); use TorchScript"
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


def _new_folder(parent: Path, prefix: str) -> Path:
    """A new folder in ``parent`` with the umask's mode: mkdtemp's 0700 left a bundle that only
    its maker could read."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        with contextlib.suppress(FileExistsError):
            path.mkdir()
            return path


def build_bundle(
    cfg: Any,
    ckpt_path: Path,
    class_names: list[str],
    out_dir: Path,
    study: dict[str, Any] | None = None,
    torchscript: bool = True,
    key_env: str | None = None,
    category_ids: list[int] | None = None,
) -> dict[str, Any]:
    """Write the bundle of ``ckpt_path`` (a trial checkpoint of ``cfg``) into ``out_dir`` (must
    not exist or be empty; written whole or not at all); returns the model.yaml content.
    ``key_env``: encrypt the weights under the secret in this environment variable; ``category_ids``:
    the dataset's COCO category id of each class (recorded, and given with each prediction)."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink():  # a link to a folder: the bundle goes there (replacing the link's
        out_dir = out_dir.resolve()  # target, not the link, by the rename below)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise BundleError(f"--out {out_dir} exists and is not empty. Fix: choose a new folder")
    model, ckpt, info = trial_model(cfg, Path(ckpt_path), len(class_names) + 1)
    if category_ids is not None and len(category_ids) != len(class_names):
        raise BundleError(f"{len(category_ids)} category ids for {len(class_names)} classes")
    meta = _model_yaml(cfg, Path(ckpt_path), ckpt, info, model, (class_names, category_ids), study)
    rebuilt, inputs, eager = _rebuild_checked(cfg, model, meta)

    def ts(path: Path) -> dict[str, Any]:
        return _torchscript(rebuilt, inputs, cfg.task, eager, path)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_folder(out_dir.parent, f".{out_dir.name}.")
    try:
        _write_files(tmp, rebuilt, meta, study, ts if torchscript else None, key_env)
        try:
            if out_dir.exists():
                out_dir.rmdir()
            os.replace(tmp, out_dir)
        except OSError as exc:  # another export filled it meanwhile
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            why = f"--out {out_dir} was filled by another process meanwhile. Fix: choose a new folder"
            raise BundleError(why) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta
