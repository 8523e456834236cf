"""Data side: COCO loading/sanitising (trainables.coco) and datasets/transforms/loaders (trainables.data)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision import tv_tensors

from trainables.coco import DatasetError, load_coco, summarize
from trainables.data import (
    CocoDetection,
    CocoSemantic,
    build_transforms,
    collate,
    make_loader,
    read_image,
)
from trainables.params import resolve

REPO = Path(__file__).resolve().parents[1]
CATS = [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}]  # sorted by id: a -> 1, b -> 2
SQUARE = [[10.0, 10.0, 50.0, 10.0, 50.0, 40.0, 10.0, 40.0]]  # x 10..50, y 10..40


def _png(path: Path, size=(100, 100), mode="RGB") -> None:
    w, h = size
    Image.new(mode, (w, h), color=(90, 120, 200) if mode == "RGB" else 128).save(path)


def _ann(aid, image_id, cat, bbox, **kw):
    return {"id": aid, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": 0, **kw}


def _rle(h: int, w: int, short: bool = False) -> dict:
    """A compressed RLE of an h x w mask (``short``: of a 20x20 one, with the size h x w claimed)."""
    from pycocotools import mask as mask_utils

    m = np.zeros((20, 20) if short else (h, w), np.uint8, order="F")  # short: 20 x 20 = 400 pixels
    m[5:15, 5:15] = 1
    return {"size": [h, w], "counts": mask_utils.encode(m)["counts"].decode()}


def make_split(tmp_path: Path, anns=None, images=None, cats=None, name="train.json"):
    """Three images (two annotated 100x100 + 100x80, one negative); returns (json path, image root)."""
    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    if images is None:
        images = [
            {"id": 1, "file_name": "one.png", "width": 100, "height": 100, "modality": "x"},
            {"id": 2, "file_name": "two.png", "width": 100, "height": 80},
            {"id": 3, "file_name": "neg.png", "width": 100, "height": 100},
        ]
        for im in images:
            _png(root / im["file_name"], (im["width"], im["height"]))
    if anns is None:
        anns = [
            _ann(1, 1, 3, [10, 10, 40, 30], segmentation=SQUARE),
            _ann(2, 1, 7, [60, 50, 30, 40], segmentation=[[60, 50, 90, 50, 90, 90, 60, 90]]),
            _ann(3, 2, 7, [5, 5, 20, 20], segmentation=[[5, 5, 25, 5, 25, 25, 5, 25]]),
        ]
    path = tmp_path / name
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats or CATS}))
    return path, root


# --- loading and sanitising ----------------------------------------------------------------------
def test_load_maps_categories_and_keeps_negatives(tmp_path, caplog):
    ann, root = make_split(tmp_path)
    with caplog.at_level(logging.INFO, logger="trainables.data"):
        idx = load_coco(ann, root)
    assert idx.class_names == ["a", "b"] and idx.cat_ids == [3, 7]
    assert idx.cat_to_label == {3: 1, 7: 2} and idx.label_to_cat == {1: 3, 2: 7}
    assert [r.id for r in idx.images] == [1, 2, 3]
    assert idx.images[0].path == (root / "one.png").resolve() and idx.images[0].extra == {"modality": "x"}
    assert [a.label for a in idx.images[0].anns] == [1, 2]
    assert idx.images[0].anns[0].box == (10.0, 10.0, 50.0, 40.0)
    assert idx.stats["negatives"] == 1 and idx.stats["annotations"] == 3 and idx.stats["images"] == 3
    assert len([r for r in caplog.records if r.name == "trainables.data"]) == 1
    assert "negatives=1" in caplog.records[-1].getMessage()
    s = summarize(idx)
    assert s["images"] == 3 and s["annotations"] == 3 and s["negatives"] == 1
    assert s["per_class"] == {"a": 1, "b": 2}
    assert sorted(idx.coco.getAnnIds()) == [1, 2, 3]


def test_boxes_clipped_and_degenerate_dropped(tmp_path):
    anns = [
        _ann(1, 1, 3, [90, -5, 20, 20]),  # clipped to 90..100, 0..15
        _ann(2, 1, 3, [10, 10, 0.5, 20]),  # too narrow
        _ann(3, 1, 7, [150, 10, 10, 10]),  # outside: zero width after clipping
        _ann(4, 1, 7, [10, 10, 10, 0]),  # zero height
        _ann(5, 2, 7, [1, 1, 5, 5]),
    ]
    idx = load_coco(*make_split(tmp_path, anns=anns))
    assert idx.stats["clipped"] == 1 and idx.stats["degenerate"] == 3  # clipped counts kept boxes
    assert [a.box for a in idx.images[0].anns] == [(90.0, 0.0, 100.0, 15.0)]
    assert sorted(idx.coco.getAnnIds()) == [1, 5]
    assert idx.coco.anns[1]["bbox"] == [90.0, 0.0, 10.0, 15.0]


def test_crowd_not_trained_and_ignored_in_semantic(tmp_path):
    crowd = {"size": [100, 100], "counts": mask_utils.encode(_square_mask())["counts"].decode()}
    anns = [
        _ann(1, 1, 3, [10, 10, 40, 30], segmentation=crowd, iscrowd=1),
        _ann(2, 1, 7, [60, 60, 20, 20], segmentation=[[60, 60, 80, 60, 80, 80, 60, 80]]),
        _ann(3, 2, 7, [5, 5, 20, 20]),
    ]  # no segmentation: its box is ignore for semantic
    ann, root = make_split(tmp_path, anns=anns)
    idx = load_coco(ann, root)
    assert idx.stats["crowd"] == 1 and idx.stats["annotations"] == 2
    _, target = CocoDetection(idx, None)[0]
    assert target["labels"].tolist() == [2]
    sem = load_coco(ann, root, task="semantic_segmentation")
    _, mask = CocoSemantic(sem, None)[0]
    assert mask.dtype == torch.int64 and mask.shape == (100, 100)
    assert (mask[10:40, 10:50] == 255).all() and (mask[60:80, 60:80] == 2).all()
    assert int((mask == 0).sum()) == 100 * 100 - 30 * 40 - 20 * 20
    _, mask2 = CocoSemantic(sem, None)[1]
    assert (mask2[5:25, 5:25] == 255).all() and int((mask2 == 255).sum()) == 400
    assert sem.stats["no_segmentation"] == 1  # kept as ignore, and counted in the data log
    inst = load_coco(ann, root, task="instance_segmentation")
    assert inst.stats["no_segmentation"] == 1 and inst.stats["negatives"] == 2


def test_semantic_split_without_any_mask_is_refused(tmp_path):
    """Boxes alone (a detection file given as semantic data) made every pixel background or
    ignored: a trial trained on that and reported miou 1.000. Refused, naming the file."""
    anns = [_ann(1, 1, 3, [10, 10, 40, 30]), _ann(2, 2, 7, [5, 5, 20, 20])]
    ann, root = make_split(tmp_path, anns=anns)
    load_coco(ann, root)  # fine for detection
    with pytest.raises(DatasetError, match="none of its 2 annotations has a segmentation mask"):
        load_coco(ann, root, task="semantic_segmentation")


def test_a_dropped_box_without_mask_does_not_count_against_the_masks(tmp_path):
    """A degenerate box without a segmentation is dropped as degenerate only: it counted as a
    box-only annotation too, so a split whose one kept annotation has a mask was refused."""
    anns = [_ann(1, 1, 3, [10, 10, 40, 30], segmentation=SQUARE), _ann(2, 1, 7, [5, 5, 0.5, 4])]
    ann, root = make_split(tmp_path, anns=anns)
    sem = load_coco(ann, root, task="semantic_segmentation")
    assert sem.stats["annotations"] == 1 and sem.stats["degenerate"] == 1
    assert sem.stats["no_segmentation"] == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["annotations"][0].update(category_id=99), "annotation id 1: unknown category id 99"),
        (lambda d: d["annotations"][0].update(category_id=[3]), r"id 1: unknown category id \[3\]"),
        (lambda d: d["annotations"][0].update(category_id={"id": 3}), "annotation id 1: unknown category id"),
        (lambda d: d["images"][1].update(id=1), "duplicate image id 1"),
        (lambda d: d["annotations"][1].update(id=1), "duplicate annotation id 1"),
        (lambda d: d["annotations"][0].update(image_id=42), "annotation id 1: points to missing image id 42"),
        (lambda d: d["images"][0].update(file_name="../one.png"), "escapes the image root"),
        (lambda d: d["images"][0].update(file_name="/etc/passwd"), "escapes the image root"),
        (lambda d: d["images"][0].update(file_name="gone.png"), "missing image file"),
        (lambda d: d["annotations"][0].update(segmentation={"size": [5, 5], "counts": "0"}), "RLE size"),
        # compressed counts for a 20x20 mask on a 100x100 image: pycocotools decoded it to noise
        (lambda d: d["annotations"][0].update(segmentation=_rle(100, 100, short=True)), "summing to 400"),
        (lambda d: d["annotations"][0].update(segmentation=_rle(100, 100) | {"counts": "a b"}), "no COCO"),
        (lambda d: d["images"].append({**d["images"][0], "id": 9}), "image ids 1 and 9 are the same file"),
        (lambda d: d.update(images=[], annotations=[]), "the split has no image"),
        (lambda d: d.update(annotations=[]), "no usable annotation"),
    ],
)
def test_invalid_dataset_raises_naming_the_file(tmp_path, change, message):
    ann, root = make_split(tmp_path)
    data = json.loads(ann.read_text())
    change(data)
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=message) as err:
        load_coco(ann, root)
    assert str(ann) in str(err.value)
    if "missing image file" in message:
        assert str(root / "gone.png") in str(err.value)


def test_truncated_json_names_file_and_position(tmp_path):
    ann, root = make_split(tmp_path)
    ann.write_text(ann.read_text()[:57])
    with pytest.raises(DatasetError, match=r"invalid JSON at line 1 column \d+") as err:
        load_coco(ann, root)
    assert str(ann) in str(err.value)


def test_json_integer_python_will_not_read_names_the_file(tmp_path):
    ann, root = make_split(tmp_path)
    ann.write_text(ann.read_text().replace('"id": 1,', '"id": ' + "9" * 5000 + ",", 1))
    with pytest.raises(DatasetError, match="cannot read JSON: Exceeds the limit") as err:
        load_coco(ann, root)
    assert str(ann) in str(err.value)


def test_coco_module_imports_no_torch():
    code = "import sys, trainables.coco; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", f"trainables.coco imported torch modules: {proc.stdout[:500]}"


# --- decoding ------------------------------------------------------------------------------------
def test_corrupt_image_bytes_raise_naming_the_file(tmp_path):
    ann, root = make_split(tmp_path)
    (root / "two.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    ds = CocoDetection(load_coco(ann, root), None)
    ds[0]
    with pytest.raises(DatasetError, match="cannot decode image") as err:
        ds[1]
    assert str(root / "two.png") in str(err.value)


def test_modes_decode_to_rgb_float(tmp_path):
    Image.new("L", (4, 3), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (4, 3), (255, 0, 0, 10)).save(tmp_path / "rgba.png")
    Image.new("RGB", (4, 3), (0, 255, 0)).convert("P").save(tmp_path / "pal.png")
    Image.fromarray(np.full((3, 4), 32896, dtype=np.uint16)).save(tmp_path / "deep.png")
    names = ("gray.png", "rgba.png", "pal.png", "deep.png")
    gray, rgba, pal, deep = (read_image(tmp_path / f) for f in names)
    for img in (gray, rgba, pal, deep):
        assert isinstance(img, tv_tensors.Image) and img.shape == (3, 3, 4) and img.dtype == torch.float32
    assert torch.allclose(gray, torch.full_like(gray, 128 / 255))
    assert rgba[:, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert pal[:, 0, 0].tolist() == [0.0, 1.0, 0.0]
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert torch.allclose(deep, torch.full_like(deep, 32896 / 65535))  # ~0.502, not clipped to 1


def test_exif_orientation_applied_and_size_checked(tmp_path):
    raw = Image.new("RGB", (100, 60), (0, 0, 255))
    raw.paste((255, 0, 0), (0, 0, 10, 10))  # red patch at the raw top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    root = tmp_path / "images"
    root.mkdir()
    raw.save(root / "rot.jpg", exif=exif.tobytes(), quality=95)
    images = [{"id": 1, "file_name": "rot.jpg", "width": 60, "height": 100}]
    ann, _ = make_split(tmp_path, images=images, anns=[_ann(1, 1, 3, [0, 0, 20, 20])])
    image, target = CocoDetection(load_coco(ann, root), None)[0]
    assert image.shape == (3, 100, 60) and target["orig_size"] == (100, 60)
    assert image[0, 2, 57] > 0.8 and image[2, 2, 57] < 0.2  # red now at the top-right
    images[0].update(width=100, height=60)  # the raw (pre-EXIF) size
    ann, _ = make_split(tmp_path, images=images, anns=[_ann(1, 1, 3, [0, 0, 20, 20])], name="raw.json")
    with pytest.raises(DatasetError, match="decoded size 60x100") as err:
        CocoDetection(load_coco(ann, root), None)[0]
    assert str(root / "rot.jpg") in str(err.value)


@pytest.mark.parametrize("suffix", [".jpg", ".tif", ".png"])
def test_missing_size_read_from_header_after_orientation(tmp_path, suffix):
    """Pillow's TIFF reader already reports the oriented size; the header read turned it back."""
    raw = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 x 20, shown 20 x 40
    root = tmp_path / "images"
    root.mkdir()
    raw.save(root / f"rot{suffix}", exif=exif.tobytes())
    images = [{"id": 1, "file_name": f"rot{suffix}"}]
    ann, _ = make_split(tmp_path, images=images, anns=[_ann(1, 1, 3, [0, 0, 10, 10])])
    idx = load_coco(ann, root)
    assert (idx.images[0].width, idx.images[0].height) == (20, 40)
    image, _ = CocoDetection(idx, None)[0]
    assert image.shape == (3, 40, 20)


