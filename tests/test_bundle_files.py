"""``export`` and ``predict`` against what a user's folders and files may hold: predict's ``--out``
writes only its own outputs (never through a link, never over a file an earlier predict did not
list), an image it cannot decode or that is too large is bad input that leaves ``--out`` as it
was, a bundle's model.yaml is checked against its sha256 before it is parsed, and export's
``--out`` may be a link to an empty folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat

import pytest
import yaml
from PIL import Image

from tests.cli_study import NAME, ok_json, one_error_line, search


def _predict(bundle, *args, cwd, **env):
    return search("predict", str(bundle[0]), *map(str, args), cwd=cwd, **env)


def test_out_never_writes_through_a_link_or_over_a_file_it_did_not_list(cli_study, cli_bundle, tmp_path):
    image, root = cli_study["images"][0], cli_study["root"]
    dest = tmp_path / "pred"
    assert _predict(cli_bundle, image, "--out", dest, cwd=root).returncode == 0
    before = (dest / "predictions.json").read_bytes()
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"the user's")
    other = cli_study["images"][1]
    (dest / f"{other.stem}.annotated.png").symlink_to(victim)  # not listed in predictions.json
    one_error_line(_predict(cli_bundle, other, "--out", dest, cwd=root), other.stem, "not listed")
    assert victim.read_bytes() == b"the user's" and (dest / f"{other.stem}.annotated.png").is_symlink()
    assert (dest / "predictions.json").read_bytes() == before
    (dest / f"{other.stem}.annotated.png").unlink()
    (dest / f"{other.stem}.annotated.png").write_bytes(b"mine")  # a plain file of the user's
    one_error_line(_predict(cli_bundle, other, "--out", dest, cwd=root), other.stem, "not listed")
    assert (dest / f"{other.stem}.annotated.png").read_bytes() == b"mine"
    listed = dest / f"{image.stem}.annotated.png"
    listed.unlink()
    listed.symlink_to(victim)  # a name the earlier predict listed, now a link: the link is replaced
    assert _predict(cli_bundle, image, "--out", dest, cwd=root).returncode == 0
    assert victim.read_bytes() == b"the user's" and not listed.is_symlink()
    assert sorted(p.name for p in dest.iterdir() if p.name.startswith(".")) == []  # no staging left


def test_an_undecodable_or_too_large_image_is_bad_input_and_out_stays(cli_study, cli_bundle, tmp_path):
    image, root = cli_study["images"][0], cli_study["root"]
    dest = tmp_path / "pred"
    assert _predict(cli_bundle, image, "--out", dest, cwd=root).returncode == 0
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(image.read_bytes()[:-40])
    proc = _predict(cli_bundle, image, truncated, "--out", dest, cwd=root)
    one_error_line(proc, str(truncated), "cannot decode")
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    one_error_line(_predict(cli_bundle, truncated, "--out", tmp_path / "new", cwd=root), "cannot decode")
    assert not (tmp_path / "new").exists()
    proc = _predict(cli_bundle, image, cwd=root, SEARCH_MAX_PIXELS="100")
    one_error_line(proc, str(image), "exceeds the limit of 100", "SEARCH_MAX_PIXELS")


def test_a_one_pixel_wide_image_predicts(cli_study, cli_bundle, tmp_path):
    """The long side resized to the bundle's size made the short side 0 px (exit 1, torch error)."""
    thin = tmp_path / "thin.png"
    Image.new("RGB", (1, 900), (120, 30, 60)).save(thin)
    pred = ok_json(_predict(cli_bundle, thin, "--json", cwd=cli_study["root"]))
    entry = pred["images"][0]
    assert (entry["width"], entry["height"]) == (1, 900) and min(entry["input_size"]) == 1


def test_model_yaml_is_checked_before_it_is_parsed(cli_study, cli_bundle, tmp_path):
    image, root = cli_study["images"][0], cli_study["root"]
    broken = tmp_path / "broken"
    shutil.copytree(cli_bundle[0], broken)
    with (broken / "model.yaml").open("a") as f:
        f.write("bad: [unclosed\n")  # not YAML, and not what SHA256SUMS says
    one_error_line(search("predict", str(broken), str(image), cwd=root), "model.yaml", "sha256")
    resummed = _edited(cli_bundle[0], tmp_path / "resummed", lambda meta: meta.pop("arch"))
    one_error_line(search("predict", str(resummed), str(image), cwd=root), "model.yaml", "arch")
    assert json.loads((cli_bundle[0] / "metrics.json").read_text())  # the original is untouched


