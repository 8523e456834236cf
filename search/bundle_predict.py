"""Run a deployment bundle on image files (``python -m search predict``): predictions as JSON,
annotated images and mask PNGs."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from search import bundle_load
from search.bundle import META_FILE, BundleError
from search.bundle_load import load_bundle

PREDICTIONS = "predictions.json"

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


def _check_out(out_dir: Path | None) -> list[Path]:
    """``--out`` is new, empty, or an earlier ``predict --out`` (it holds predictions.json): never
    someone's folder whose files an image's outputs could overwrite. Returns the earlier predict's
    image outputs there (its predictions.json lists them), which this one replaces."""
    if out_dir is None or not Path(out_dir).is_dir():
        return []
    earlier = Path(out_dir) / PREDICTIONS
    if not earlier.is_file():
        if any(Path(out_dir).iterdir()):
            raise BundleError(
                f"--out {out_dir} exists and holds files that are not an earlier predict's: "
                "choose a new folder"
            )
        return []
    try:
        entries = json.loads(earlier.read_text())["images"]
        names = {
            Path(f).name
            for e in entries
            for f in [e.get("annotated"), e.get("mask"), *(e.get("masks") or [])]
            if isinstance(f, str)
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise BundleError(
            f"--out {out_dir}: its {PREDICTIONS} is not an earlier predict's (unreadable): "
            "choose a new folder"
        ) from None
    return [Path(out_dir) / n for n in sorted(names) if n.endswith(".png") and (Path(out_dir) / n).is_file()]


def _check_images(images: list[Path]) -> None:
    """Every file is an image PIL can identify (its header only) of at most the project's pixel
    limit, before the model loads."""
    from PIL import Image, UnidentifiedImageError

    from trainables.coco import DatasetError, check_pixels

    for path in images:
        try:
            with Image.open(path) as img:
                check_pixels(*img.size, str(path))
        except DatasetError as exc:
            raise BundleError(str(exc)) from None
        except Image.DecompressionBombError as exc:
            raise BundleError(f"{path}: {exc}") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise BundleError(
                f"{path} is not an image this tool can read ({type(exc).__name__}); pass PNG, JPEG, TIFF "
                "or another format PIL opens"
            ) from None


def _check_device(device: str) -> None:
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise BundleError(
            f"--device: {device!r} is not a torch device. Fix: use cpu, cuda, cuda:N or mps"
        ) from None
    here = torch.cuda.device_count() if kind == "cuda" and torch.cuda.is_available() else 0
    if kind == "cuda" and (torch.device(device).index or 0) >= here:
        raise BundleError(
            f"--device: {device!r} but torch sees {here} CUDA device(s) here. Fix: use --device cpu"
            + (" or cuda:0" if here else "")
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise BundleError(f"--device: {device!r} but torch sees no MPS device here. Fix: use --device cpu")


def predict_files(
    bundle_dir: Path,
    images: list[Path],
    out_dir: Path | None = None,
    min_score: float = 0.3,
    device: str = "cpu",
    key_env: str | None = None,
) -> dict[str, Any]:
    """Run a bundle on image files. Returns the JSON-able result; with ``out_dir`` also writes
    ``predictions.json``, ``<stem>.annotated.png`` per image and masks as PNG
    (``<stem>.mask<k>.png`` per instance, 0/255; ``<stem>.mask.png`` class map for semantic)."""
    bundle_dir = Path(bundle_dir)
    if not (bundle_dir / META_FILE).is_file():
        raise BundleError(
            f"BUNDLE: {bundle_dir} is not a bundle (no {META_FILE}). Fix: pass what 'search export' wrote"
        )
    folders = [str(p) for p in images if Path(p).is_dir()]
    if folders:
        raise BundleError(
            f"IMAGE: {', '.join(folders[:5])}: a folder, not an image file. Fix: pass its files (DIR/*.png)"
        )
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise BundleError(f"IMAGE: file(s) not found: {', '.join(missing[:5])}. Fix: check the paths")
    _check_images(images)
    _check_device(device)
    replaced = _check_out(out_dir)
    try:
        model, meta = load_bundle(bundle_dir, device=device, key_env=key_env)
    except ValueError as exc:
        raise BundleError(str(exc)) from None
    if key_env and not meta.get("encryption"):  # said: a bundle thought encrypted is not
        note = f"note: --key-env {key_env}: {bundle_dir} is not encrypted (the key is not used)"
        print(note, file=sys.stderr)
    stems = _stems(images)
    if out_dir is None:
        results = [
            _predict_one(model, meta, path, stem, min_score, None)
            for path, stem in zip(images, stems, strict=True)
        ]
        return _summary(bundle_dir, meta, min_score, results)
    out_dir = Path(out_dir)
    _check_free(out_dir, [f"{stem}.annotated.png" for stem in stems], replaced)  # before the work
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".predict-", dir=out_dir))
    try:
        outputs = (stage, out_dir.resolve())  # absolute: predictions.json is read from anywhere
        results = [
            _predict_one(model, meta, p, stem, min_score, outputs)
            for p, stem in zip(images, stems, strict=True)
        ]
        out = _summary(bundle_dir, meta, min_score, results)
        (stage / PREDICTIONS).write_text(json.dumps(out, indent=1))
        _commit(stage, out_dir, replaced)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    shutil.rmtree(stage, ignore_errors=True)
    return out


def _stems(images: list[Path]) -> list[str]:
    """Output file stems: the image's, numbered when two images share a stem."""
    unique = len({Path(p).stem for p in images}) == len(images)
    return [Path(p).stem if unique else f"{i:03d}_{Path(p).stem}" for i, p in enumerate(images)]


