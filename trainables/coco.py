"""Load and sanitise a COCO split (pure Python + pycocotools + Pillow headers; no torch).

``load_coco`` reads one annotations file and its image root and returns a :class:`CocoIndex`:
category ids mapped to contiguous labels ``1..K`` (background is 0, order = sorted category id),
one :class:`ImageRecord` per image with boxes already clipped, and a ``pycocotools.COCO`` object
holding the same sanitised ground truth for evaluation.

Sanitisation (every count is in ``CocoIndex.stats``, logged once at INFO on ``trainables.data``):

- images without annotations are kept as negatives (``negatives``);
- crowd annotations stay in the record with ``iscrowd=True`` and in the COCO ground truth (COCOeval
  ignores them), but datasets never train on them (``crowd``);
- boxes are clipped to the image (``clipped``); boxes narrower or shorter than 1 px after clipping
  are dropped everywhere (``degenerate``);
- polygon parts with fewer than 3 points are dropped (``bad_polygons``); an annotation without a
  usable segmentation (``no_segmentation``) is dropped for ``instance_segmentation`` and kept for
  ``semantic_segmentation`` (its box marks ignored pixels), where a split with no mask at all is
  refused;
- a missing ``width``/``height`` is read from the image header, after EXIF orientation
  (``size_from_file``).

Anything else that is wrong raises :class:`DatasetError` naming the file (and the image or
annotation id): invalid JSON (with its position), unknown category, duplicate ids, an annotation on
a missing image id, a ``file_name`` outside the image root, a missing image file, a split with no
image or with no usable annotation at all.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, NamedTuple

from trainables import rle
from trainables.files import DatasetError  # (here since the start: importers use coco.DatasetError)

log = logging.getLogger("trainables.data")

TASKS = ("detection", "instance_segmentation", "semantic_segmentation")
MIN_BOX_SIDE = 1.0  # px, after clipping
MAX_PIXELS_ENV = "SEARCH_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 40_000_000
STAT_KEYS = (
    "images",
    "annotations",
    "negatives",
    "crowd",
    "clipped",
    "degenerate",
    "bad_polygons",
    "no_segmentation",
    "size_from_file",
)
_CORE_IMAGE_KEYS = ("id", "file_name", "width", "height")
_EXIF_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
# Dataset summaries already logged by this process: the spec's checks and the trial both read the
# same file, and a first run should show its summary once (a repeat is logged at DEBUG).
_LOGGED: set[tuple[Any, ...]] = set()


class Ann(NamedTuple):
    """One kept annotation: contiguous ``label``, ``box`` (x1, y1, x2, y2) clipped, in pixels."""

    label: int
    box: tuple[float, float, float, float]
    iscrowd: bool
    segmentation: Any | None  # polygons (list), RLE dict (list or str counts), or None


@dataclass
class ImageRecord:
    """One image: ``path`` is absolute; ``width``/``height`` come from the JSON (after EXIF)."""

    id: int
    path: Path
    file_name: str
    width: int
    height: int
    anns: list[Ann] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CocoIndex:
    """A sanitised split. ``label_to_cat[label]`` is the category id of contiguous ``label``."""

    class_names: list[str]
    cat_ids: list[int]
    cat_to_label: dict[int, int]
    label_to_cat: dict[int, int]
    images: list[ImageRecord]
    stats: dict[str, int]
    coco: Any  # pycocotools.coco.COCO built from the sanitised dict
    annotations_path: Path
    task: str = "detection"

    @property
    def num_classes(self) -> int:
        """K + 1 (background included)."""
        return len(self.class_names) + 1

    @cached_property
    def by_id(self) -> dict[int, ImageRecord]:
        """``images`` by image id (built once)."""
        return {r.id: r for r in self.images}


def load_coco(annotations: Path, images: Path, *, task: str = "detection") -> CocoIndex:
    """Read ``annotations`` (COCO JSON) with ``file_name`` relative to ``images``; see module doc."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    annotations = Path(annotations).resolve()
    root = Path(images).resolve()
    data = _read_json(annotations)
    cats = _categories(data, annotations)
    stats: Counter[str] = Counter({k: 0 for k in STAT_KEYS})
    records = _images(data, annotations, root, stats)
    by_id = {r.id: r for r in records}
    cat_to_label = {c: i + 1 for i, c in enumerate(sorted(cats))}
    gt_anns = _annotations(data, annotations, by_id, cat_to_label, task, stats)
    _check_usable(records, annotations, stats, task)
    cat_ids = sorted(cats)
    index = CocoIndex(
        class_names=[cats[c] for c in cat_ids],
        cat_ids=cat_ids,
        cat_to_label=cat_to_label,
        label_to_cat={v: k for k, v in cat_to_label.items()},
        images=records,
        stats=dict(stats),
        coco=_build_coco(data, records, gt_anns, [{"id": c, "name": cats[c]} for c in cat_ids]),
        annotations_path=annotations,
        task=task,
    )
    _log_summary(annotations, index.stats)
    return index