def _detections(bundle, image, root):
    out = ok_json(_predict((bundle,), image, "--min-score", "0", "--json", cwd=root))
    return out["images"][0]["detections"]


def _edited(bundle, dst, edit):
    """A copy of ``bundle`` whose model.yaml ``edit`` changed, its sum made to match."""
    shutil.copytree(bundle, dst)
    meta = yaml.safe_load((dst / "model.yaml").read_text())
    edit(meta)
    (dst / "model.yaml").write_text(yaml.safe_dump(meta))
    sums = (dst / "SHA256SUMS").read_text().splitlines()
    digest = hashlib.sha256((dst / "model.yaml").read_bytes()).hexdigest()
    (dst / "SHA256SUMS").write_text(
        "\n".join(f"{digest}  model.yaml" if line.endswith("  model.yaml") else line for line in sums) + "\n"
    )
    return dst


def test_detections_name_the_datasets_category_ids(cli_study, cli_bundle, tmp_path):
    """Predictions gave label and class name only: a user's COCO category ids (tinydata's are 3
    and 7) were lost. A bundle from before category ids predicts with ``category_id`` None; one
    whose ids do not fit its classes is refused."""
    image, root = cli_study["images"][0], cli_study["root"]
    meta = yaml.safe_load((cli_bundle[0] / "model.yaml").read_text())
    assert meta["category_ids"] == [3, 7] and "category_ids[i - 1]" in meta["labels"]
    dets = _detections(cli_bundle[0], image, root)
    assert dets and {(d["class"], d["category_id"]) for d in dets} <= {("red", 3), ("blue", 7)}
    older = _edited(cli_bundle[0], tmp_path / "older", lambda m: m.pop("category_ids"))
    dets = _detections(older, image, root)
    assert dets and {d["category_id"] for d in dets} == {None}
    short = _edited(cli_bundle[0], tmp_path / "short", lambda m: m.update(category_ids=[3]))
    one_error_line(search("predict", str(short), str(image), cwd=root), "model.yaml", "category_ids")


def test_export_into_a_link_to_an_empty_folder(cli_study, tmp_path):
    """The bundle was built, then the rename over the link failed (exit 1, NotADirectoryError)."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    where = cli_study["where"]
    proc = search(
        "export", NAME, *where, "--out", str(tmp_path / "link"), "--no-torchscript", cwd=cli_study["root"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "link").is_symlink() and (tmp_path / "empty" / "weights.pt").is_file()


def _detect(tmp_path, labels: list[int], scores: list[float], min_score: float) -> list[dict]:
    """``bundle_load.predict`` of a model that finds one box per label with those scores."""
    import torch

    from search import bundle_load

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))  # predict runs on the model's device

        def forward(self, images):
            box = torch.tensor([[1.0, 1.0, 8.0, 8.0]])
            out = {"boxes": box.repeat(len(labels), 1), "labels": torch.tensor(labels)}
            return [{**out, "scores": torch.tensor(scores)} for _ in images]

    image = tmp_path / "a.png"
    Image.new("RGB", (20, 10), (10, 20, 30)).save(image)
    meta = {"task": "detection", "class_names": ["red", "blue"], "category_ids": [3, 7]}
    meta["preprocessing"] = {"image_size": 20, "resize": "long_side"}
    return bundle_load.predict(Fixed(), meta, image, min_score=min_score)["detections"]


def test_predict_drops_the_background_label_as_evaluation_does(tmp_path):
    """A sigmoid head's background column (RetinaNet, FCOS) can score above the threshold:
    evaluation drops label 0, and predict delivered it as class "__background__"."""
    dets = _detect(tmp_path, [0, 1, 2], [0.9, 0.8, 0.7], min_score=0.0)
    assert [(d["label"], d["class"], d["category_id"]) for d in dets] == [(1, "red", 3), (2, "blue", 7)]


def _at_most(size: int):
    """A child process whose files may not grow past ``size`` bytes (as a full disk, EFBIG)."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))

    return limit


