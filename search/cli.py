"""``python -m search COMMAND``: the only place that chooses exit codes.

0 ok; 2 bad input (one line on stderr naming the key path, the value, the rule and the fix);
1 runtime failure; 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from search import study as S
from search.commands import Command, Parser, add_name_args, register, user_path
from search.errors import BadInput, SpecError
from search.failures import disk_full, exception_line
from search.schedulers import scheduler_label

EXIT_OK, EXIT_RUNTIME, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


# Exceptions from search.launcher / search.study that are user errors (exit 2), matched by name so
# that this module imports neither Ray nor the launcher for the other commands.
_USER_ERRORS = {"ClusterError", "ExperimentExists", "ExperimentNotFound"}  # and their subclasses
_RUNTIME_LINES = {"DiskFull", "FolderGone"}  # the launcher's runtime stops: what was kept, what next (exit 1)


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", type=user_path, help="the YAML spec file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec key (dotted; repeatable), e.g. --set train.epochs=2",
    )


def _add_keep_top(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--keep-top",
        type=int,
        default=None,
        metavar="K",
        help="at the end, delete the checkpoints of trials outside the top K",
    )


def _validate_args(p: argparse.ArgumentParser) -> None:
    _add_spec_args(p)
    p.add_argument("--quick", action="store_true", help="skip the checks that import torch")
    p.add_argument("--json", action="store_true", help="print the resolved spec and space as JSON")


def _trial_args(p: argparse.ArgumentParser) -> None:
    _add_spec_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument(
        "--out", type=user_path, default=None, help="trial folder (default <output_dir>/<name>/local/<time>)"
    )
    p.add_argument(
        "--weights-out",
        type=user_path,
        default=None,
        metavar="FILE",
        help="also write the best epoch's full weights as a plain state_dict (a base for other specs)",
    )
    p.add_argument("--half", action="store_true", help="with --weights-out: store floating tensors in fp16")


def _launch_args(p: argparse.ArgumentParser) -> None:
    _add_spec_args(p)
    p.add_argument("--name", default=None, help="experiment name (default: the spec's name)")
    p.add_argument("--address", default=None, help="join an existing Ray cluster (HOST:PORT or auto)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="build each branch's model, run one batch, print the plan and exit without training",
    )
    _add_keep_top(p)
    p.add_argument("--json", action="store_true", help="print the summary (or plan) as one JSON object")


def _status_args(p: argparse.ArgumentParser) -> None:
    add_name_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _resume_args(p: argparse.ArgumentParser) -> None:
    add_name_args(p)
    p.add_argument("--restart-errored", action="store_true", help="also restart errored trials from scratch")
    p.add_argument(
        "--trust-folder",
        action="store_true",
        help="resume even when the study folder or Ray's state files in it are writable by others",
    )
    p.add_argument("--address", default=None, help="join an existing Ray cluster (HOST:PORT or auto)")
    _add_keep_top(p)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command in :data:`COMMANDS` and ``commands_tracking.COMMANDS``."""
    from search.commands_tracking import COMMANDS as RESULT_COMMANDS  # best, promote, export, predict, ui

    parser = Parser(
        prog="search",
        description="Hyperparameter search for fine-tuning torchvision detection and segmentation models.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also print MLflow's, Ray's and this tool's INFO logs"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    register(sub, {**COMMANDS, **RESULT_COMMANDS})
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run a command; returns the exit code."""
    args = build_parser().parse_args(argv)
    if not args.verbose:  # MLflow configures its own loggers at import, from this variable
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)  # a busy store's tracebacks
    level = logging.INFO if getattr(args, "verbose_log", True) or args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except SpecError as err:
        print(f"error: {err.line()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BadInput as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `status ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:  # a runtime failure: one line, the traceback only on request
        if _USER_ERRORS & {c.__name__ for c in type(exc).__mro__}:  # errors the user fixes (exit 2)
            print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if os.environ.get("SEARCH_DEBUG"):
            raise
        if type(exc).__name__ in _RUNTIME_LINES:
            print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
            return EXIT_RUNTIME
        if (full := disk_full(exc)) is not None:
            print(
                f"error: {full.strerror} ({full.filename or 'a file'}): free some space, then run it again.",
                file=sys.stderr,
            )
            return EXIT_RUNTIME
        why = exception_line(exc)  # a database's error without its SQL, and never pages long
        print(f"error: {why} (set SEARCH_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_RUNTIME


def load(args: argparse.Namespace, deep: bool = True, study: bool = True):
    """The validated spec of a command's SPEC and --set arguments (deep: also torch checks;
    study=False: a single trial, the study's scheduling settings are not checked)."""
    from search.registry import resolve_spec_weights
    from search.spec import deep_check, load_spec

    spec = load_spec(args.spec, args.overrides, study=study)
    try:
        resolve_spec_weights(spec)  # models:/ and runs:/ weights: the local file, before any check of it
        if deep:
            deep_check(spec)
    except SpecError as err:
        raise err.with_source(str(args.spec)) from None
    return spec


def cmd_validate(args: argparse.Namespace) -> int:
    from search.registry import resolve_spec_weights
    from search.samplers import num_samples
    from search.spec import check_weights, deep_check, load_spec
    from search.spec.notes import spec_notes

    spec = load_spec(args.spec, args.overrides)
    facts: dict[str, Any] = {}
    if not args.quick:
        try:
            resolve_spec_weights(spec)  # models:/ and runs:/ weights, as launch resolves them
            facts = deep_check(spec)
            if spec.model.weights or spec.model.weights_backbone:
                check_weights(spec)  # what launch checks too: the file loads and the sets match it
        except SpecError as err:
            raise err.with_source(str(args.spec)) from None
    space = spec.search_space
    if args.json:
        out = {
            "spec": json.loads(spec.model_dump_json()),
            "space": space.describe(),
            "never_active": space.never_active(),  # searched, but their when cannot hold
            "num_classes": spec.num_classes,
            "class_names": spec.class_names,
            "notes": spec_notes(spec),
            **facts,
        }
        print(json.dumps(out, indent=2))
        return EXIT_OK
    names = f"{spec.num_classes} class{'es' if spec.num_classes != 1 else ''} ({', '.join(spec.class_names)})"
    print(f"ok: {args.spec} — {spec.task} with {spec.model.arch}, {names}")
    if facts:
        print(f"  model: {facts['parameters']:,} parameters in {facts['parameter_tensors']} tensors")
    idle = space.never_active()
    never = f" ({len(idle)} never active, their when cannot hold: {', '.join(idle)})" if idle else ""
    print(f"  space: {len(space.searched)} searched{never}, {len(space.dims) - len(space.searched)} fixed")
    for dim in space.dims:  # describe() holds the when condition
        print(f"    {dim.name}: {json.dumps(dim.describe(), default=str)}")
    s = spec.search
    print(
        f"  search: {s.algorithm} + {scheduler_label(s.scheduler)}, {num_samples(spec)} trials x "
        f"{spec.train.epochs} epochs, {s.max_concurrent} at a time"
    )
    for note in spec_notes(spec):
        print(f"  note: {note}")
    return EXIT_OK


def cmd_trial(args: argparse.Namespace) -> int:
    from search import guards
    from search.cluster import check_device
    from search.study_folder import TRIAL_RUNS
    from trainables import params as trial_params
    from trainables.trial import run_trial

    if args.half and not args.weights_out:
        raise BadInput(
            "--half: only with --weights-out (it stores those weights in fp16). Fix: add --weights-out FILE."
        )
    root = logging.getLogger()
    shown = root.level
    if not args.verbose:
        root.setLevel(logging.WARNING)
    try:  # the checks are quiet (the trial logs its data itself), so a refusal is one line
        spec = load(args, study=False)  # one trial, without Ray: no study settings
        inputs = guards.spec_inputs(spec)
        guards.check_output(args.weights_out, inputs, "--weights-out", folder=False)
        guards.check_weights_out(args.weights_out, spec.source)
        check_device(spec.train.device)
        guards.check_output(args.out, inputs, "--out", folder=True)
        _check_base_weights(spec, args.spec)  # exit 2 before the trial's folder exists
    finally:
        root.setLevel(shown)
    from search.spec.notes import spec_notes

    for note in spec_notes(spec, study=False):  # the base weights' and the data's (one trial: no study)
        print(f"note: {note}", file=sys.stderr)
    chosen = spec.search_space.defaults()
    out = args.out or spec.experiment_dir / TRIAL_RUNS / time.strftime("%Y%m%d-%H%M%S")
    cfg = spec.trial_config(out_dir=out.resolve(), threads=max(1, int(spec.resources.cpu)))
    _progress = _printer(args.json)
    result = run_trial(cfg, trial_params.resolve(chosen), report=_progress)
    if args.weights_out and result.get("status") == "ok":
        from search.spec.notes import weights_note
        from trainables.checkpoint import load_trained, save_weights

        model = load_trained(
            cfg, trial_params.resolve(chosen), spec.num_classes + 1, Path(result["checkpoint"])
        )
        result["weights_out"] = str(save_weights(model, args.weights_out, half=args.half))
        result["weights_note"] = weights_note(trial_params.resolve(chosen))  # what a state_dict cannot say
    if args.json:
        print(json.dumps(result, default=str))
    else:
        _print_trial(result, spec.objective.metric)
    return EXIT_OK if result.get("status") == "ok" else EXIT_RUNTIME


def _check_base_weights(spec: Any, source: Path) -> None:
    """``models:/`` and ``runs:/`` weights resolved, and the base weights loaded and fitted to the
    model (:func:`~search.spec.check_weights`), as launch checks them: a SpecError naming the key."""
    from search.registry import resolve_spec_weights
    from search.spec import check_weights

    try:
        resolve_spec_weights(spec)
        if spec.model.weights or spec.model.weights_backbone:
            check_weights(spec)
    except SpecError as err:
        raise err.with_source(str(source)) from None


# the metrics of a trial's progress lines
_SHOWN = frozenset("epoch map map50 mask_map miou fg_miou dice loss lr epoch_seconds diverged".split())


def _printer(quiet: bool) -> Callable[[dict, Any], None]:
    def report(metrics: dict, checkpoint: Any = None) -> None:
        if quiet:
            return
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items() if k in _SHOWN}
        print(f"  {shown}", file=sys.stderr, flush=True)

    return report