def test_missing_size_read_from_header(tmp_path):
    ann, root = make_split(tmp_path)
    data = json.loads(ann.read_text())
    del data["images"][1]["width"], data["images"][1]["height"]
    ann.write_text(json.dumps(data))
    idx = load_coco(ann, root)
    assert (idx.images[1].width, idx.images[1].height) == (100, 80) and idx.stats["size_from_file"] == 1


def test_a_png_header_is_read_without_its_pixels(tmp_path):
    """Pillow's PNG getexif() decoded the whole image (validate reads every header): a PNG cut
    short after its header still gives its size; decoding it names the file."""
    from trainables.coco import image_size_from_file

    Image.new("RGB", (300, 200), (9, 99, 199)).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:80])
    assert image_size_from_file(tmp_path / "cut.png") == (300, 200)
    with pytest.raises(DatasetError, match="cannot decode image"):
        read_image(tmp_path / "cut.png")


# --- datasets, masks, transforms, loaders --------------------------------------------------------
def _square_mask() -> np.ndarray:
    m = np.zeros((100, 100), dtype=np.uint8, order="F")
    m[10:40, 10:50] = 1
    return m


def test_polygon_and_rle_give_the_same_mask(tmp_path):
    rle = mask_utils.encode(_square_mask())
    compressed = {"size": rle["size"], "counts": rle["counts"].decode()}
    flat = _square_mask().flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])) != 0)
    uncompressed = {"size": [100, 100], "counts": np.diff(np.concatenate([[0], changes])).tolist()}
    anns = [
        _ann(i, 1, 3, [10, 10, 40, 30], segmentation=s)
        for i, s in enumerate([SQUARE, compressed, uncompressed], start=1)
    ]
    idx = load_coco(*make_split(tmp_path, anns=anns), task="instance_segmentation")
    _, target = CocoDetection(idx, None, with_masks=True)[0]
    masks = target["masks"]
    assert masks.shape == (3, 100, 100) and masks.dtype == torch.uint8
    assert torch.equal(masks[1], torch.from_numpy(_square_mask().astype(np.uint8)))
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[2], masks[1])


