"""Run a deployment bundle on image files (``python -m search predict``): predictions as JSON,
annotated images and mask PNGs."""

from __future__ import annotations

import json
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
    """Every file is an image PIL can identify (its header only), before the model loads."""
    from PIL import Image, UnidentifiedImageError

    for path in images:
        try:
            with Image.open(path):
                pass
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
        raise BundleError(f"--device: {device!r} is not a torch device; use cpu, cuda, cuda:N, mps") from None
    here = torch.cuda.device_count() if kind == "cuda" and torch.cuda.is_available() else 0
    if kind == "cuda" and (torch.device(device).index or 0) >= here:
        raise BundleError(
            f"--device: {device!r} but torch sees {here} CUDA device(s) here; use --device cpu"
            + (" or cuda:0" if here else "")
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise BundleError(f"--device: {device!r} but torch sees no MPS device here; use --device cpu")


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
        raise BundleError(f"{bundle_dir} is not a bundle (no {META_FILE}); make one with 'search export'")
    folders = [str(p) for p in images if Path(p).is_dir()]
    if folders:
        raise BundleError(
            f"{', '.join(folders[:5])}: a folder, not an image file; pass the image files (DIR/*.png)"
        )
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise BundleError(f"image file(s) not found: {', '.join(missing[:5])}")
    _check_images(images)
    _check_device(device)
    replaced = _check_out(out_dir)
    try:
        model, meta = load_bundle(bundle_dir, device=device, key_env=key_env)
    except ValueError as exc:
        raise BundleError(str(exc)) from None
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for old in replaced:  # an earlier predict's images: what stays is what predictions.json lists
            old.unlink(missing_ok=True)
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
        (Path(out_dir) / PREDICTIONS).write_text(json.dumps(out, indent=1))
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
