"""What runs inside a Ray worker: :func:`train_trial`, the function trainable of one trial, which
calls ``trainables.trial.run_trial`` and hands each epoch's ``latest.pt`` to Ray as a checkpoint
(one file, ``model.pt``); and the marking of an error raised by a trial's own code
(:data:`ERROR_MARK`), so that Ray's retry does not run it again."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

import yaml

from search import study as S
from search.failures import ERROR_MARK, disk_full

log = logging.getLogger(__name__)

TEST_FAIL_ENV = "SEARCH_TEST_FAIL_WHEN"  # test hook: "param>value" / "param<value" / "param=value"


class TrialError(RuntimeError):
    """A retry of a trial whose own code raised: not run again (it would fail the same way)."""


def _fail_hook(rule: str | None, params: dict[str, Any]) -> bool:
    """Whether the test hook rule (``lr>0.05``) matches these params."""
    if not rule:
        return False
    for op in (">", "<", "="):
        if op in rule:
            name, _, raw = rule.partition(op)
            if name.strip() not in params:
                return False
            have, want = params[name.strip()], yaml.safe_load(raw.strip())
            try:
                return {">": have > want, "<": have < want, "=": have == want}[op]
            except TypeError:
                return False
    return False


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """Report-safe metrics: numbers, strings, and dicts of numbers (Ray flattens dicts)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, (bool, int, float, str)):
            out[k] = v
        elif isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values()):
            out[k] = dict(v)
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _quiet_exit_in_callbacks(unraisable: Any) -> None:
    """``sys.unraisablehook`` of a trial's worker: Ray's SIGTERM handler raises ``SystemExit``,
    and when the signal lands while Python runs a weakref or finalizer callback (the garbage
    collector, e.g. as ``ray.shutdown`` stops the idle workers after a study), Python cannot raise
    it there and prints "Exception ignored in ... SystemExit: 1" with a traceback, which Ray
    forwards to the launch's terminal after the summary. That exit was not lost (Ray kills the
    worker anyway); only its printout is dropped. Every other unraisable exception prints."""
    if isinstance(unraisable.exc_value, SystemExit):
        return
    sys.__unraisablehook__(unraisable)


def train_trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """Ray function trainable: one trial of ``setup["trial_config"]`` with ``config`` as params.

    Works in the trial's local working directory; each epoch's ``latest.pt`` is handed to Ray as
    the checkpoint (Ray copies it to the experiment folder). A diverged trial returns normally.
    ``search.max_failures`` retries are for a worker that died (killed, out of memory, node lost):
    an exception raised by the trial itself is written to ``<exp>/trial_<id>/.trial_error`` (its
    traceback), and Ray's retry of that trial raises :class:`TrialError` at once instead of training
    again, with that traceback in its message (its last exception line is the one users read).
    """
    import ray
    import torch
    from ray import tune

    from trainables import params as P
    from trainables.trial import NEW_BEST, run_trial

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # "Checkpoint successfully created" per epoch
    sys.unraisablehook = _quiet_exit_in_callbacks
    threads = max(1, int(setup["cpu"]))
    torch.set_num_threads(threads)
    work = Path(os.getcwd()) / "trial"
    cfg = dataclasses.replace(setup["trial_config"], out_dir=work, threads=threads)
    params = P.resolve(dict(config))
    node_id = ray.get_runtime_context().get_node_id()
    fail = _fail_hook(setup.get("fail_when"), params)
    mark = None
    if setup.get("exp_dir"):
        mark = Path(setup["exp_dir"]) / f"trial_{tune.get_context().get_trial_id()}" / ERROR_MARK
        if mark.is_file():  # its traceback as it raised it, so that error.txt and MLflow keep it
            why = "not retried (retries are for workers that died); it raised:\n"
            raise TrialError(why + mark.read_text())

    resume_from = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        local = work.parent / "resume"
        shutil.rmtree(local, ignore_errors=True)
        checkpoint.to_directory(str(local))
        resume_from = local / S.MODEL_FILE

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        out = _scalars(metrics)
        new_best = bool(out.pop(NEW_BEST, False))
        out["node_id"] = node_id
        if fail and out.get("epoch", 0) >= 1:
            raise RuntimeError(f"{TEST_FAIL_ENV} matched {setup['fail_when']!r} (test hook)")
        if checkpoint_dir is None:
            tune.report(out)
            return
        # Ray keeps the best-ranked checkpoint, the later of a tie: only a strictly better epoch
        # (the one best_epoch names) ranks by its value, the others rank below any
        # (finite: Ray's TensorBoard logger warned "NaN or Inf found in input tensor" at each such epoch)
        worst = -sys.float_info.max if cfg.mode == "max" else sys.float_info.max
        out[S.CHECKPOINT_RANK] = out.get(cfg.metric, worst) if new_best else worst
        stage = work.parent / "persist" / f"epoch_{int(out.get('epoch', 0)):04d}"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        _link_or_copy(Path(checkpoint_dir) / "latest.pt", stage / S.MODEL_FILE)
        tune.report(out, checkpoint=tune.Checkpoint.from_directory(str(stage)))
        shutil.rmtree(stage, ignore_errors=True)  # Ray has copied it to storage

    try:
        result = run_trial(cfg, params, report=report, resume_from=resume_from)  # metrics went through report
    except Exception as exc:
        if mark is not None and not type(exc).__module__.startswith("ray") and disk_full(exc) is None:
            mark.parent.mkdir(parents=True, exist_ok=True)
            S.atomic_write_text(mark, "".join(traceback.format_exception(exc))[-20000:])
        raise
    finally:  # Ray never deletes a trial's working directory (a stopped one's: search.progress)
        for leftover in (work, work.parent / "persist", work.parent / "resume"):
            shutil.rmtree(leftover, ignore_errors=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.info("trial finished: %s", result.get("status"))