@pytest.mark.parametrize("with_masks", [False, True])
def test_loader_shapes(tmp_path, with_masks):
    task = "instance_segmentation" if with_masks else "detection"
    idx = load_coco(*make_split(tmp_path), task=task)
    tf = build_transforms(task, False, 50, resolve({}))
    loader = make_loader(CocoDetection(idx, tf, with_masks=with_masks), 3, False, 0, 0)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == 3
    assert [tuple(i.shape) for i in images] == [(3, 50, 50), (3, 40, 50), (3, 50, 50)]
    assert [t["boxes"].shape[0] for t in targets] == [2, 1, 0]
    for img, t in zip(images, targets, strict=True):
        assert isinstance(t["boxes"], tv_tensors.BoundingBoxes) and t["boxes"].dtype == torch.float32
        assert t["boxes"].shape[1] == 4 and t["labels"].dtype == torch.int64
        assert t["input_size"] == tuple(img.shape[-2:])
        assert ("masks" in t) == with_masks
        if with_masks:
            assert t["masks"].dtype == torch.uint8
            assert t["masks"].shape == (t["boxes"].shape[0], *img.shape[-2:])
    assert targets[0]["boxes"][0].tolist() == [5.0, 5.0, 25.0, 20.0]
    assert targets[1]["orig_size"] == (80, 100) and targets[1]["image_id"] == 2