def _print_trial(result: dict, metric: str) -> None:
    print(f"status: {result.get('status')}")
    print(f"base model {metric} (epoch 0): {S.fmt(result.get('base_metric'))}")
    print(f"best {metric}: {S.fmt(result.get('best_metric'))} at epoch {result.get('best_epoch')}")
    print(f"trainable / frozen parameters: {result.get('trainable_params')} / {result.get('frozen_params')}")
    print(f"checkpoint: {result.get('checkpoint')}")
    if result.get("weights_out"):
        print(f"weights written: {result['weights_out']}")
        if result.get("weights_note"):
            print(f"note: {result['weights_note']}")


def cmd_launch(args: argparse.Namespace) -> int:
    _check_keep_top(args)
    spec = load(args)
    from search import dry_run, launcher

    if args.dry_run:
        plan = dry_run.launch_plan(spec, args.name, args.address, args.spec)
        if args.json:
            print(json.dumps(plan, default=str))
        else:
            dry_run.print_plan(plan)
        return EXIT_OK if all(b["status"] == "ok" for b in plan["branches"]) else EXIT_RUNTIME
    from search.launch_text import tolerant_output

    with tolerant_output(), _stdout_to_stderr(args.json):  # a reader gone: the study goes on
        summary = launcher.launch(spec, name=args.name, address=args.address, keep_top=args.keep_top)
    return _finish(summary, args.json)


