"""Bad datasets and bad weight/checkpoint files through the CLI (``python -m search validate`` and
``trial``): each kind is either handled as documented, with its count in the log, or refused
with a message naming the file.

Refused by ``validate`` (exit 2, one line naming the annotations or image file): missing image file,
truncated JSON, non-UTF-8 JSON, duplicate image/annotation ids, unknown category id, annotation
on a missing image, non-finite box, bad width, empty split, no usable annotation, file_name
escaping the image root (relative and absolute), an image too large to decode (header only);
without ``--quick``, which reads every image's header: corrupt bytes, a size that differs from the
JSON, an image too large to decode. Refused by ``trial`` when decoding (exit 1, the image file
named): pixels cut short after a sound header.
Handled (one ``trial`` over one dataset holding all of them, exit 0): box partly outside the image
(clipped), box fully outside and zero-area box (degenerate), crowd, negative image, missing
width/height (read from the header), grayscale / RGBA / palette / 16-bit PNGs (converted to RGB),
a large image (resized), odd and non-UTF-8 file names; each count is checked in the log.
All CLI cases run in ONE child process (``tests.faults.cli_batch``).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.faults.common import run_batch

CATS = [{"id": 3, "name": "red"}, {"id": 7, "name": "blue"}]


def _png(path: Path, size=(64, 64), mode="RGB") -> None:
    w, h = size
    if mode == "I;16":
        Image.fromarray(np.full((h, w), 40000, dtype=np.uint16)).save(path)
    elif mode == "P":
        Image.new("RGB", size, (200, 30, 30)).convert("P").save(path)
    else:
        colour = {"RGB": (200, 30, 30), "L": 120, "RGBA": (30, 30, 200, 128)}[mode]
        Image.new(mode, size, colour).save(path)


def _bomb_png(path: Path, w: int = 20000, h: int = 20000) -> None:
    """A small file whose PNG header claims w x h pixels (PIL refuses it as a decompression bomb)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _ann(aid, image_id, bbox, cat=3, **kw):
    return {
        "id": aid,
        "image_id": image_id,
        "category_id": cat,
        "bbox": bbox,
        "iscrowd": 0,
        "area": float(bbox[2] * bbox[3]),
        **kw,
    }


def base_split(folder: Path) -> tuple[dict, Path]:
    """Four 64 px RGB images, three annotated; returns (COCO dict, image root)."""
    root = folder / "images"
    root.mkdir(parents=True)
    images, anns = [], []
    for i in range(4):
        name = f"img_{i}.png"
        _png(root / name)
        images.append({"id": i + 1, "file_name": name, "width": 64, "height": 64})
        if i < 3:
            anns.append(_ann(i + 1, i + 1, [8, 8, 24 + 4 * i, 20], cat=CATS[i % 2]["id"]))
    return {"images": images, "annotations": anns, "categories": CATS}, root


def _set(d: dict, fn) -> dict:
    fn(d)
    return d


# (id, change(coco dict, image root, folder), text in the message, the file named: "json" | "image:<name>")
REFUSED_BY_VALIDATE = [
    (
        "missing-image-file",
        lambda d, r, f: d["images"][1].update(file_name="gone.png"),
        "missing image file",
        "image:gone.png",
    ),
    ("truncated-json", None, "invalid JSON at line", "json"),
    ("non-utf8-json", None, "cannot read annotations file", "json"),
    ("duplicate-image-id", lambda d, r, f: d["images"][1].update(id=1), "duplicate image id 1", "json"),
    (
        "duplicate-annotation-id",
        lambda d, r, f: d["annotations"][1].update(id=1),
        "duplicate annotation id 1",
        "json",
    ),
    (
        "unknown-category-id",
        lambda d, r, f: d["annotations"][0].update(category_id=99),
        "unknown category id 99",
        "json",
    ),
    (
        "annotation-on-missing-image",
        lambda d, r, f: d["annotations"][0].update(image_id=42),
        "missing image id 42",
        "json",
    ),
    (
        "box-not-finite",
        lambda d, r, f: d["annotations"][0].update(bbox=[1, 2, "NaN", 4]),
        "bbox must be 4 finite numbers",
        "json",
    ),
    (
        "width-not-positive",
        lambda d, r, f: d["images"][0].update(width=0),
        "width/height must be positive",
        "json",
    ),
    ("empty-split", lambda d, r, f: d.update(images=[], annotations=[]), "the split has no image", "json"),
    (
        "no-usable-annotation",
        lambda d, r, f: [a.update(bbox=[10, 10, 0, 5]) for a in d["annotations"]],
        "no usable annotation",
        "json",
    ),
    (
        "file-name-escapes-root",
        lambda d, r, f: d["images"][0].update(file_name="../../../etc/passwd"),
        "escapes the image root",
        "json",
    ),
    (
        "file-name-absolute",
        lambda d, r, f: d["images"][0].update(file_name="/etc/hostname"),
        "escapes the image root",
        "json",
    ),
    (
        "huge-image-header",
        lambda d, r, f: (
            _bomb_png(r / "huge.png"),
            d["images"][0].update(file_name="huge.png", width=None, height=None),
        ),
        "decompression bomb",
        "image:huge.png",
    ),
    (
        "huge-image-declared",  # the JSON itself declares 400 MP
        lambda d, r, f: (_bomb_png(r / "img_1.png"), d["images"][1].update(width=20000, height=20000)),
        "exceeds the limit of 40,000,000",
        "json",
    ),
]