def _log_summary(annotations: Path, stats: dict[str, int]) -> None:
    """The file's sanitisation counts at INFO, shown once per process for the same file and counts
    (a quiet check before the logs are on does not count as shown)."""
    try:
        st = annotations.stat()
        key: tuple[Any, ...] = (str(annotations), st.st_mtime_ns, st.st_size, tuple(stats.items()))
    except OSError:
        key = (str(annotations), tuple(stats.items()))
    level = logging.DEBUG if key in _LOGGED else logging.INFO
    if log.isEnabledFor(logging.INFO):
        _LOGGED.add(key)
    log.log(level, "%s: %s", annotations, " ".join(f"{k}={v}" for k, v in stats.items()))


def summarize(index: CocoIndex) -> dict[str, Any]:
    """Counts for ``validate``: images, trained annotations, per-class counts, negatives."""
    per_class = Counter()
    for rec in index.images:
        per_class.update(index.class_names[a.label - 1] for a in rec.anns if not a.iscrowd)
    return {
        "annotations_file": str(index.annotations_path),
        "images": len(index.images),
        "annotations": sum(per_class.values()),
        "negatives": index.stats.get("negatives", 0),
        "classes": list(index.class_names),
        "per_class": {name: per_class.get(name, 0) for name in index.class_names},
        "sanitised": dict(index.stats),
    }