def _check_keep_top(args: argparse.Namespace) -> None:
    if args.keep_top is not None and args.keep_top < 1:
        raise BadInput(
            f"--keep-top: must be >= 1 (the best trial keeps its checkpoint), but got {args.keep_top}. "
            "Fix: --keep-top 1 keeps only the best trial's checkpoint."
        )


def cmd_resume(args: argparse.Namespace) -> int:
    _check_keep_top(args)
    from search import launcher
    from search.study import resolve_experiment

    exp_dir = resolve_experiment(args.name, args.output_dir)
    if not args.trust_folder:
        from search.guards import check_folder_trust

        check_folder_trust(exp_dir)
    from search.launch_text import tolerant_output

    with tolerant_output(), _stdout_to_stderr(args.json):
        summary = launcher.resume(
            exp_dir,
            restart_errored=args.restart_errored,
            address=args.address,
            keep_top=args.keep_top,
            trust_folder=args.trust_folder,
        )
    return _finish(summary, args.json)


@contextlib.contextmanager
def _stdout_to_stderr(on: bool) -> Any:
    """With ``--json`` the header, progress and text summary go to stderr (file descriptor 1
    itself, so Ray's processes started meanwhile write there too) and stdout holds only the JSON."""
    if not on:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _finish(summary: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(summary, default=str))
    if summary.get("interrupted"):
        return EXIT_INTERRUPTED
    if summary.get("best") is not None:
        return EXIT_OK
    why = S.count_text(summary.get("counts") or {})  # every trial failed: a runtime failure's one line
    print(f"error: no trial produced a result ({why})", file=sys.stderr)
    return EXIT_RUNTIME