# refused by validate without --quick (and so by trial and launch), which reads every image's header
REFUSED_BY_HEADERS = [
    (
        "corrupt-image-bytes",
        lambda d, r, f: (r / "img_1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 40),
        "cannot read image header",
        "image:img_1.png",
    ),
    (
        "size-differs-from-json",
        lambda d, r, f: _png(r / "img_1.png", size=(80, 64)),
        "header says 80x64",
        "image:img_1.png",
    ),
    (
        # 64 MP: under PIL's own limit (89 MP), over this project's 40 MP cap; the JSON says 100x100
        "huge-image-decoded",
        lambda d, r, f: _bomb_png(r / "img_1.png", 8000, 8000),
        "exceeds the limit of 40,000,000",
        "image:img_1.png",
    ),
]
REFUSED_BY_TRIAL = [
    (  # a sound header, then the pixels cut short: only decoding finds it
        "truncated-pixels",
        lambda d, r, f: (r / "img_1.png").write_bytes((r / "img_1.png").read_bytes()[:80]),
        "cannot decode image",
        "image:img_1.png",
    ),
]

RAW_NAME = os.fsdecode(b"raw_\xff\xfe.png")  # not UTF-8 on disk (a surrogate-escaped str here)
ODD_NAME = "ünï cödé #1 (copy) 空白.png"

# the handled dataset: (kind, regex that must match in the trial's log)
HANDLED = [
    ("box-partly-outside-clipped", r"clipped=1\b"),
    ("box-outside-and-zero-area-dropped", r"degenerate=2\b"),
    ("crowd-kept-out-of-training", r"crowd=1\b"),
    ("negative-image-kept", r"negatives=1\b"),
    ("size-read-from-header", r"size_from_file=1\b"),
    ("grayscale-png", r"images decoded as RGB from other modes: .*\bL=1\b"),
    ("rgba-png", r"images decoded as RGB from other modes: .*\bRGBA=1\b"),
    ("palette-png", r"images decoded as RGB from other modes: .*\bP=1\b"),
    ("16-bit-png", r"images decoded as RGB from other modes: .*\bI(;16)?=1\b"),
    ("large-image-resized", r"images=9 annotations=9\b"),
    ("odd-and-non-utf8-file-names", r"images=9 annotations=9\b"),
]


def handled_split(folder: Path) -> Path:
    """One dataset with every handled oddity (9 images, 9 trained boxes)."""
    root = folder / "images"
    root.mkdir(parents=True)
    specs = [  # (file name, size, mode)
        ("rgb.png", (64, 64), "RGB"),
        ("gray.png", (64, 64), "L"),
        ("rgba.png", (64, 64), "RGBA"),
        ("deep.png", (64, 64), "I;16"),
        ("pal.png", (64, 64), "P"),
        (ODD_NAME, (64, 64), "RGB"),
        (RAW_NAME, (64, 64), "RGB"),
        ("big.png", (2400, 1800), "RGB"),
        ("negative.png", (64, 48), "RGB"),
    ]
    images = []
    for i, (name, size, mode) in enumerate(specs, start=1):
        _png(root / name, size, mode)
        images.append({"id": i, "file_name": name, "width": size[0], "height": size[1]})
    del images[-1]["width"], images[-1]["height"]  # read from the header
    anns = [
        _ann(1, 1, [5, 5, 20, 20]),
        _ann(2, 1, [50, 50, 30, 30], cat=7),  # partly outside: clipped
        _ann(3, 1, [70, 10, 10, 10]),  # fully outside: degenerate
        _ann(4, 2, [10, 10, 20, 20], cat=7),
        _ann(5, 2, [10, 10, 0, 15]),  # zero width: degenerate
        _ann(6, 3, [10, 10, 30, 30]),
        _ann(7, 3, [0, 0, 64, 64], iscrowd=1),  # crowd
        _ann(8, 4, [12, 12, 24, 24], cat=7),
        _ann(9, 5, [20, 20, 30, 30]),
        _ann(10, 6, [4, 4, 30, 30], cat=7),
        _ann(11, 7, [8, 8, 30, 30]),
        _ann(12, 8, [100, 100, 800, 600], cat=7),
    ]
    path = folder / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATS}))  # ASCII escapes
    return path


