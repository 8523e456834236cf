"""Where a spec's relative paths resolve: a path in the file against the file's folder, a path given
with ``--set`` against the current directory (README, "Spec reference")."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from search.errors import SpecError
from search.spec import load_spec
from search.spec.load import from_cwd

ROOT = Path(__file__).resolve().parents[1]
BCCD = ROOT / "spaces" / "data" / "bccd"
ANN = "data/bccd/annotations"


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    """A detection spec in its own folder whose paths are all relative to that folder."""
    folder = tmp_path / "specs"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "bccd").symlink_to(BCCD, target_is_directory=True)
    raw = {
        "name": "paths",
        "task": "detection",
        "model": {"arch": "ssdlite320_mobilenet_v3_large", "weights": "none"},
        "data": {
            split: {"images": "data/bccd/images", "annotations": f"{ANN}/instances_{split}.json"}
            for split in ("train", "val")
        },
        "output_dir": "runs",
        "space": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}},
    }
    path = folder / "det.yaml"
    path.write_text(yaml.safe_dump(raw))
    (tmp_path / "cwd").mkdir()
    return path


def test_paths_in_the_file_resolve_against_its_folder(spec_file, monkeypatch):
    raw = yaml.safe_load(spec_file.read_text())
    spec_file.write_text(yaml.safe_dump({**raw, "tracking": {"uri": "sqlite:///store/mlflow.db"}}))
    monkeypatch.chdir(spec_file.parent.parent / "cwd")
    spec = load_spec(spec_file)
    folder = spec_file.parent.resolve()
    assert spec.output_dir == folder / "runs"
    assert spec.data.val.images == (folder / "data/bccd/images").resolve()
    # a relative sqlite store too: resume, best and ui may run from another directory
    assert spec.tracking.uri == f"sqlite:///{folder}/store/mlflow.db"
    assert load_spec(spec_file, ["tracking.uri=sqlite:///here.db"]).tracking.uri == (
        f"sqlite:///{Path.cwd()}/here.db"
    )


@pytest.mark.parametrize(
    ("override", "attr", "expected"),
    [
        ("output_dir=mine", "output_dir", "{cwd}/mine"),
        ("output_dir=../elsewhere", "output_dir", "{tmp}/elsewhere"),
        ("output_dir={tmp}/abs", "output_dir", "{tmp}/abs"),
        ("output_dir=~/home-runs", "output_dir", "{tmp}/home-runs"),  # HOME is {tmp}: a shell's ~
        ("data.val.images=bccd/images", "data.val.images", "{bccd}/images"),
        (
            "data.val={images: bccd/images, annotations: bccd/annotations/instances_val.json}",
            "data.val.annotations",
            "{bccd}/annotations/instances_val.json",
        ),
    ],
)
def test_paths_given_with_set_resolve_against_the_current_directory(
    spec_file, monkeypatch, override, attr, expected
):
    tmp = spec_file.parent.parent
    cwd = tmp / "cwd"
    (cwd / "bccd").symlink_to(BCCD, target_is_directory=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(tmp))
    spec = load_spec(spec_file, [override.replace("{tmp}", str(tmp))])
    value = spec
    for part in attr.split("."):
        value = getattr(value, part)
    where = {"cwd": str(cwd.resolve()), "tmp": str(tmp.resolve()), "bccd": str(BCCD.resolve())}
    assert Path(value) == Path(expected.format(**where)).resolve()


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("model.weights", "DEFAULT", "DEFAULT"),
        ("model.weights", "none", "none"),
        ("model.weights", "models:/det/3", "models:/det/3"),
        ("model.weights_backbone", "https://example.org/w.pth", "https://example.org/w.pth"),
        ("model.weights", "base.pt", "{cwd}/base.pt"),
        ("model", {"arch": "x", "weights": "b/base.pt"}, {"arch": "x", "weights": "{cwd}/b/base.pt"}),
        ("tracking.uri", "sqlite:///m.db", "sqlite:///{cwd}/m.db"),
        ("tracking.uri", "sqlite:////abs/m.db", "sqlite:////abs/m.db"),
        ("tracking.uri", "sqlite:///:memory:", "sqlite:///:memory:"),
        ("tracking.uri", "http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("tracking", {"uri": "sqlite:///s/m.db"}, {"uri": "sqlite:///{cwd}/s/m.db"}),
        ("train.epochs", 3, 3),
        ("name", "runs", "runs"),
    ],
)
def test_from_cwd_touches_only_path_keys_and_files(tmp_path, monkeypatch, key, value, expected):
    monkeypatch.chdir(tmp_path)
    out = from_cwd(key, value)
    if isinstance(expected, dict):
        expected = {k: v.format(cwd=tmp_path) for k, v in expected.items()}
    elif isinstance(expected, str):
        expected = expected.format(cwd=tmp_path)
    assert out == expected


@pytest.mark.parametrize(
    ("override", "key", "words", "fix"),
    [  # said "input is not a valid path for <class 'pathlib.Path'>, but got None." without a fix
        ("output_dir=null", "output_dir", "must be a path, but got null.", "write a path"),
        ("data.train.images=null", "data.train.images", "must be a path, but got null.", "write a path"),
        # said "does not exist" of a path that exists but is the other kind
        ("data.train.images={ann}", "data.train.images", "is a file, but a folder of images", "folder"),
        ("data.val.annotations={bccd}", "data.val.annotations", "is a folder, but a COCO JSON", "JSON"),
        ("model.weights={bccd}", "model.weights", "is a folder, but a weights file is needed", "inside"),
        ("data.val.images={bccd}/none", "data.val.images", "does not exist", "folder"),
    ],
)
def test_a_bad_path_says_what_it_is_and_the_fix(spec_file, override, key, words, fix):
    ann = BCCD / ANN.removeprefix("data/bccd/") / "instances_train.json"
    with pytest.raises(SpecError) as err:
        load_spec(spec_file, [override.format(bccd=BCCD, ann=ann)])
    assert err.value.key == key and words in err.value.message and fix in err.value.fix, str(err.value)
    assert "<class" not in str(err.value)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("train.epochs=0", ["(--set train.epochs): train.epochs:", "Fix: raise"]),
        ("space.lr.low=1", ["(--set space.lr.low): space.lr: low < high"]),  # a rule of the entry above
        ("train.epochs=1e99", ["(--set train.epochs)", "Fix: use a whole number"]),  # no fix was given
    ],
)
def test_an_override_is_credited_with_the_refusal_it_caused(override, words):
    with pytest.raises(SpecError) as err:
        load_spec(ROOT / "spaces" / "det.yaml", [override], study=False)
    assert all(w in str(err.value) for w in words), str(err.value)
