"""Spec and search-space tests: YAML snippet → distribution, or → one-line error through the CLI."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from search.errors import SpecError
from search.space import parse_space
from search.spec import apply_override, build_spec, load_spec

ROOT = Path(__file__).resolve().parents[1]
BCCD = ROOT / "spaces" / "data" / "bccd"

BASE = {
    "name": "t",
    "task": "detection",
    "model": {"arch": "ssdlite320_mobilenet_v3_large", "weights": "none"},
    "data": {
        "train": {
            "images": str(BCCD / "images"),
            "annotations": str(BCCD / "annotations/instances_train.json"),
        },
        "val": {"images": str(BCCD / "images"), "annotations": str(BCCD / "annotations/instances_val.json")},
        "image_size": 128,
    },
    "train": {"epochs": 2, "batch_size": 2},
    "objective": {"metric": "map", "mode": "max"},
    "space": {
        "optimizer": {"choices": ["sgd", "adamw"]},
        "lr": {"low": 1e-4, "high": 1e-1, "log": True},
        "momentum": {"low": 0.8, "high": 0.99, "when": {"optimizer": "sgd"}},
    },
    "search": {"num_trials": 4, "max_concurrent": 2},
}


def spec_dict(**changes) -> dict:
    """BASE with dotted-key changes applied the way --set applies them (None deletes)."""
    raw = copy.deepcopy(BASE)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is _DELETE:
            parts = key.split(".")
            node = raw
            for part in parts[:-1]:
                node = node[part]
            del node[parts[-1]]
        else:
            apply_override(raw, key, value)
    return raw


_DELETE = object()


# ---------------------------------------------------------------- snippet → distribution

DISTRIBUTIONS = [
    ("lr: {low: 1.0e-4, high: 0.1, log: true}", "lr", FloatDistribution(1e-4, 0.1, log=True)),
    ("lr: {low: 0.001, high: 0.1}", "lr", FloatDistribution(0.001, 0.1)),
    ("lr: {low: 0.01, high: 0.1, step: 0.01}", "lr", FloatDistribution(0.01, 0.1, step=0.01)),
    ("step_epochs: {low: 1, high: 5}", "step_epochs", IntDistribution(1, 5)),
    ("step_epochs: {low: 1, high: 9, step: 2}", "step_epochs", IntDistribution(1, 9, step=2)),
    (
        "step_epochs: {type: int, low: 1, high: 64, log: true}",
        "step_epochs",
        IntDistribution(1, 64, log=True),
    ),
    ("weight_decay: {type: float, low: 0, high: 1}", "weight_decay", FloatDistribution(0.0, 1.0)),
    ("optimizer: {choices: [sgd, adamw]}", "optimizer", CategoricalDistribution(["sgd", "adamw"])),
    ("nesterov: {choices: [true, false]}", "nesterov", CategoricalDistribution([True, False])),
    ("loss.box: {choices: [smooth_l1, l1]}", "loss.box", CategoricalDistribution(["smooth_l1", "l1"])),
    ("schedule: cosine", "schedule", "cosine"),
    ("grad_clip: {value: 10.0}", "grad_clip", 10.0),
]


@pytest.mark.parametrize("snippet,name,expected", DISTRIBUTIONS, ids=[d[0] for d in DISTRIBUTIONS])
def test_snippet_gives_distribution(snippet, name, expected):
    space = parse_space(yaml.safe_load(snippet))
    dim = space.by_name[name]
    if isinstance(expected, (str, float)):  # a fixed constant: no distribution, the value kept
        assert dim.distribution() is None and dim.kind == "fixed" and dim.value == expected
    else:
        assert dim.distribution() == expected


def test_valid_base_spec_loads_and_resolves_paths():
    spec = build_spec(spec_dict(), ROOT)
    cats = json.loads((BCCD / "annotations/instances_train.json").read_text())["categories"]
    assert spec.num_classes == 3
    assert spec.class_names == [c["name"] for c in sorted(cats, key=lambda c: c["id"])]
    assert spec.data.train.images.is_absolute()
    assert [d.name for d in spec.search_space.searched] == ["optimizer", "lr", "momentum"]


def test_relative_paths_resolve_against_spec_folder(tmp_path):
    raw = spec_dict(**{"data.train.images": "data/bccd/images", "output_dir": "out"})
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bccd").symlink_to(BCCD)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec = load_spec(path)
    assert spec.data.train.images == (tmp_path / "data/bccd/images").resolve()
    assert spec.output_dir == tmp_path.resolve() / "out"


# ---------------------------------------------------------------- conditional sampling


COND_SPACE = {
    "optimizer": {"choices": ["sgd", "adamw"]},
    "momentum": {"low": 0.8, "high": 0.99, "when": {"optimizer": "sgd"}},
    "loss.cls": {"choices": ["ce", "focal"]},
    "loss.focal_gamma": {"low": 0.5, "high": 4.0, "when": {"loss.cls": "focal"}},
    "loss.focal_alpha": {"value": 0.25, "when": {"loss.cls": "focal"}},
    "lr": {"low": 1e-4, "high": 1e-1, "log": True},
}


def _samples(seed: int, n: int) -> list[dict]:
    space = parse_space(COND_SPACE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(space.sample(trial))
        study.tell(trial, 0.0)
    return out


def test_conditional_space_sampled_500_times():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    samples = _samples(0, 500)
    for s in samples:
        assert ("momentum" in s) == (s["optimizer"] == "sgd")
        assert ("loss.focal_gamma" in s) == (s["loss.cls"] == "focal")
        assert ("loss.focal_alpha" in s) == (s["loss.cls"] == "focal")
        if "momentum" in s:
            assert 0.8 <= s["momentum"] <= 0.99
    # every branch was visited
    assert {s["optimizer"] for s in samples} == {"sgd", "adamw"}
    assert {s["loss.cls"] for s in samples} == {"ce", "focal"}


def test_same_seed_same_samples():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    assert _samples(7, 30) == _samples(7, 30)
    assert _samples(7, 30) != _samples(8, 30)


def test_define_by_run_returns_constants_only_when_active():
    space = parse_space(COND_SPACE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(50):
        trial = study.ask()
        constants = space.define_by_run(trial)
        assert set(constants) <= {"loss.focal_alpha"}
        assert ("loss.focal_alpha" in constants) == (trial.params["loss.cls"] == "focal")
        study.tell(trial, 0.0)


def test_defaults_respect_conditions():
    space = parse_space(COND_SPACE)
    d = space.defaults()
    assert d["optimizer"] == "sgd" and d["momentum"] == pytest.approx((0.8 + 0.99) / 2)
    assert d["loss.cls"] == "ce" and "loss.focal_gamma" not in d
    assert d["lr"] == pytest.approx((1e-4 * 1e-1) ** 0.5)


def test_branch_configs_cover_every_choice():
    space = parse_space(COND_SPACE)
    configs = space.branch_configs()
    assert {c["optimizer"] for c in configs} == {"sgd", "adamw"}
    assert {c["loss.cls"] for c in configs} == {"ce", "focal"}
    assert any("loss.focal_gamma" in c for c in configs)


def test_set_fixes_a_parameter_and_keeps_its_condition():
    raw = spec_dict(**{"space.momentum": 0.9, "space.lr.low": 0.001})
    spec = build_spec(raw, ROOT)
    dim = spec.search_space.by_name["momentum"]
    assert dim.kind == "fixed" and dim.value == 0.9 and dim.when == {"optimizer": ("sgd",)}
    assert spec.search_space.by_name["lr"].low == 0.001


def test_pinned_parent_deactivates_dependent():
    spec = build_spec(spec_dict(**{"space.optimizer": "adamw"}), ROOT)
    assert "momentum" not in spec.search_space.defaults()
    assert spec.search_space.defaults()["optimizer"] == "adamw"


def test_set_dotted_parameter_name():
    raw = spec_dict(**{"space.loss.box": "giou"})
    assert raw["space"]["loss.box"] == "giou"


# ---------------------------------------------------------------- invalid specs through the CLI

INVALID = [
    # (id, changes, key path expected in the message, extra text expected)
    ("missing-name", {"name": _DELETE}, "name", "required"),
    ("bad-name", {"name": "a b"}, "name", "letters"),
    ("bad-task", {"task": "classification"}, "task", "detection"),
    ("missing-arch", {"model.arch": _DELETE}, "model.arch", "required"),
    ("unknown-arch", {"model.arch": "ssdlite320_mobilenet_v3_larg"}, "model.arch", "did you mean"),
    ("arch-wrong-task", {"model.arch": "lraspp_mobilenet_v3_large"}, "model.arch", "semantic_segmentation"),
    ("unknown-top-key", {"trian": {"epochs": 2}}, "trian", "did you mean 'train'"),
    ("unknown-train-key", {"train.epoch": 2}, "train.epoch", "did you mean 'epochs'"),
    ("epochs-zero", {"train.epochs": 0}, "train.epochs", "greater than or equal"),
    ("epochs-text", {"train.epochs": "three"}, "train.epochs", "integer"),
    ("batch-negative", {"train.batch_size": -1}, "train.batch_size", "greater than or equal"),
    ("bad-amp", {"train.amp": "fp8"}, "train.amp", "fp16"),
    ("bad-device", {"train.device": "tpu"}, "train.device", "cuda:N"),
    ("image-size-small", {"data.image_size": 8}, "data.image_size", "32"),
    ("missing-images", {"data.train.images": "/nonexistent/images"}, "data.train.images", "does not exist"),
    (
        "missing-annotations",
        {"data.val.annotations": "/nonexistent/a.json"},
        "data.val.annotations",
        "does not exist",
    ),
    ("bad-metric", {"objective.metric": "miou"}, "objective.metric", "map"),
    ("bad-mode", {"objective.mode": "maximize"}, "objective.mode", "max"),
    ("low-ge-high", {"space.lr": {"low": 0.1, "high": 0.01}}, "space.lr", "low < high must hold"),
    ("log-nonpositive", {"space.lr": {"low": 0.0, "high": 0.1, "log": True}}, "space.lr.low", "low > 0"),
    ("empty-choices", {"space.optimizer": {"choices": []}}, "space.optimizer.choices", "non-empty"),
    ("dup-choices", {"space.optimizer": {"choices": ["sgd", "sgd"]}}, "space.optimizer.choices", "twice"),
    (
        "unknown-param",
        {"space.learning_rate": {"low": 0.1, "high": 1.0}},
        "space.learning_rate",
        "trial parameter",
    ),
    ("unknown-choice", {"space.optimizer": {"choices": ["sgd", "adam"]}}, "space.optimizer", "adamw"),
    (
        "when-unknown",
        {"space.momentum": {"low": 0.8, "high": 0.9, "when": {"optimiser": "sgd"}}},
        "space.momentum.when.optimiser",
        "did you mean 'optimizer'",
    ),
    (
        "when-impossible",
        {"space.momentum": {"low": 0.8, "high": 0.9, "when": {"optimizer": "adam"}}},
        "space.momentum.when.optimizer",
        "never",
    ),
    (
        "when-cycle",
        {
            "space.trainable": {"choices": ["all", "heads"], "when": {"activation": "silu"}},
            "space.activation": {"choices": ["keep", "silu"], "when": {"trainable": "all"}},
        },
        "when",
        "cycle",
    ),
    ("when-self", {"space.lr": {"low": 0.1, "high": 0.2, "when": {"lr": 0.1}}}, "space.lr.when.lr", "itself"),
    ("bare-list", {"space.optimizer": ["sgd", "adamw"]}, "space.optimizer", "choices"),
    (
        "unknown-space-key",
        {"space.lr": {"low": 0.1, "high": 0.2, "logs": True}},
        "space.lr.logs",
        "did you mean 'log'",
    ),
    ("lr-out-of-range", {"space.lr": {"low": -1.0, "high": 0.1}}, "space.lr", "> 0.0"),
    ("momentum-above-1", {"space.momentum": 1.5}, "space.momentum", "<= 1.0"),
    ("box-loss-unsupported", {"space.loss.box": "focal"}, "space.loss.box", "must be one of"),
    ("seg-loss-on-detection", {"space.loss.seg": "dice"}, "space.loss.seg", "does not apply"),
    ("loss-term-unknown", {"space.loss.weight.loss_mask": 2.0}, "space.loss.weight.loss_mask", "loss term"),
    (
        "trainable-unknown",
        {"space.trainable": "backbone_only"},
        "space.trainable",
        "cannot use trainable set",
    ),
    (
        "int-param-float-bounds",
        {"space.step_epochs": {"low": 1.5, "high": 3.5}},
        "space.step_epochs",
        "integer",
    ),
    ("bad-algorithm", {"search.algorithm": "bayes"}, "search.algorithm", "tpe"),
    ("bad-scheduler", {"search.scheduler": "pbt"}, "search.scheduler", "asha"),
    (
        "hyperband-limited",
        {"search.scheduler": "hyperband", "search.num_trials": 8, "search.max_concurrent": 2},
        "search.max_concurrent",
        "max_concurrent >= num_trials must hold, but got 2 < 8",
    ),
    ("scaling-unknown", {"search.reference_scaling": ["cube"]}, "search.reference_scaling[0]", "sqrt"),
    ("scaling-twice", {"search.reference_scaling": ["sqrt", "sqrt"]}, "search.reference_scaling[1]", "once"),
    ("scaling-empty", {"search.reference_scaling": []}, "search.reference_scaling", "at least one"),
    ("num-trials-zero", {"search.num_trials": 0}, "search.num_trials", "greater than or equal"),
    ("grace-gt-epochs", {"search.grace_period": 5}, "search.grace_period", "grace_period <= train.epochs"),
    ("bad-time-budget", {"search.time_budget": "soon"}, "search.time_budget", "duration"),
    ("grid-needs-steps", {"search.algorithm": "grid"}, "space.lr", "grid"),
    ("cpu-zero", {"resources.cpu": 0}, "resources.cpu", "greater than"),
    ("weights-missing-file", {"model.weights": "/nonexistent/w.pt"}, "model.weights", "does not exist"),
    (
        "weights-registry-unknown",
        {"model.weights": "models:/no-such-model@champion", "output_dir": "no-store"},
        "model.weights",
        "does not exist",
    ),
    ("weights-remote", {"model.weights": "https://example.invalid/w.pt"}, "model.weights", "not supported"),
    ("section-not-mapping", {"train": 5}, "train", "mapping"),
]


def _run_cli(tmp_path: Path, raw: dict, *extra: str) -> subprocess.CompletedProcess:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return subprocess.run(
        [sys.executable, "-m", "search", "validate", str(path), *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


@pytest.mark.parametrize("case", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_spec_exits_2_with_one_line(tmp_path, case):
    _, changes, key, text = case
    proc = _run_cli(tmp_path, spec_dict(**changes))
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert key in lines[0] and text.lower() in lines[0].lower(), lines[0]


def test_invalid_cases_are_distinct_breakages_of_a_valid_spec():
    """A sample, not a count: the base every case edits is valid (so each refusal comes from the
    case's own change), every case's spec differs from the base and from every other case's, and
    the expected refusals name at least 30 different (key, text) pairs over 8 or more sections."""
    build_spec(spec_dict(), ROOT)  # the base loads: no case is refused for the base's sake
    base = json.dumps(spec_dict(), sort_keys=True, default=str)
    specs = {c[0]: json.dumps(spec_dict(**c[1]), sort_keys=True, default=str) for c in INVALID}
    assert len(specs) == len(INVALID), "duplicate case ids"
    assert [cid for cid, text in specs.items() if text == base] == [], "cases that change nothing"
    same = {text for text in specs.values() if list(specs.values()).count(text) > 1}
    assert not same, [cid for cid, text in specs.items() if text in same]
    assert len({(key, text.lower()) for _, _, key, text in INVALID}) >= 30
    sections = {key.split(".")[0] for _, _, key, _ in INVALID}
    assert len(sections) >= 8, sorted(sections)


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    proc = subprocess.run(
        [sys.executable, "-m", "search", "validate", str(bad)], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 2 and "at line" in proc.stderr and len(proc.stderr.splitlines()) == 1
    proc = subprocess.run(
        [sys.executable, "-m", "search", "validate", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_bad_set_override(tmp_path):
    proc = _run_cli(tmp_path, spec_dict(), "--set", "train.epochs", "--quick")
    assert proc.returncode == 2 and "--set" in proc.stderr and "KEY=VALUE" in proc.stderr
    proc = _run_cli(tmp_path, spec_dict(), "--set", "train.epochs=0", "--quick")
    assert proc.returncode == 2 and "train.epochs" in proc.stderr


SCIENTIFIC = [
    # (YAML text, the value it must give): YAML 1.2 floats, where PyYAML's YAML 1.1 gives strings
    ("1e-4", 1e-4),
    ("-3E+2", -300.0),
    ("2.5e-3", 2.5e-3),
    (".5e-2", 0.005),
    ("10", 10),
    ("1e", "1e"),
    ("v1e3", "v1e3"),
    ("'1e-4'", "1e-4"),
]


@pytest.mark.parametrize(("text", "value"), SCIENTIFIC, ids=[t for t, _ in SCIENTIFIC])
def test_scientific_notation_is_a_number(text, value):
    """``lr: 1e-4`` in a spec and ``--set space.lr=1e-3`` are numbers (PyYAML alone makes them
    strings, and the spec then refused them as "must be a number")."""
    from search.spec.load import parse_override

    key, got = parse_override(f"space.lr={text}")
    assert key == "space.lr" and got == value and type(got) is type(value)


def test_spec_file_and_set_accept_1e_minus_4(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump(spec_dict()).replace("low: 0.0001", "low: 1e-4").replace("high: 0.1", "high: 1e-1")
    )
    assert "low: 1e-4" in path.read_text() and "high: 1e-1" in path.read_text()
    spec = load_spec(path, ["space.weight_decay=4e-5"])
    lr = spec.search_space.by_name["lr"]
    assert (lr.low, lr.high) == (1e-4, 1e-1)
    assert spec.search_space.by_name["weight_decay"].value == 4e-5
    proc = _run_cli(tmp_path, spec_dict(), "--set", "space.lr=3e-3", "--quick")
    assert proc.returncode == 0, proc.stderr
    assert '"value": 0.003' in proc.stdout and "auto (curve)" in proc.stdout


def test_quick_validation_does_not_import_torch():
    code = (
        "import sys; from search.spec import build_spec; from tests.test_spec import spec_dict, ROOT; "
        "build_spec(spec_dict(), ROOT); print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_error_object_names_source():
    with pytest.raises(SpecError) as info:
        load_spec(ROOT / "spaces" / "det.yaml", ["train.epochs=-3"])
    assert "det.yaml" in str(info.value) and "train.epochs" in str(info.value)


# ---------------------------------------------------------------- deep checks (torch)


def test_deep_check_freeze_pattern_matching_nothing(tmp_path):
    raw = spec_dict(
        **{"model.trainable_sets": {"mine": ["head.*", "nothing.matches.*"]}, "space.trainable": "mine"}
    )
    proc = _run_cli(tmp_path, raw)
    assert proc.returncode == 2, proc.stderr
    assert "model.trainable_sets.mine" in proc.stderr and "nothing.matches" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_deep_check_unknown_weight_enum(tmp_path):
    proc = _run_cli(tmp_path, spec_dict(**{"model.weights": "COCO_V2"}))
    assert proc.returncode == 2 and "model.weights" in proc.stderr and "COCO_V1" in proc.stderr


@pytest.mark.parametrize("name", ["det.yaml", "seg.yaml", "inst.yaml"])
def test_bundled_specs_validate(name):
    path = ROOT / "spaces" / name
    if not path.exists():
        pytest.fail(f"{path} is missing")
    proc = subprocess.run(
        [sys.executable, "-m", "search", "validate", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok:")


# ---------------------------------------------------------------- model.kwargs: no silently ignored key

SEMANTIC_CHANGES = {"task": "semantic_segmentation", "objective.metric": "miou"}
COMPOSED_MODEL = {"arch": "fasterrcnn", "backbone": "mobilenet_v3_small", "weights": "none"}


def _kwargs_spec(arch: str, kwargs: dict):
    """The base spec with ``model.arch``/``model.kwargs`` set (semantic task for semantic archs,
    a composition over mobilenet_v3_small for ``fasterrcnn``)."""
    from trainables import families

    changes = SEMANTIC_CHANGES if families.family_of(arch).task == families.SEMANTIC else {}
    raw = spec_dict(**changes)
    raw["model"] = {**COMPOSED_MODEL} if arch == "fasterrcnn" else {"arch": arch, "weights": "none"}
    raw["model"]["kwargs"] = kwargs
    return build_spec(raw, ROOT)


KWARGS_REFUSED = [
    # (arch, kwargs, key path, text in the message); silently ignored keys -> model.kwargs.<key>
    ("ssdlite320_mobilenet_v3_large", {"min_sise": 320}, "model.kwargs.min_sise", "ignore it silently"),
    (
        "ssdlite320_mobilenet_v3_large",
        {"score_tresh": 0.2},
        "model.kwargs.score_tresh",
        "Did you mean 'score_thresh'",
    ),
    ("ssdlite320_mobilenet_v3_large", {"dropout": 0.1}, "model.kwargs.dropout", "ignore it silently"),
    (
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        {"min_sise": 320},
        "model.kwargs.min_sise",
        "Did you mean 'min_size'",
    ),
    (
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        {"min_size": 320, "box_detections_per_im": 50},
        "model.kwargs.box_detections_per_im",
        "Did you mean 'box_detections_per_img'",
    ),
    (
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        {"anchor_generator": None},
        "model.kwargs.anchor_generator",
        "does not take 'anchor_generator'",
    ),
    ("maskrcnn_resnet50_fpn", {"mask_thresh": 0.5}, "model.kwargs.mask_thresh", "ignore it silently"),
    (
        "retinanet_resnet50_fpn",
        {"score_threshold": 0.1},
        "model.kwargs.score_threshold",
        "Did you mean 'score_thresh'",
    ),
    ("lraspp_mobilenet_v3_large", {"aux_los": False}, "model.kwargs.aux_los", "Did you mean 'aux_loss'"),
    (
        "deeplabv3_mobilenet_v3_large",
        {"output_stride": 8},
        "model.kwargs.output_stride",
        "use one of: aux_loss.",
    ),
    (
        "fasterrcnn",
        {"box_detections_per_im": 50},
        "model.kwargs.box_detections_per_im",
        "Did you mean 'box_detections_per_img'",
    ),
    # keys the chain does receive but refuses loudly: the build's own message, as before
    ("ssdlite320_mobilenet_v3_large", {"min_size": 320}, "model.kwargs", "multiple values for argument"),
    ("lraspp_mobilenet_v3_large", {"aux_loss": True}, "model.kwargs", "does not use auxiliary loss"),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", {"num_classes": 5}, "model.kwargs", "must not set"),
    ("fasterrcnn", {"rpn_anchor_generator": 1}, "model.kwargs", "must not set"),
]


@pytest.mark.parametrize(
    "arch,kwargs,key,text", KWARGS_REFUSED, ids=[f"{c[0]}-{next(iter(c[1]))}" for c in KWARGS_REFUSED]
)
def test_model_kwargs_refused(arch, kwargs, key, text):
    from search.spec import deep_check

    with pytest.raises(SpecError) as err:
        deep_check(_kwargs_spec(arch, kwargs))
    assert err.value.key == key and text in str(err.value), str(err.value)
    if key != "model.kwargs":
        assert f"{arch} does not take {key.rsplit('.', 1)[1]!r}" in err.value.message
        assert err.value.fix.startswith("use one of: ")
        assert len(str(err.value).splitlines()) == 1


KWARGS_ACCEPTED = [
    # (arch, kwargs, {module attribute path: value the skeleton must show}: the key is really used)
    (
        "ssdlite320_mobilenet_v3_large",
        {"score_thresh": 0.2, "detections_per_img": 50},
        {"score_thresh": 0.2, "detections_per_img": 50},
    ),
    ("ssdlite320_mobilenet_v3_large", {"width_mult": 0.5}, {}),
    (
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        {"box_detections_per_img": 50, "rpn_pre_nms_top_n_test": 100, "min_size": 320},
        {
            "roi_heads.detections_per_img": 50,
            "rpn._pre_nms_top_n": {"training": 2000, "testing": 100},
            "transform.min_size": (320,),
        },
    ),
    (
        "maskrcnn_resnet50_fpn",
        {"box_score_thresh": 0.1, "size_divisible": 16, "min_size": 256},
        {"roi_heads.score_thresh": 0.1, "transform.size_divisible": 16},
    ),
    ("fcos_resnet50_fpn", {"center_sampling_radius": 2.0}, {"center_sampling_radius": 2.0}),
    ("lraspp_mobilenet_v3_large", {"aux_loss": False}, {}),
    ("deeplabv3_mobilenet_v3_large", {"aux_loss": True}, {}),
    ("fasterrcnn", {"min_size": 128, "box_nms_thresh": 0.4}, {"roi_heads.nms_thresh": 0.4}),
]


@pytest.mark.parametrize(
    "arch,kwargs,expected", KWARGS_ACCEPTED, ids=[f"{c[0]}-{'-'.join(c[1])}" for c in KWARGS_ACCEPTED]
)
def test_model_kwargs_accepted_and_used(arch, kwargs, expected):
    from search.spec import deep_check
    from trainables import builder_kwargs, models

    spec = _kwargs_spec(arch, kwargs)
    assert deep_check(spec)["parameters"] > 0
    assert set(kwargs) <= builder_kwargs.accepted_kwargs(arch)
    sk = models.skeleton(arch, 3, spec.model.model_kwargs())
    for path, value in expected.items():
        obj = sk
        for part in path.split("."):
            obj = getattr(obj, part)
        assert obj == value, path


def _supported_archs() -> list[str]:
    import torchvision

    from trainables import families

    builders = [b for b in torchvision.models.list_models() if families.family_of(b) is not None]
    return sorted({*families.all_archs(), *builders, *families.composed_archs()})


def _chain_parameters(arch: str) -> set[str]:
    """Every named parameter anywhere in ``arch``'s chain, collected independently of
    trainables.models: the builder (or composed head class), every detection class in the MRO of
    the built class, the transform, and for ssdlite the MobileNetV3 backbone's constructors."""
    import inspect

    import torchvision
    from torch import nn
    from torchvision.models import mobilenetv3
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    heads = {
        "fasterrcnn": torchvision.models.detection.FasterRCNN,
        "maskrcnn": torchvision.models.detection.MaskRCNN,
        "retinanet": torchvision.models.detection.RetinaNet,
        "fcos": torchvision.models.detection.FCOS,
    }
    fns: list = [GeneralizedRCNNTransform.__init__]
    if arch in heads:
        cls = heads[arch]
    else:
        builder = torchvision.models.get_model_builder(arch)
        fns.append(builder)
        cls = inspect.signature(builder).return_annotation
    fns += [c.__init__ for c in cls.__mro__ if issubclass(c, nn.Module) and "__init__" in c.__dict__]
    if arch.startswith("ssdlite"):
        fns += [mobilenetv3._mobilenet_v3_conf, mobilenetv3.MobileNetV3.__init__]
    return {name for fn in fns for name in inspect.signature(fn).parameters}


def test_accepted_kwargs_conformance_every_arch():
    import inspect

    from torchvision.models import get_model_builder

    from trainables import builder_kwargs, families

    archs = _supported_archs()
    assert len(archs) >= 20
    for arch in archs:
        accepted = builder_kwargs.accepted_kwargs(arch)
        assert accepted is None or (isinstance(accepted, frozenset) and accepted), arch
        if accepted is None:
            continue
        assert not accepted & {
            "weights",
            "weights_backbone",
            "num_classes",
            "progress",
            "compose",
            "self",
            "args",
            "kwargs",
        }, arch
        fam = families.family_of(arch)
        if fam.task == families.SEMANTIC:  # builders forward nothing; compositions take only aux_loss
            own = set() if fam.composed else set(inspect.signature(get_model_builder(arch)).parameters)
            assert accepted <= own | {"aux_loss"}, arch  # lraspp pops aux_loss from its **kwargs
        else:
            invented = accepted - _chain_parameters(arch)
            assert not invented, f"{arch}: {sorted(invented)} are no parameter of its chain"
            assert {"min_size", "max_size", "image_mean"} & accepted, arch
        assert builder_kwargs.ignored_kwargs(arch, dict.fromkeys(accepted)) == [], arch
        assert builder_kwargs.ignored_kwargs(arch, {"no_such_key": 1}) == ["no_such_key"], arch
    assert builder_kwargs.accepted_kwargs("resnet50") is None


ACTIVATION_SCOPE_CASES = [
    # (arch, space entries, refused key or None)
    (
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        {"activation": {"choices": ["keep", "silu"]}, "activation_scope": "neck"},
        "space.activation_scope",
    ),
    (
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        {"activation": "silu", "activation_scope": {"choices": ["heads", "neck"]}},
        "space.activation_scope",
    ),
    (
        "lraspp_mobilenet_v3_large",
        {"activation": "gelu", "activation_scope": "neck"},
        "space.activation_scope",
    ),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", {"activation": "keep", "activation_scope": "neck"}, None),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", {"activation": "silu", "activation_scope": "backbone"}, None),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", {"activation": {"choices": ["keep", "silu"]}}, None),  # heads
    ("ssdlite320_mobilenet_v3_large", {"activation": "silu", "activation_scope": "neck"}, None),
    ("deeplabv3_mobilenet_v3_large", {"activation": "silu", "activation_scope": "neck"}, None),  # ASPP
]


@pytest.mark.parametrize(
    "arch,space,key",
    ACTIVATION_SCOPE_CASES,
    ids=[f"{c[0].split('_')[0]}-{i}" for i, c in enumerate(ACTIVATION_SCOPE_CASES)],
)
def test_activation_scope_without_activations_is_refused(arch, space, key):
    """A scope in which the architecture has no activation module makes activation choices
    silent no-ops (neck on FPN families, fcn, lraspp): refused before launch."""
    from search.spec import deep_check

    raw = spec_dict(**(SEMANTIC_CHANGES if arch.startswith(("lraspp", "deeplabv3")) else {}))
    raw["model"] = {"arch": arch, "weights": "none"}
    raw["space"] = {**raw["space"], **space}
    spec = build_spec(raw, ROOT)
    if key is None:
        deep_check(spec)
        return
    with pytest.raises(SpecError) as err:
        deep_check(spec)
    assert err.value.key == key and "holds no activation module" in err.value.message, str(err.value)
    assert "'neck'" in err.value.message and "'backbone'" in err.value.fix and "'neck'" not in err.value.fix