def segmentation_to_rle(segm: Any, height: int, width: int) -> dict[str, Any]:
    """One RLE for polygons, uncompressed RLE or compressed RLE (pycocotools; merged parts)."""
    from pycocotools import mask as mask_utils

    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if isinstance(segm.get("counts"), list):
        return mask_utils.frPyObjects(segm, height, width)
    counts = segm["counts"]  # compressed: frPyObjects would choke on it, use it as it is
    return {"size": list(segm["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}


def max_pixels() -> int:
    """The largest image this project decodes (width x height): ``SEARCH_MAX_PIXELS`` or 40 MP,
    below PIL's own limit, so a huge image is refused instead of taking gigabytes of memory."""
    try:
        return int(os.environ.get(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS))
    except ValueError:
        return DEFAULT_MAX_PIXELS


def check_pixels(w: int, h: int, where: str) -> None:
    if w * h > max_pixels():
        raise DatasetError(
            f"{where}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels():,} "
            f"(set {MAX_PIXELS_ENV} to allow larger images)"
        )


def image_size_from_file(path: Path) -> tuple[int, int]:
    """(width, height) of an image after EXIF orientation, from its header only."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            w, h = _stored_size(img)
            check_pixels(w, h, str(path))
            # Pillow's PNG getexif() decodes the pixels to look for an eXIf chunk after them (1 ms for
            # 256 px, seconds for a large image): the header's chunks only (one after the pixels is
            # applied when the image is decoded, whose size check then names the file)
            png_without = img.format == "PNG" and "exif" not in img.info
            orientation = 1 if png_without else img.getexif().get(0x0112, 1)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: cannot read image header: {e}") from e
    return (h, w) if orientation in _EXIF_TRANSPOSED else (w, h)


def _stored_size(img: Any) -> tuple[int, int]:
    """(width, height) as stored, before EXIF orientation: Pillow's TIFF reader already reports the
    oriented size in ``img.size`` (and turns the pixels on load), so read its dimension tags."""
    from PIL.TiffImagePlugin import IMAGELENGTH, IMAGEWIDTH

    tags = getattr(img, "tag_v2", None)
    if img.format == "TIFF" and tags is not None and IMAGEWIDTH in tags and IMAGELENGTH in tags:
        return int(tags[IMAGEWIDTH]), int(tags[IMAGELENGTH])
    return img.size


# --- internals ---------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: annotations file not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read annotations file: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{path}: invalid JSON at line {e.lineno} column {e.colno} (char {e.pos}): {e.msg}"
        ) from e
    except (ValueError, RecursionError) as e:  # an integer of more than 4300 digits; deep nesting
        raise DatasetError(f"{path}: cannot read JSON: {str(e).splitlines()[0][:200]}") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: top level must be an object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: '{key}' must be a list")
    return data


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def categories(annotations: Path) -> dict[int, str]:
    """A COCO file's category names by id (label i is the i-th smallest id), checked as by load_coco."""
    return _categories(_read_json(Path(annotations)), Path(annotations))


def _categories(data: dict[str, Any], path: Path) -> dict[int, str]:
    cats: dict[int, str] = {}
    for c in data["categories"]:
        cid = c.get("id") if isinstance(c, dict) else None
        if not _is_int(cid):
            raise DatasetError(f"{path}: category without an integer id: {c!r}")
        if cid in cats:
            raise DatasetError(f"{path}: duplicate category id {cid}")
        cats[cid] = str(c.get("name", cid))
    if not cats:
        raise DatasetError(f"{path}: no categories")
    dup = [n for n, k in Counter(cats.values()).items() if k > 1]
    if dup:
        raise DatasetError(f"{path}: duplicate category names {dup}")
    return cats


def _safe_relpath(file_name: Any, path: Path, image_id: int) -> str:
    if not isinstance(file_name, str) or not file_name:
        raise DatasetError(f"{path}: image id {image_id}: file_name must be a non-empty string")
    posix, win = PurePosixPath(file_name), PureWindowsPath(file_name)
    if posix.is_absolute() or win.is_absolute() or win.drive or ".." in posix.parts or ".." in win.parts:
        raise DatasetError(f"{path}: image id {image_id}: file_name {file_name!r} escapes the image root")
    return file_name


def _images(data: dict[str, Any], path: Path, root: Path, stats: Counter) -> list[ImageRecord]:
    records: list[ImageRecord] = []
    seen: set[int] = set()
    files: dict[Path, int] = {}
    missing: list[str] = []
    for im in data["images"]:
        iid = im.get("id") if isinstance(im, dict) else None
        if not _is_int(iid):
            raise DatasetError(f"{path}: image without an integer id: {str(im)[:200]}")
        if iid in seen:
            raise DatasetError(f"{path}: duplicate image id {iid}")
        seen.add(iid)
        file_name = _safe_relpath(im.get("file_name"), path, iid)
        img_path = root / file_name
        resolved = img_path.resolve()
        if (first := files.setdefault(resolved, iid)) != iid:  # e.g. two COCO files merged
            raise DatasetError(
                f"{path}: image ids {first} and {iid} are the same file {file_name!r}: each would be scored "
                "against part of its objects (and train the rest as background); list it once, with them all"
            )
        if not resolved.is_relative_to(root):  # a symlink out of the image folder
            raise DatasetError(
                f"{path}: image id {iid}: {file_name!r} resolves to {str(resolved)!r}, outside the "
                f"image root {str(root)!r} (symlinks are followed)"
            )
        if not img_path.is_file():
            missing.append(f"{img_path} (image id {iid})")
            continue
        w, h = _image_size(im, img_path, path, stats)
        extra = {k: v for k, v in im.items() if k not in _CORE_IMAGE_KEYS}
        records.append(ImageRecord(iid, img_path, file_name, w, h, [], extra))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DatasetError(f"{path}: missing image file {', '.join(missing[:3])}{more}")
    return records


def _image_size(im: dict[str, Any], img_path: Path, path: Path, stats: Counter) -> tuple[int, int]:
    w, h = im.get("width"), im.get("height")
    if w is None or h is None:
        stats["size_from_file"] += 1
        return image_size_from_file(img_path)
    if not (_is_int(w) and _is_int(h) and w > 0 and h > 0):
        raise DatasetError(f"{path}: image id {im['id']}: width/height must be positive integers")
    check_pixels(w, h, f"{path}: image id {im['id']}")
    return w, h


def _annotations(data, path, by_id, cat_to_label, task, stats) -> list[dict[str, Any]]:
    """Attach kept annotations to their records; return the sanitised COCO ground truth."""
    gt: list[dict[str, Any]] = []
    seen: set[int] = set()
    for raw in data["annotations"]:
        aid = raw.get("id") if isinstance(raw, dict) else None
        if not _is_int(aid):
            raise DatasetError(f"{path}: annotation without an integer id: {str(raw)[:200]}")
        if aid in seen:
            raise DatasetError(f"{path}: duplicate annotation id {aid}")
        seen.add(aid)
        where = f"{path}: annotation id {aid}"
        rec = by_id.get(raw.get("image_id")) if _is_int(raw.get("image_id")) else None
        if rec is None:
            raise DatasetError(f"{where}: points to missing image id {raw.get('image_id')!r}")
        cid = raw.get("category_id")
        if not isinstance(cid, (int, float)) or isinstance(cid, bool) or cid not in cat_to_label:
            raise DatasetError(f"{where}: unknown category id {raw.get('category_id')!r}")
        ann = _sanitise(raw, rec, cat_to_label[raw["category_id"]], task, stats, where)
        if ann is None:
            continue
        rec.anns.append(ann)
        stats["crowd" if ann.iscrowd else "annotations"] += 1
        gt.append(_gt_entry(raw, rec, ann))
    return gt


def _sanitise(raw, rec: ImageRecord, label: int, task: str, stats: Counter, where: str) -> Ann | None:
    crowd = raw.get("iscrowd", 0)
    if crowd not in (0, 1) or isinstance(crowd, float) or (isinstance(crowd, str)):
        raise DatasetError(f"{where}: iscrowd must be 0 or 1, got {str(crowd)[:40]!r}")
    iscrowd = bool(crowd)
    segm = _check_segmentation(raw.get("segmentation"), rec, stats, where)
    if segm is None and task == "instance_segmentation":
        stats["no_segmentation"] += 1
        return None
    bbox = raw.get("bbox")
    if bbox is None and segm is not None:
        from pycocotools import mask as mask_utils

        bbox = mask_utils.toBbox(segmentation_to_rle(segm, rec.height, rec.width)).tolist()
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_finite(v) for v in bbox)):
        raise DatasetError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    box = (
        min(max(x, 0.0), rec.width),
        min(max(y, 0.0), rec.height),
        min(max(x + w, 0.0), rec.width),
        min(max(y + h, 0.0), rec.height),
    )
    if box[2] - box[0] < MIN_BOX_SIDE or box[3] - box[1] < MIN_BOX_SIDE:
        stats["degenerate"] += 1
        return None
    if box != (x, y, x + w, y + h):
        stats["clipped"] += 1
    if segm is None and task == "semantic_segmentation" and not iscrowd:
        stats["no_segmentation"] += 1  # kept: its box marks ignored pixels (data.semantic_mask)
    return Ann(label, box, iscrowd, segm)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_segmentation(segm: Any, rec: ImageRecord, stats: Counter, where: str) -> Any | None:
    """Polygons with >= 3 points, or an RLE of the image's size; None when there is none."""
    if segm is None or segm == [] or segm == {}:
        return None
    if isinstance(segm, list):
        ok = [
            p
            for p in segm
            if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(_finite(v) for v in p)
        ]
        stats["bad_polygons"] += len(segm) - len(ok)
        return ok or None
    if isinstance(segm, dict) and "counts" in segm and isinstance(segm.get("size"), list):
        if segm["size"] != [rec.height, rec.width]:
            raise DatasetError(
                f"{where}: RLE size {segm['size']} differs from image {rec.file_name} "
                f"[height, width] = {[rec.height, rec.width]}"
            )
        counts = segm["counts"]
        if isinstance(counts, list):
            if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != rec.height * rec.width:
                raise DatasetError(
                    f"{where}: uncompressed RLE counts must be non-negative integers summing to height x "
                    f"width = {rec.height * rec.width}, got {len(counts)} counts"
                    + (f" summing to {sum(counts)}" if all(_is_int(c) for c in counts) else "")
                )
            return segm
        if isinstance(counts, (str, bytes)):
            runs = rle.string_counts(counts)
            if runs is None or min(runs, default=0) < 0 or sum(runs) != rec.height * rec.width:
                got = f"{len(runs)} runs summing to {sum(runs)}" if runs else "text that is no COCO RLE"
                raise DatasetError(
                    f"{where}: compressed RLE counts must hold non-negative runs summing to height x width "
                    f"= {rec.height * rec.width} (image {rec.file_name}), got {got}"
                )
            return segm
    raise DatasetError(f"{where}: unsupported segmentation {str(segm)[:120]}")


def _gt_entry(raw: dict[str, Any], rec: ImageRecord, ann: Ann) -> dict[str, Any]:
    x1, y1, x2, y2 = ann.box
    entry = {
        "id": raw["id"],
        "image_id": rec.id,
        "category_id": raw["category_id"],
        "bbox": [x1, y1, x2 - x1, y2 - y1],
        "iscrowd": int(ann.iscrowd),
    }
    if ann.segmentation is not None:
        entry["segmentation"] = ann.segmentation
    area = raw.get("area")
    if not _finite(area) or area <= 0:
        if ann.segmentation is not None:
            from pycocotools import mask as mask_utils

            area = float(mask_utils.area(segmentation_to_rle(ann.segmentation, rec.height, rec.width)))
        else:
            area = (x2 - x1) * (y2 - y1)
    entry["area"] = float(area)
    return entry


def _check_usable(records: list[ImageRecord], path: Path, stats: Counter, task: str) -> None:
    if not records:
        raise DatasetError(f"{path}: the split has no image")
    stats["images"] = len(records)
    stats["negatives"] = sum(1 for r in records if not any(not a.iscrowd for a in r.anns))
    if stats["annotations"] == 0:
        raise DatasetError(
            f"{path}: no usable annotation in {len(records)} images (all negatives after sanitising: "
            f"{dict(stats)})"
        )
    if task == "semantic_segmentation" and stats["no_segmentation"] >= stats["annotations"]:
        raise DatasetError(
            f"{path}: none of its {stats['annotations']} annotations has a segmentation mask, and "
            "semantic_segmentation trains on masks (a box alone only marks ignored pixels): every "
            "pixel would be background or ignored.",
            "give the annotations a 'segmentation' (polygons or RLE), or use task detection.",
        )


def _build_coco(data, records, gt_anns, categories) -> Any:
    from pycocotools.coco import COCO

    images = [{"id": r.id, "file_name": r.file_name, "width": r.width, "height": r.height} for r in records]
    dataset = {
        "info": data.get("info", {}),
        "images": images,
        "annotations": gt_anns,
        "categories": categories,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
    return coco