def test_train_transforms_flip_and_drop_degenerate(tmp_path):
    anns = [
        _ann(1, 1, 3, [10, 10, 40, 30], segmentation=SQUARE),
        _ann(2, 1, 7, [70, 70, 1.5, 20], segmentation=[[70, 70, 71.5, 70, 71.5, 90, 70, 90]]),
    ]
    idx = load_coco(*make_split(tmp_path, anns=anns), task="instance_segmentation")
    tf = build_transforms("instance_segmentation", True, 50, resolve({"aug.hflip": 1.0, "aug.color": 0.2}))
    image, target = CocoDetection(idx, tf, with_masks=True)[0]
    assert image.shape == (3, 50, 50) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert target["labels"].tolist() == [1]  # the 1.5 px box became 0.75 px and was dropped
    assert target["boxes"].tolist() == [[25.0, 5.0, 45.0, 20.0]]  # flipped: x 50-25..50-5
    assert target["masks"].shape == (1, 50, 50) and int(target["masks"][0, 10, 30]) == 1


def test_scale_jitter_and_semantic_transforms(tmp_path):
    ann, root = make_split(tmp_path)
    torch.manual_seed(0)
    tf = build_transforms("detection", True, 50, resolve({"aug.scale": 0.5}))
    ds = CocoDetection(load_coco(ann, root), tf)
    sides = {max(ds[0][0].shape[-2:]) for _ in range(8)}
    assert len(sides) > 1 and all(25 <= s <= 75 for s in sides)
    sem = load_coco(ann, root, task="semantic_segmentation")
    tf = build_transforms("semantic_segmentation", True, 64, resolve({"aug.scale": 0.3, "aug.vflip": 0.5}))
    image, mask = CocoSemantic(sem, tf)[1]
    assert image.shape == (3, 64, 64) and mask.shape == (64, 64) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) <= {0, 2, 255}