def write_spec(folder: Path, ann: Path, root: Path, **model) -> Path:
    raw = {
        "name": "bad-data",
        "task": "detection",
        "model": {"arch": "ssdlite320_mobilenet_v3_large", "weights": "none", **model},
        "data": {
            "train": {"images": str(root), "annotations": str(ann)},
            "val": {"images": str(root), "annotations": str(ann)},
            "image_size": 64,
        },
        "train": {"epochs": 1, "batch_size": 2, "device": "cpu", "seed": 0},
        "objective": {"metric": "map50", "mode": "max"},
        "space": {"lr": 0.01},
        "output_dir": str(folder / "runs"),
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return path


def _make_case(folder: Path, cid: str, change) -> tuple[Path, Path, Path]:
    folder.mkdir(parents=True)
    data, root = base_split(folder)
    ann = folder / "annotations.json"
    if change is not None:
        change(data, root, folder)
    for im in data["images"]:
        for key in ("width", "height"):
            if key in im and im[key] is None:
                del im[key]
    text = json.dumps(data)
    if cid == "truncated-json":
        ann.write_text(text[: len(text) // 2])
    elif cid == "non-utf8-json":
        data["categories"][0]["name"] = "café"
        ann.write_bytes(json.dumps(data, ensure_ascii=False).encode("latin-1"))
    else:
        ann.write_text(text)
    return write_spec(folder, ann, root), ann, root


class Evil:
    """Unpickling this runs code (it would create ``marker``)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Every CLI case in one batch child; returns (results, {id: (ann, root)}, files)."""
    import torch
    import torchvision

    top = tmp_path_factory.mktemp("baddata")
    cases, where = [], {}
    for i, (cid, change, _, _) in enumerate(REFUSED_BY_VALIDATE):
        spec, ann, root = _make_case(top / f"v{i:02d}", cid, change)
        where[cid] = (ann, root)
        cases.append({"id": cid, "argv": ["validate", str(spec), "--quick"], "cwd": str(spec.parent)})
    for i, (cid, change, _, _) in enumerate(REFUSED_BY_HEADERS):
        spec, ann, root = _make_case(top / f"h{i:02d}", cid, change)
        where[cid] = (ann, root)
        cases.append({"id": cid, "argv": ["validate", str(spec)], "cwd": str(spec.parent)})
    for i, (cid, change, _, _) in enumerate(REFUSED_BY_TRIAL):
        spec, ann, root = _make_case(top / f"t{i:02d}", cid, change)
        where[cid] = (ann, root)
        cases.append(
            {
                "id": cid,
                "argv": ["trial", str(spec), "--out", str(spec.parent / "out")],
                "cwd": str(spec.parent),
            }
        )
    handled = top / "handled"
    handled.mkdir()
    ann = handled_split(handled)
    spec = write_spec(handled, ann, handled / "images")
    where["handled"] = (ann, handled / "images")
    cases.append(
        {"id": "handled", "argv": ["trial", str(spec), "--out", str(handled / "out")], "cwd": str(handled)}
    )
    # weights files given to `trial` (checkpoint-format dicts): code-running pickle, wrong architecture
    files = {"marker": top / "EVIL_CODE_RAN"}
    files["evil"] = top / "evil_checkpoint.pt"
    with open(files["evil"], "wb") as f:
        pickle.dump({"format": 1, "model": Evil(str(files["marker"]))}, f)
    files["wrong_arch"] = top / "resnet18_checkpoint.pt"
    other = torchvision.models.resnet18(weights=None).state_dict()
    torch.save({"format": 1, "model": other}, files["wrong_arch"])
    for cid, key in (("weights-code-pickle", "evil"), ("weights-wrong-arch", "wrong_arch")):
        folder = top / cid
        folder.mkdir()
        data, root = base_split(folder)
        (folder / "annotations.json").write_text(json.dumps(data))
        spec = write_spec(folder, folder / "annotations.json", root, weights=str(files[key]))
        argv = ["trial", str(spec), "--out", str(folder / "out")]
        cases.append({"id": cid, "argv": argv, "cwd": str(folder)})
    t0 = time.time()
    results = run_batch(cases, top / "batch", timeout=600)
    print(f"{len(cases)} bad-data CLI cases in {time.time() - t0:.1f}s")
    return results, where, files


def _named(kind: str, ann: Path, root: Path) -> str:
    return str(ann) if kind == "json" else str(root / kind.split(":", 1)[1])


@pytest.mark.parametrize(
    "case",
    REFUSED_BY_VALIDATE + REFUSED_BY_HEADERS,
    ids=[c[0] for c in REFUSED_BY_VALIDATE + REFUSED_BY_HEADERS],
)
def test_dataset_refused_by_validate(batch, case):
    results, where, _ = batch
    cid, _, text, named = case
    r = results[cid]
    assert r["rc"] == 2, f"exit {r['rc']}: {r['stderr'][-2000:]}"
    lines = [ln for ln in r["stderr"].splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r["stderr"], r["stderr"][-2000:]
    assert text.lower() in lines[0].lower(), lines[0]
    assert _named(named, *where[cid]) in lines[0], f"file not named: {lines[0]}"


@pytest.mark.parametrize("case", REFUSED_BY_TRIAL, ids=[c[0] for c in REFUSED_BY_TRIAL])
def test_dataset_refused_by_trial(batch, case):
    results, where, _ = batch
    cid, _, text, named = case
    r = results[cid]
    assert r["rc"] == 1, f"exit {r['rc']}: {r['stderr'][-2000:]}"
    last = [ln for ln in r["stderr"].splitlines() if ln.strip()][-1]
    assert last.startswith("error: DatasetError: ") and "Traceback" not in r["stderr"], r["stderr"][-2000:]
    assert text.lower() in last.lower(), last
    assert _named(named, *where[cid]) in last, f"file not named: {last}"


@pytest.mark.parametrize("kind", HANDLED, ids=[h[0] for h in HANDLED])
def test_dataset_handled(batch, kind):
    results, _, _ = batch
    r = results["handled"]
    assert r["rc"] == 0, f"exit {r['rc']}: {r['stderr'][-3000:]}"
    assert "status: ok" in r["stdout"]
    assert re.search(kind[1], r["stderr"]), f"{kind[1]!r} not in the log:\n{r['stderr'][-3000:]}"


def test_at_least_12_dataset_kinds(batch):
    """A sample, not a count: the refused kinds end in at least 12 different refusals (each one's
    last stderr line, its own files masked), so the ids are not one check renamed."""
    results, where, _ = batch
    assert len(REFUSED_BY_VALIDATE) + len(REFUSED_BY_HEADERS) + len(REFUSED_BY_TRIAL) + len(HANDLED) >= 12
    refusals: dict[str, list[str]] = {}
    for cid, *_ in REFUSED_BY_VALIDATE + REFUSED_BY_HEADERS + REFUSED_BY_TRIAL:
        lines = [ln for ln in results[cid]["stderr"].splitlines() if ln.strip()]
        ann, root = where[cid]
        text = (lines[-1] if lines else "<no stderr>").replace(str(ann), "<ann>").replace(str(root), "<root>")
        refusals.setdefault(text, []).append(cid)
    assert len(refusals) >= 12, {t: ids for t, ids in refusals.items() if len(ids) > 1}


# ---------------------------------------------------------------- weights and checkpoint files


def test_checkpoint_code_pickle_refused_as_weights(batch):
    results, _, files = batch
    r = results["weights-code-pickle"]
    lines = [ln for ln in r["stderr"].splitlines() if ln.strip()]
    assert r["rc"] == 2 and len(lines) == 1 and ": model.weights: " in lines[0], r["stderr"][-2000:]
    assert "weights_only" in lines[0] and str(files["evil"]) in lines[0], lines[0]
    assert not files["marker"].exists(), "unpickling ran code"
    assert not (files["evil"].parent / "weights-code-pickle" / "out").exists()  # refused before it


def test_checkpoint_wrong_architecture_as_weights(batch):
    results, _, files = batch
    r = results["weights-wrong-arch"]
    last = [ln for ln in r["stderr"].splitlines() if ln.strip()][-1]
    assert r["rc"] == 2 and "Traceback" not in r["stderr"], r["stderr"][-2000:]
    assert "does not fit this model" in last and "missing e.g." in last and "unexpected e.g." in last, last
    assert ": model.weights: " in last
    assert not (files["wrong_arch"].parent / "weights-wrong-arch" / "out").exists()