def _status_starting(folder: Path, as_json: bool) -> int:
    """``status`` of a study whose launch holds its folder and has not begun its first trial."""
    obj = dict.fromkeys(("metric", "mode", "base_metric", "best", "reference", "updated"))  # not known yet
    obj |= {"name": folder.name, "status": "starting", "experiment_dir": str(folder.resolve()), "trials": []}
    if as_json:
        print(json.dumps(obj))
    else:
        print(f"study {folder.name} (starting): no trials yet; its launch is starting Ray and the study")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from search.study import (
        count_text,
        human_bytes,
        reference_text,
        resolve_experiment,
        status_object,
        stop_text,
    )
    from search.study_folder import gone_text

    try:
        exp_dir = resolve_experiment(args.name, args.output_dir)
        obj = status_object(exp_dir)
    except S.StudyStarting as exc:  # a poll during the launch's first seconds is not an error
        return _status_starting(exc.folder, args.json)
    if args.json:
        print(json.dumps(obj, default=str))
        return EXIT_OK
    metric = obj["metric"]
    counts: dict[str, int] = {}
    for t in obj["trials"]:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    print(
        f"study {obj['name']} ({obj.get('status')}"
        + (f"; {gone_text(exp_dir)}" if obj.get("process_gone") else "")
        + f"): {count_text(counts)}"
        + (" (time budget reached)" if obj.get("budget_reached") else "")
        + f", objective {metric} "
        f"({obj['mode']}), base model {metric} {S.fmt(obj.get('base_metric'))}, "
        f"updated {obj.get('updated')}"
    )
    print(f"{'trial':<13} {'state':<10} {'epochs':>6} {'best':>9} {'disk':>9}  params / checkpoint")
    for t in obj["trials"]:
        params = S.params_text(t.get("params", {}))
        print(
            f"{t['id']:<13} {t['state'] or '-':<10} {t.get('epochs', 0):>6} {S.fmt(t.get('best_metric')):>9} "
            f"{human_bytes(t.get('disk_bytes')):>9}  {params}"
        )
        if t.get("checkpoint"):
            print(f"{'':<42}{t['checkpoint']}")
        if t.get("failure") == "diverged":
            print(f"{'':<42}failed: diverged (a non-finite loss)")
        elif t.get("error"):
            print(f"{'':<42}failed: {t['error']}")
        if note := S.recipe_text(t):
            print(f"{'':<42}{note}")
        if t.get("background_only"):
            print(f"{'':<42}{S.BACKGROUND_ONLY}")
        if t.get("stopped"):
            print(f"{'':<42}{stop_text(t['stopped'], metric, obj.get('mode', 'max'))}")
    best = obj.get("best")
    if best:
        print(
            f"best: {best['id']} {metric}={S.fmt(best['best_metric'])} at epoch {best.get('best_epoch')}, "
            f"checkpoint {best.get('checkpoint')}"
        )
    else:  # a study that ended without one has none to come (a resume with --restart-errored may)
        print(
            "best: none yet" if obj.get("status") != "finished" else "best: none (no trial produced a result)"
        )
    ref = reference_text(obj.get("reference"), metric)
    if ref:
        print(ref)
    return EXIT_OK


COMMANDS: dict[str, Command] = {
    "validate": Command(
        "check a spec (and its data and model) without running anything", _validate_args, cmd_validate
    ),
    "trial": Command("run ONE trial locally, without Ray", _trial_args, cmd_trial, verbose_log=True),
    "launch": Command(
        "run the study (Ray Tune + Optuna); Ctrl-C once stops gracefully", _launch_args, cmd_launch
    ),
    "status": Command("a study's trials from disk (during or after a run)", _status_args, cmd_status),
    "resume": Command("continue an interrupted study from its checkpoints", _resume_args, cmd_resume),
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