@pytest.mark.slow
def test_export_whose_files_the_disk_cannot_hold_fails_in_one_line(cli_study, cli_bundle, tmp_path):
    """On a full disk torch's own writer aborted export (exit 134, a C++ stack) from its destructor
    and left the staging folder; the bundle's files are now made in memory and written by Python."""
    import subprocess
    import sys

    from tests.cli_study import cli_env

    weights = (cli_bundle[0] / "weights.pt").stat().st_size  # fits; the TorchScript file does not
    out = tmp_path / "outs"
    out.mkdir()
    args = [sys.executable, "-m", "search", "export", NAME, *cli_study["where"], "--out", str(out / "b")]
    proc = subprocess.run(
        args,
        cwd=cli_study["root"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_at_most(weights + 4096),
    )
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "File too large" in lines[0] and "Traceback" not in proc.stderr, proc.stderr[
        -3000:
    ]
    assert list(out.iterdir()) == []  # no bundle, no staging folder


def test_a_torchscript_file_sha256sums_does_not_list_is_never_loaded(tmp_path):
    """A TorchScript file runs code: only one SHA256SUMS lists (and that matches) is loaded. A
    check of the listed files alone loaded one that an intruder had added beside them."""
    import warnings

    import torch

    from search import bundle_load

    (tmp_path / "model.yaml").write_text("format: search-bundle/1\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; export still writes it
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 1)), str(tmp_path / "model.torchscript.pt"))

    def sums(*names):
        lines = [f"{hashlib.sha256((tmp_path / n).read_bytes()).hexdigest()}  {n}\n" for n in names]
        (tmp_path / "SHA256SUMS").write_text("".join(lines))

    sums("model.yaml", "model.torchscript.pt")
    assert bundle_load.load_torchscript(tmp_path)(torch.ones(1, 2)).shape == (1, 1)
    sums("model.yaml")  # the rest of the bundle still matches its sums
    with pytest.raises(ValueError, match="model.torchscript.pt has no sha256 in SHA256SUMS"):
        bundle_load.load_torchscript(tmp_path)


def test_predict_keeps_only_detections_at_or_above_min_score(tmp_path):
    """predict's --min-score: a detection scored below it is left out, one at or above it stays."""
    dets = _detect(tmp_path, [1, 2, 1, 2], [0.9, 0.2, 0.6, 0.5], min_score=0.5)
    assert [d["score"] for d in dets] == pytest.approx([0.9, 0.6, 0.5])


def test_a_bundle_is_as_readable_as_the_users_other_files(cli_bundle):
    """Export made the bundle folder 0700 (mkdtemp's): a colleague handed it could not read it."""
    out, _ = cli_bundle
    mask = os.umask(0o022)
    os.umask(mask)  # the export inherited it
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    readable = 0o444 & ~mask
    for path in out.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) & readable == readable, path


def test_the_bundle_checks_run_on_noise_only_where_the_data_is_not_there(tmp_path):
    """Any error reading the validation images fell back to noise images: a broken image that is
    there passed as 'the study's validation images are not here'."""
    from search.bundle import sample_inputs
    from search.spec import load_spec
    from tests.tinydata import make_tiny_coco, write_tiny_spec

    images, _ = make_tiny_coco(tmp_path / "data", n_images=2, size=64)
    spec = load_spec(
        write_tiny_spec(tmp_path, "noise", space={"lr": 0.01}, search={"num_trials": 1}, epochs=1)
    )
    cfg = spec.trial_config(out_dir=tmp_path / "t")
    inputs, what = sample_inputs(cfg)
    assert len(inputs) == 2 and what == "the first 2 validation images"
    first = sorted(images.glob("*.png"))[0]
    first.write_bytes(b"not an image")
    with pytest.raises(OSError):
        sample_inputs(cfg)
    shutil.rmtree(tmp_path / "data")  # a study copied without its data
    inputs, what = sample_inputs(cfg)
    assert what.startswith("2 noise images") and [tuple(x.shape) for x in inputs] == [
        (3, 96, 96),
        (3, 72, 96),
    ]


def test_two_exports_into_one_out_the_second_says_so(cli_study, tmp_path, monkeypatch):
    """Two exports into the same --out at once: the one that finished second failed with
    'OSError: [Errno 39] Directory not empty' (exit 1) after all its work."""
    from search import bundle, select
    from search.bundle import BundleError

    out, write = tmp_path / "b", bundle._write_files

    def beaten(tmp, *args, **kwargs):  # the other export's bundle lands meanwhile
        write(tmp, *args, **kwargs)
        out.mkdir(exist_ok=True)
        (out / "model.yaml").write_text("the other export's\n")

    monkeypatch.setattr(bundle, "_write_files", beaten)
    with pytest.raises(BundleError, match=r"was filled by another process meanwhile\. Fix: choose a new"):
        select.export(cli_study["exp_dir"], out, torchscript=False)
    assert [p.name for p in out.iterdir()] == ["model.yaml"] and not list(tmp_path.glob(".b.*"))