def _summary(bundle_dir: Path, meta: dict[str, Any], min_score: float, results: list) -> dict[str, Any]:
    return {
        "bundle": str(bundle_dir.resolve()),
        "task": meta["task"],
        "arch": meta["arch"],
        "min_score": min_score,
        "images": results,
    }


def _predict_one(
    model: Any, meta: dict[str, Any], path: Path, stem: str, min_score: float, outputs: tuple | None
) -> dict[str, Any]:
    """One image's entry; with ``outputs = (stage, out_dir)`` its PNGs are written to ``stage`` and
    the entry names them as they will be in ``out_dir``."""
    try:
        r = bundle_load.predict(model, meta, path, min_score=min_score)
    except (OSError, SyntaxError) as exc:  # PIL: a truncated or corrupt image body
        raise BundleError(f"{path}: cannot decode the image ({type(exc).__name__}: {exc})") from None
    entry = {k: r[k] for k in ("image", "width", "height", "input_size")}

    def write(name: str, save: Any, *args: Any) -> str:
        save(*args, outputs[0] / name)
        return str(outputs[1] / name)

    if meta["task"] == "semantic_segmentation":
        mask = r["mask"]
        counts = mask.flatten().bincount(minlength=meta["num_classes"]).tolist()
        names = ["background", *meta["class_names"]]
        entry["pixels"] = {names[k] if k < len(names) else str(k): int(c) for k, c in enumerate(counts) if c}
        if outputs is not None:
            entry["mask"] = write(f"{stem}.mask.png", _save_class_map, mask)
            entry["annotated"] = write(f"{stem}.annotated.png", _annotate_semantic, path, mask)
        return entry
    entry["detections"] = r["detections"]
    if outputs is not None:
        masks = r.get("masks")
        if masks is not None:
            entry["masks"] = [write(f"{stem}.mask{k}.png", _save_binary, m) for k, m in enumerate(masks)]
        entry["annotated"] = write(f"{stem}.annotated.png", _annotate, path, r["detections"], masks)
    return entry


def _check_free(out_dir: Path, names: list[str], replaced: list[Path]) -> None:
    """No output name is taken in ``out_dir`` by something other than an earlier predict's output."""
    ours = {p.name for p in replaced} | {PREDICTIONS}
    foreign = [n for n in names if n not in ours and os.path.lexists(out_dir / n)]
    if foreign:
        raise BundleError(
            f"--out {out_dir}: {foreign[0]} is there and is not listed in its {PREDICTIONS} (not an "
            "earlier predict's output): move it away or choose a new folder"
        )


def _commit(stage: Path, out_dir: Path, replaced: list[Path]) -> None:
    """Move the staged outputs into ``out_dir``: refuse (before moving anything) a name that is
    there and is not an earlier predict's output (a user's file, or a link that could point
    anywhere), then drop the earlier predict's outputs and move ours in (a rename replaces a link
    itself, never what it points at)."""
    names = sorted(p.name for p in stage.iterdir())
    _check_free(out_dir, names, replaced)
    for old in replaced:  # an earlier predict's images: what stays is what predictions.json lists
        old.unlink(missing_ok=True)
    for name in names:
        os.replace(stage / name, out_dir / name)


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
