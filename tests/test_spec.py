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

from search.space_parse import parse_space
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


@pytest.mark.parametrize(
    "override, expected",
    [
        # a float parameter with integer bounds is a float range (it sampled integers only)
        ("space.grad_clip={low: 1, high: 10}", FloatDistribution(1.0, 10.0)),
        # an int parameter with log: true stays int (it was refused as "float bounds")
        ("space.step_epochs={low: 1, high: 8, log: true}", IntDistribution(1, 8, log=True)),
        ("space.loss.weight.classification={low: 1, high: 3}", FloatDistribution(1.0, 3.0)),
    ],
)
def test_a_range_takes_the_parameters_own_type(override, expected):
    spec = load_spec(ROOT / "spaces" / "det.yaml", [override])
    name = override.split("=")[0].removeprefix("space.")
    assert spec.search_space.by_name[name].distribution() == expected


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
    ("bad-name", {"name": "a b"}, "name", "Fix: write e.g. 'a-b'"),
    ("number-as-name", {"name": 2024}, "name", "quote it as written (name: '...'"),
    ("bad-task", {"task": "classification"}, "task", "detection"),
    ("missing-arch", {"model.arch": _DELETE}, "model.arch", "required"),
    ("unknown-arch", {"model.arch": "ssdlite320_mobilenet_v3_larg"}, "model.arch", "did you mean"),
    ("arch-wrong-task", {"model.arch": "lraspp_mobilenet_v3_large"}, "model.arch", "semantic_segmentation"),
    ("unknown-top-key", {"trian": {"epochs": 2}}, "trian", "did you mean 'train'"),
    ("unknown-train-key", {"train.epoch": 2}, "train.epoch", "did you mean 'epochs'"),
    ("epochs-zero", {"train.epochs": 0}, "train.epochs", "greater than or equal"),
    ("reduction-factor-inf", {"search.reduction_factor": float("inf")}, "search.reduction_factor", "finite"),
    ("epochs-text", {"train.epochs": "three"}, "train.epochs", "integer"),
    ("epochs-boolean", {"train.epochs": True}, "train.epochs", "a number, but got true"),  # ran 1 epoch
    ("gpu-boolean", {"resources.gpu": False}, "resources.gpu", "not read as 1 and 0"),  # was 0 GPUs
    ("sqlite-no-file", {"tracking.uri": "sqlite:///"}, "tracking.uri", "must name a SQLite file"),  # said '.'
    ("batch-negative", {"train.batch_size": -1}, "train.batch_size", "greater than or equal"),
    ("bad-amp", {"train.amp": "fp8"}, "train.amp", "fp16"),
    ("bad-device", {"train.device": "tpu"}, "train.device", "cuda:N, but got 'tpu'. Fix: "),
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
    (
        "unknown-choice",
        {"space.optimizer": {"choices": ["sgd", "adam"]}},
        "space.optimizer",
        "Did you mean 'adamw'? Fix: use one of: adamw, sgd",
    ),
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
    ("box-loss-unsupported", {"space.loss.box": "focal"}, "space.loss.box", "use one of: ciou, default"),
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
        "max_concurrent >= the number of trials must hold, but got 2 < 8",
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


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("name: [unclosed\n", "is not valid YAML at line 2"),
        (None, "does not exist"),
        ("b: &b {seed: 3}\ntrain:\n  <<: *b\n", "train: uses a YAML merge key (<<) at line 3"),
        ("train: {<<: {seed: 3}, epochs: 2}\n", "Fix: write the keys out"),
    ],
)
def test_unreadable_spec_file_is_one_line(tmp_path, text, words):  # << : YAML 1.1 only, refused
    path = tmp_path / "spec.yaml"
    if text is not None:
        path.write_text(text)
    cmd = [sys.executable, "-m", "search", "validate", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and words in proc.stderr, proc.stderr


def test_bad_set_override(tmp_path):
    proc = _run_cli(tmp_path, spec_dict(), "--set", "train.epochs", "--quick")
    assert proc.returncode == 2 and "--set" in proc.stderr and "KEY=VALUE" in proc.stderr
    proc = _run_cli(tmp_path, spec_dict(), "--set", "train.epochs=0", "--quick")
    assert proc.returncode == 2 and "train.epochs" in proc.stderr


@pytest.mark.parametrize(
    "value", ["{low:1e-5,high:1e-2}", "{low: 1e-5,high:1e-2}"], ids=["no-spaces", "one-space"]
)
def test_flow_mapping_without_a_space_after_the_colon_says_so(tmp_path, value):
    proc = _run_cli(tmp_path, spec_dict(), "--set", f"space.lr={value}", "--quick")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "YAML needs a space after ':' (high: 1e-2)" in proc.stderr or "(low: 1e-5)" in proc.stderr


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