def test_limit_and_seeded_worker_loader(tmp_path):
    idx = load_coco(*make_split(tmp_path))
    assert len(CocoDetection(idx, None, limit=2)) == 2
    ds = CocoDetection(idx, build_transforms("detection", False, 32, resolve({})))
    orders = []
    for _ in range(2):
        loader = make_loader(ds, 1, True, 1, seed=5)
        orders.append([t[0]["image_id"] for _, t in loader])
    assert orders[0] == orders[1] and sorted(orders[0]) == [1, 2, 3]
    assert collate([(1, "a"), (2, "b")]) == ([1, 2], ["a", "b"])


def test_bundled_demo_data_loads():
    split = REPO / "spaces" / "data" / "bccd"
    ann = split / "annotations" / "instances_val.json"
    assert ann.is_file(), f"the bundled demo data (in the repository) is missing: {ann}"
    idx = load_coco(ann, split / "images")
    assert len(idx.class_names) >= 1 and idx.stats["annotations"] > 0
    ds = CocoDetection(idx, build_transforms("detection", False, 320, resolve({})), limit=2)
    image, target = ds[0]
    assert image.shape[0] == 3 and max(image.shape[-2:]) == 320 and target["boxes"].shape[1] == 4


class _Draws(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[int, float]:
        return i, float(torch.rand(()))  # the index and an augmentation's random draw


def test_worker_loader_resumes_with_the_same_order_and_draws():
    """A trial resumed from the loader generator's saved state (after epoch 1) sees epoch 2's
    batches as the uninterrupted trial does, also with worker processes."""
    from trainables.trial import _generators

    loader = make_loader(_Draws(), 2, shuffle=True, workers=1, seed=0)
    list(loader)
    saved = [g.get_state() for g in _generators(loader)]
    epoch2 = list(loader)
    again = make_loader(_Draws(), 2, shuffle=True, workers=1, seed=0)
    for g, state in zip(_generators(again), saved, strict=True):
        g.set_state(state)
    assert list(again) == epoch2


@pytest.mark.parametrize(
    "spoil,said",
    [
        (lambda p: p.write_text("not an image"), "cannot read image header"),
        (lambda p: Image.new("RGB", (100, 80)).save(p, format="PNG"), "header says 100x80"),
    ],
    ids=["not-an-image", "other-size"],
)
def test_validate_reads_every_image_header(tmp_path, spoil, said):
    """An image file that is no image, or not the annotations' size, is refused by validate (and by
    launch's checks), not by the first epoch; ``--quick`` reads no image."""
    from tests.tinydata import make_tiny_coco, write_tiny_spec

    images, _ = make_tiny_coco(tmp_path / "data", n_images=4, size=100)
    spoil(images / "img_002.png")
    spec = write_tiny_spec(tmp_path, "hdr", space={"lr": 0.01}, search={"num_trials": 1}, epochs=1)
    cmd = [sys.executable, "-m", "search", "validate", str(spec)]
    full = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert full.returncode == 2, full.stderr
    line = full.stderr.strip()
    assert "data.train: " in line and str(images / "img_002.png") in line and said in line, line
    quick = subprocess.run([*cmd, "--quick"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert quick.returncode == 0, quick.stderr


def test_semantic_metrics_are_scored_at_each_images_own_size(tmp_path):
    """A trial scored semantic masks at the network's square input (every image weighing the
    same, masks resized nearest), while ``predict`` delivers them at the image's own size: with
    images of mixed sizes the recorded miou was not the deployed model's. A model that says class
    1 everywhere must score the pixels of the original masks."""
    from tests.tinydata import trial_config
    from trainables import engine
    from trainables import trial as T
    from trainables.config import DataSplit
    from trainables.data import semantic_mask

    images = [
        {"id": 1, "file_name": "wide.png", "width": 200, "height": 100},
        {"id": 2, "file_name": "small.png", "width": 40, "height": 40},
    ]
    root = tmp_path / "images"
    root.mkdir()
    for im in images:
        _png(root / im["file_name"], (im["width"], im["height"]))
    square = [[10, 10, 30, 10, 30, 30, 10, 30]]
    anns = [_ann(i, i, 3, [10, 10, 20, 20], segmentation=square) for i in (1, 2)]
    split = DataSplit(images=root, annotations=make_split(tmp_path, anns=anns, images=images)[0])
    task, arch = "semantic_segmentation", "lraspp_mobilenet_v3_large"
    cfg = trial_config(split, tmp_path / "out", task=task, arch=arch, image_size=32, metric="miou")
    _, index, _, loader = T._build_data(cfg, {})

    class ClassOne(torch.nn.Module):
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 3, *x.shape[-2:])
            logits[:, 1] = 1.0
            return {"out": logits}

    got = engine.evaluate(ClassOne(), loader, index, device=torch.device("cpu"), task=cfg.task)
    fg = sum(int((semantic_mask(rec) == 1).sum()) for rec in index.images)
    pixels = sum(rec.width * rec.height for rec in index.images)
    assert fg >= 2 * 300 and pixels == 200 * 100 + 40 * 40
    assert got["fg_miou"] == pytest.approx(fg / pixels) and got["pixel_acc"] == pytest.approx(fg / pixels)
    assert got["miou"] == pytest.approx(fg / pixels / 2)  # background present, never predicted: IoU 0
