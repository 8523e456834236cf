"""The experiment folder on disk: ``study.json`` (driver-side state) and finding a folder by name.

``study.json`` is written only by the launcher's driver-side callback, atomically (tmp file +
``os.replace``), so readers (``status``, tracking, selection) never see half a file. Its shape is
in DESIGN.md; this module adds nothing that needs Ray, Optuna or torch.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from search import guards
from trainables import params as trial_params
from trainables.files import better  # noqa: F401 (S.better: the one rule every surface uses)

# Result keys Ray adds to every report: not part of a trial's history.
RAY_KEYS = frozenset(
    (
        "training_iteration time_total_s episodes_total timesteps_total node_ip hostname pid "
        "time_this_iter_s timestamp date time_since_restore timesteps_since_restore "
        "iterations_since_restore config checkpoint_dir_name done trial_id experiment_tag "
        "should_checkpoint experiment_id node_id "
        "checkpoint_rank"  # ours: what Ray keeps a trial's checkpoint by (search.worker)
    ).split()
)
CHECKPOINT_RANK = "checkpoint_rank"

STUDY_FILE = "study.json"
SPEC_FILE = "spec.yaml"
SPACE_FILE = "space.json"
JOURNAL_FILE = "optuna.journal"
MODEL_FILE = "model.pt"  # the file inside each Ray checkpoint folder
BASE_EVAL_DIR = "base_eval"  # the shared epoch-0 base evaluations (trainables.base_eval)

# Trial states: one vocabulary in study.json, status, the summary and MLflow (Optuna's words).
# COMPLETE: ran every epoch; PRUNED: stopped early by the scheduler or the time budget; FAILED:
# diverged (non-finite loss) or raised, told apart by the trial's "failure" ("diverged" | "error");
# PENDING: not started, or unfinished when the study was interrupted (resume continues it).
PENDING, RUNNING, COMPLETE, PRUNED, FAILED = "PENDING", "RUNNING", "COMPLETE", "PRUNED", "FAILED"
STATES = (COMPLETE, PRUNED, FAILED, RUNNING, PENDING)
PAUSED = PENDING
DIVERGED, ERROR = "diverged", "error"  # the "failure" of a FAILED trial
FINISHED_STATES = (COMPLETE, PRUNED, FAILED)
ENDED_RUNS = (COMPLETE, PRUNED)  # the trials whose MLflow runs end FINISHED
# study.json files written before this vocabulary: state -> (state, failure)
_LEGACY = {
    "TERMINATED": (COMPLETE, None),
    "STOPPED": (PRUNED, None),
    "DIVERGED": (FAILED, DIVERGED),
    "ERROR": (FAILED, ERROR),
    "PAUSED": (PENDING, None),
}


def count_text(counts: dict[str, int]) -> str:
    """``6 trials: 2 complete, 4 pruned`` (states in :data:`STATES` order)."""
    n = sum(counts.values())
    parts = [f"{counts[k]} {k.lower()}" for k in STATES if counts.get(k)]
    return f"{n} trial{'s' if n != 1 else ''}" + (f": {', '.join(parts)}" if parts else "")


class ExperimentNotFound(Exception):
    """No experiment folder for a NAME (a user error: the CLI exits 2)."""


class StudyStarting(ExperimentNotFound):
    """A launch holds ``folder`` and has not yet written its study.json (``status`` says "starting")."""

    def __init__(self, folder: Path):
        super().__init__(
            f"{folder} holds no study yet: its launch is starting (Ray and the cluster check); wait."
        )
        self.folder = Path(folder)


class StudyFileError(ExperimentNotFound, ValueError):
    """A ``study.json`` that cannot be read (the CLI exits 2 naming the file). A ValueError, as the
    JSON error it replaces: readers that tolerate a bad file keep catching it."""


def resolve_experiment(name: str | Path, output_dir: Path | None = None) -> Path:
    """The experiment folder (holding ``study.json`` or ``spec.yaml``) for ``name``: with
    ``output_dir``, ``<output_dir>/<name>`` (or ``name`` itself when it is a path: it has a ``/``)
    only; without, the folder ``name`` or ``./runs/<name>``, refused when both are studies."""
    candidates = [Path(name), Path("runs") / str(name)]
    if output_dir is not None:
        candidates = candidates[:1] if os.sep in str(name) or Path(name).is_absolute() else []
        candidates.append(Path(output_dir) / str(name))
    found = [c.resolve() for c in candidates if (c / STUDY_FILE).is_file() or (c / SPEC_FILE).is_file()]
    if len(set(found)) > 1 and output_dir is None and os.sep not in str(name):  # neither is guessed
        raise ExperimentNotFound(f"both {found[0]} and {found[1]} hold a study: pass the path of one.")
    if found:
        return found[0]
    for cand in candidates:
        if guards.lock_held(cand):  # the lock alone: a launch starting
            raise StudyStarting(cand)
        if (cand / guards.LOCK_FILE).is_file():  # or killed then
            raise ExperimentNotFound(
                f"{cand} holds no study: its launch stopped before the study began (nothing to "
                "resume or show). Launch the spec again."
            )
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise ExperimentNotFound(
        f"no experiment {str(name)!r} (looked in: {tried}).{_studies_near(candidates)} Pass the "
        "experiment folder path, or --output-dir with the spec's output_dir."
    )


def _studies_near(candidates: list[Path]) -> str:
    """The studies in the folders the lookup tried (a misspelt name's likely meaning first)."""
    for cand in candidates:
        found = sorted(p.parent.name for p in cand.parent.glob(f"*/{STUDY_FILE}"))
        where = "" if cand.parent == Path(".") else f" in {cand.parent}"
        if close := difflib.get_close_matches(cand.name, found, n=1):
            return f" Did you mean {close[0]!r}{where}?"
        if found:
            return f" Studies{where}: {', '.join(found[:5])}{' ...' if len(found) > 5 else ''}."
    return ""


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:  # a full disk: no empty temporary file left behind (they piled up)
        tmp.unlink(missing_ok=True)


def json_safe(obj: Any) -> Any:
    """A JSON-safe copy: non-finite floats become strings, paths/other objects ``str``."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return json_safe(obj.item())
        except (TypeError, ValueError):
            pass
    return str(obj)


def read_study(exp_dir: Path) -> dict[str, Any]:
    """The parsed ``study.json`` of an experiment folder ({} when it does not exist yet)."""
    path = Path(exp_dir) / STUDY_FILE
    if not path.is_file():
        return {}
    try:
        # NaN/Infinity (never written: json_safe makes them null) read as null, so --json stays JSON
        state = json.loads(path.read_text(encoding="utf-8"), parse_constant=lambda _: None)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise StudyFileError(
            f"{path} is not a valid study file ({' '.join(str(exc).split())[:120]})."
        ) from None
    trials = state.get("trials", {}) if isinstance(state, dict) else None
    if not isinstance(trials, dict) or not all(isinstance(t, dict) for t in trials.values()):
        raise StudyFileError(
            f"{path} is not a valid study file (not a study.json mapping with 'trials', each a mapping)."
        )
    _check_trials(trials, path)
    here = Path(exp_dir).resolve()
    for tid, t in trials.items():
        if t.get("state") in _LEGACY:
            t["state"], failure = _LEGACY[t["state"]]
            if failure:
                t.setdefault("failure", failure)
        _rebase(t, here, f"trial_{tid}")
    return state


# a trial record's fields that the commands read, and their JSON types when not null
_TRIAL_FIELDS: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(("index", "epochs", "best_epoch"), (int,)),
    **dict.fromkeys(("state", "checkpoint", "latest_checkpoint", "trial_dir", "run_id"), (str,)),
    **dict.fromkeys(("params", "stopped"), (dict,)) | {"best_metric": (int, float), "history": (list,)},
}


def _check_trials(trials: dict[str, Any], path: Path) -> None:
    """Each trial names itself (or not: its key) and has the field types the launcher writes."""
    for tid, t in trials.items():
        wrong = (
            k
            for k, types in _TRIAL_FIELDS.items()
            if t.get(k) is not None and (isinstance(t[k], bool) or not isinstance(t[k], types))
        )
        bad = "id" if t.setdefault("id", tid) != tid else next(wrong, None)
        if bad is None and any(not isinstance(r, dict) for r in t.get("history") or []):
            bad = "history"
        if bad is not None:
            raise StudyFileError(
                f"{path} is not a valid study file (trial {str(tid)[:40]!r}: its {bad!r} is "
                f"{str(t.get(bad))[:40]!r}, not what the launcher writes)."
            )


_PATH_KEYS = ("trial_dir", "checkpoint", "latest_checkpoint")


def _rebase(trial: dict[str, Any], here: Path, folder: str) -> None:
    """A copied or moved study folder: the trial's paths, recorded under the folder it ran in
    (``<there>/<folder>/...``), made to point into ``here`` (so that best/export/promote read the
    copy's own checkpoints)."""
    for key in _PATH_KEYS:
        value = trial.get(key)
        if not isinstance(value, str) or not Path(value).is_absolute():
            continue
        parts = Path(value).parts
        i = max((k for k, part in enumerate(parts) if part == folder), default=None)
        if i is not None and Path(*parts[:i]) != here:
            trial[key] = str(here.joinpath(*parts[i:]))


def write_study(exp_dir: Path, state: dict[str, Any]) -> None:
    """Rewrite ``study.json`` atomically."""
    atomic_write_text(Path(exp_dir) / STUDY_FILE, json.dumps(json_safe(state), indent=1))


def new_study(name: str, metric: str, mode: str) -> dict[str, Any]:
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    return {
        "name": name,
        "metric": metric,
        "mode": mode,
        "base_metric": None,
        "status": "running",
        "started": now,
        "updated": now,
        "elapsed_s": 0.0,
        "trials": {},
    }


def number(value: Any) -> float | None:
    """``value`` as a finite float (ints, floats, 0-d tensors and numpy scalars), else None
    (booleans, text, NaN and infinities included). The one number reader of ``search``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if hasattr(value, "item") and callable(value.item):
            try:
                return number(value.item())
            except (TypeError, ValueError):
                return None
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# Trial parameters whose value changes the shape of a learning curve: trials are compared at a
# rung only with trials that agree on all of these (``loss.*`` choices count too).
STRUCTURAL = ("trainable", "trainable_k", "norm", "activation", "activation_scope", "optimizer")


def group_of(config: dict[str, Any]) -> str:
    """The structural group of a trial's parameters, e.g. ``optimizer=sgd,trainable=all``
    (``all trials`` when the space searches none of them); a key without effect in this
    configuration (``trainable_k`` unless ``backbone_last_k``, ``activation_scope`` under ``keep``)
    is left out."""
    acting = trial_params.in_effect(config)
    keys = sorted(
        k for k, v in acting.items() if k in STRUCTURAL or (k.startswith("loss.") and isinstance(v, str))
    )
    return ",".join(f"{k}={config[k]}" for k in keys) or "all trials"


def keeps_base(params: dict[str, Any]) -> bool:
    """Whether a trial starts from the base model as built: its epoch 0 is the base model's score.
    Activation swaps change the starting model's function; norm conversions, losses and freezing
    do not change its evaluation."""
    return (params or {}).get("activation", "keep") == "keep"


def _epoch0(t: dict[str, Any], metric: str | None) -> float | None:
    v = number(t.get("base_metric"))
    if v is None:
        row = next((r for r in t.get("history") or [] if r.get("epoch") == 0), None)
        v = number((row or {}).get(metric)) if metric else None
    return v


def study_base_metric(state: dict[str, Any]) -> float | None:
    """The study's base metric: the epoch-0 score of the unmodified base model, from a trial that
    keeps the architecture's activations (the reference trial does); when every trial of a finished
    study swapped activations, the best epoch-0 score over the trials (while a study runs or is
    interrupted, a plain trial may still come: None until then). One number for every surface: the
    summary, ``status``, ``best``, ``promote``, bundles and MLflow."""
    trials = state.get("trials") or {}
    trials = sorted(
        trials.values() if isinstance(trials, dict) else trials,
        key=lambda t: (t.get("index", 0), t.get("id", "")),
    )
    metric, mode = state.get("metric"), state.get("mode", "max")
    plain = [v for t in trials if keeps_base(t.get("params")) and (v := _epoch0(t, metric)) is not None]
    if plain:
        return plain[0]
    values = [v for t in trials if (v := _epoch0(t, metric)) is not None]
    if values and state.get("status") != "finished":
        return None
    if not values:
        return number(state.get("base_metric"))
    return max(values) if mode == "max" else min(values)


def best_trial(trials: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The trial with the best ``best_metric`` (diverged/errored trials never win; a tie: the first)."""
    top = ranked(trials, mode)
    return top[0] if top else None


def ranked(trials: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Trials with a best metric, best first (diverged/errored excluded); a tie goes to the first
    proposed (``index``), whatever order ``trials`` come in (the tracker's finish order, say)."""
    scored = [t for t in trials if t.get("state") != FAILED and number(t.get("best_metric")) is not None]
    sign = -1 if mode == "max" else 1
    return sorted(scored, key=lambda t: (sign * number(t["best_metric"]), t.get("index", 0), t.get("id", "")))


def reference_summary(state: dict[str, Any]) -> dict[str, Any] | None:
    """The reference trial (the family's torchvision recipe, the study's first trial) and how the
    study's best trial compares with it: ``{id, state, best_metric, best_epoch, best_vs_reference}``
    (positive = the best trial beats the recipe, whatever the mode); None without a reference."""
    trials = state.get("trials") or {}
    trials = trials.values() if isinstance(trials, dict) else trials
    ref = next((t for t in trials if t.get("reference")), None)
    if ref is None:
        return None
    mode = state.get("mode", "max")
    best = best_trial(list(trials), mode)
    value, top = number(ref.get("best_metric")), number((best or {}).get("best_metric"))
    if ref.get("state") == FAILED:  # diverged or errored: its values compare with nothing
        value = None
    return {
        "id": ref.get("id"),
        "state": ref.get("state"),
        "best_metric": value,
        "best_epoch": ref.get("best_epoch"),
        "best_vs_reference": gain(top, value, mode),
    }


def gain(value: float | None, base: float | None, mode: str) -> float | None:
    """How much ``value`` beats ``base`` (positive = better, whatever the mode); None without both."""
    if value is None or base is None:
        return None
    return value - base if mode == "max" else base - value


def reference_text(ref: dict[str, Any] | None, metric: str) -> str | None:
    """``reference trial (torchvision recipe) ID map50=0.5917; the best is +0.0114 over it``."""
    if ref and ref.get("state") == FAILED:
        return f"reference trial (torchvision recipe) {ref['id']} failed: no comparison with it"
    if not ref or number(ref.get("best_metric")) is None:
        return None
    vs = ref.get("best_vs_reference")
    return f"reference trial (torchvision recipe) {ref['id']} {metric}={fmt(ref['best_metric'])}" + (
        f"; the best is {fmt(vs, sign=True)} over it" if vs is not None else ""
    )


BACKGROUND_ONLY = (
    "found no foreground at its best epoch (foreground IoU 0: background only, or foreground in the "
    "wrong places): its score is the background's share"
)


def background_only(t: dict[str, Any]) -> bool:
    """A semantic-segmentation trial whose best epoch found no foreground pixel right (``fg_miou`` 0:
    background everywhere, or foreground only where there is none): its ``miou`` is the background
    class's IoU over the classes, not a segmenter's."""
    row = next((r for r in t.get("history") or [] if r.get("epoch") == t.get("best_epoch")), None)
    return row is not None and number(row.get("fg_miou")) == 0.0


def status_object(exp_dir: Path) -> dict[str, Any]:
    """The ``status --json`` object: study.json's fields, trials as a list in the order
    the searcher proposed them (the reference trial first), the best."""
    state, path = read_study(exp_dir), Path(exp_dir) / STUDY_FILE
    if not state and path.is_file():  # written (whole: os.replace) since it was read: read it
        state = read_study(exp_dir)
    if not state or not isinstance(state.get("metric"), str) or not isinstance(state.get("mode"), str):
        if path.is_file():
            raise StudyFileError(
                f"{path} is not a valid study file (no 'metric' or 'mode' as the launcher writes)."
            )
        if guards.lock_held(exp_dir):
            raise StudyStarting(exp_dir)
        raise ExperimentNotFound(
            f"{exp_dir} has no {STUDY_FILE} (its launch stopped before the study began)."
        )
    trials = sorted(state.get("trials", {}).values(), key=lambda t: (t.get("index", 0), t.get("id", "")))
    out = {k: v for k, v in state.items() if k != "trials"}
    out["experiment_dir"] = str(Path(exp_dir).resolve())
    first = ("id", "state", "epochs", "best_metric", "params", "checkpoint")
    out["trials"] = [
        {
            "id": t.get("id"),
            "state": t.get("state"),
            "epochs": t.get("epochs") or 0,
            "best_metric": t.get("best_metric"),
            "params": t.get("params", {}),
            "checkpoint": t.get("checkpoint"),
            **{k: v for k, v in t.items() if k not in first},
            **({"background_only": True} if background_only(t) else {}),
        }
        for t in trials
    ]
    if out.get("status") == "running" and guards.lock_holder_alive(exp_dir) is False:
        out["status"], out["process_gone"] = "interrupted", True  # killed: study.json had no say
    elif out.get("status") in ("interrupted", "finished") and guards.held_elsewhere(exp_dir):
        out["status"] = "running"  # a resume holds the study and has not yet started Ray's run
    out["base_metric"] = study_base_metric(state)
    out["best"] = best_trial(out["trials"], state.get("mode", "max"))
    out["reference"] = reference_summary(out)
    return out


def recipe_text(trial: dict[str, Any]) -> str | None:
    """What a recipe trial is, in words (``status``, ``best``); None for a searched trial."""
    if trial.get("reference"):
        rule = f", lr scaled to the batch by the {trial['recipe']} rule" if trial.get("recipe") else ""
        return f"reference trial (the architecture's torchvision recipe{rule})"
    if trial.get("recipe"):
        return f"the torchvision recipe, lr scaled to the batch by the {trial['recipe']} rule"
    return None


def stop_text(record: dict[str, Any], metric: str, mode: str = "max") -> str:
    """Why a trial stopped early, in words (progress line, ``status``, ``best``; ``mode`` min: above)."""
    value, cut = fmt(record.get("value")), fmt(record.get("cut"))
    below = "below" if mode == "max" else "above"
    where = f"stopped at epoch {record.get('epoch')} with {metric} {value}"
    rule, group = record.get("rule"), record.get("group")
    if rule == "time_budget":
        return f"{where}: the time budget ran out"
    if rule == "collapse":
        return f"{where}: collapsed, {below} {cut} (its own start, or half the reference trial's value then)"
    if rule == "extrapolation":
        return f"{where}: cannot catch up, its best recent gain kept up to the last epoch stays {below} {cut}"
    if rule == "halving":
        among = "all trials" if group == "all trials" else f"trials of its group ({group})"
        return f"{where}: {below} the rung's cut {cut} among {among}"
    return f"{where}: the {rule} rule" + (f" (cut {cut})" if record.get("cut") is not None else "")


def params_text(params: dict[str, Any]) -> str:
    """A trial's parameters as ``k=v`` words, numbers as :func:`fmt` writes them."""
    return " ".join(f"{k}={fmt(v)}" for k, v in params.items())


def fmt(value: Any, digits: int = 4, sign: bool = False) -> str:
    """A value for people: numbers to ``digits`` significant digits (``sign``: with + or -), ``-``
    for none (or NaN), anything else as text. The one number formatter of ``search``'s human
    output."""
    if value is None:
        return "-"
    v = number(value)
    if v is None or isinstance(value, bool):
        return "-" if isinstance(value, float) else str(value)
    if isinstance(value, int):
        return f"{value:+d}" if sign else str(value)
    return f"{v:+#.{digits}g}" if sign else f"{v:#.{digits}g}"


def dir_size(path: Path) -> int:
    """Bytes under ``path`` (0 when it does not exist)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
