"""What ``launch`` and ``resume`` print: the header (the search, the recipe trials, the notes)
and the end-of-study summary."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from search import mlflow_store
from search import study as S
from search.samplers import num_samples
from search.schedulers import scheduler_label
from search.spec import Spec
from search.spec.notes import spec_notes
from search.study_folder import resume_command


def mlflow_hint(spec: Spec) -> str:
    """How to open the study's MLflow records."""
    uri = mlflow_store.tracking_uri(spec)
    if uri.split(":", 1)[0].lower() in ("http", "https"):
        return f"open {uri} (experiment {spec.tracking.experiment or spec.name})"
    return f"python -m search ui {shlex.quote(str(spec.experiment_dir))}"


def print_summary(summary: dict[str, Any], spec: Spec | None = None) -> None:
    exp_dir = summary["experiment_dir"]
    print("", flush=True)
    print(
        f"study {summary['name']}: {summary['status']}, {S.count_text(summary['counts'])}"
        + (" (time budget reached)" if summary.get("budget_reached") else "")
    )
    print(f"{'trial':<13} {'state':<10} {'epochs':>6} {'best':>9}  {'disk':>9}  checkpoint")
    for t in summary["trials"]:
        best = t.get("best_metric")
        print(
            f"{t['id']:<13} {t['state'] or '-':<10} {t.get('epochs', 0):>6} "
            f"{S.fmt(best):>9}  "
            f"{S.human_bytes(t.get('disk_bytes')):>9}  {t.get('checkpoint') or '-'}"
            + (f"  [{t['error']}]" if t.get("error") else "")
            + ("  [diverged: a non-finite loss]" if t.get("failure") == S.DIVERGED else "")
        )
    best, base = summary.get("best"), summary.get("base_metric")
    metric = summary["metric"]
    if best:
        delta = ""
        if isinstance(base, (int, float)) and isinstance(best["best_metric"], (int, float)):
            value = best["best_metric"]
            gain = value - base if summary.get("mode", "max") == "max" else base - value  # + = better
            delta = f" vs base model (epoch 0) {S.fmt(base)} ({S.fmt(gain, sign=True)})"
        print(
            f"best trial: {best['id']} {metric}={S.fmt(best['best_metric'])} at epoch "
            f"{best.get('best_epoch')}{delta}"
        )
        if best.get("background_only"):
            print(f"  warning: it {S.BACKGROUND_ONLY}")
        ref = S.reference_text(summary.get("reference"), metric)
        if ref:
            print(f"  {ref}")
        print(f"  params: {S.params_text(best.get('params', {}))}")
        print(f"  checkpoint: {best.get('checkpoint')}")
    else:
        print("no trial produced a result.")
    print(f"status: python -m search status {shlex.quote(str(exp_dir))}")
    print(f"MLflow: {summary['mlflow']}")
    if summary.get("interrupted"):
        again = summary.get("resume_command") or resume_command(Path(exp_dir))
        print(f"\ninterrupted: state saved. Resume with:\n  {again}", flush=True)


def print_header(
    spec: Spec,
    exp_dir: Path,
    cluster: dict[str, Any],
    recipe_trials: Sequence[tuple[str, dict[str, Any]]] = (),
    resumed: bool = False,
) -> None:
    s = spec.search
    what = "resuming" if resumed else "launching"
    budget = f", time budget {s.time_budget:.0f}s" if s.time_budget else ""
    print(
        f"{what} study {spec.name}: {s.algorithm} + {scheduler_label(s.scheduler)}, "
        f"{num_samples(spec)} trials x "
        f"{spec.train.epochs} epochs, {s.max_concurrent} at a time ({spec.resources.cpu:g} CPU"
        f"{f', {spec.resources.gpu:g} GPU' if spec.resources.gpu else ''} each){budget}; "
        f"objective {spec.objective.metric} ({spec.objective.mode})",
        flush=True,
    )
    print(
        f"  experiment folder: {exp_dir}  (cluster: {cluster['nodes']} node(s) on {len(cluster['hosts'])} "
        f"host(s))",
        flush=True,
    )
    for i, (scaling, params) in enumerate(recipe_trials):
        print(f"  {recipe_plan_text(i, scaling, params)}", flush=True)
    if recipe_trials and (unused := recipe_unused_text(spec.recipe_unused(), spec.recipe_overridden())):
        print(f"  {unused}", flush=True)
    for note in spec_notes(spec):
        print(f"  note: {note}", flush=True)


def recipe_unused_text(unused: dict[str, Any], overridden: dict[str, Any] | None = None) -> str | None:
    """How the recipe trials differ from the recipe (:meth:`Spec.recipe_unused`, the parameters
    the sampler picks; :meth:`Spec.recipe_overridden`, the spec's constants that replace the
    recipe's values), in words; None when they do not."""
    parts = []
    if unused:
        picks = [
            f"{k} (the recipe's {S.fmt(v)} is not among your choices)"
            if v is not None
            else f"{k} (not in the recipe)"
            for k, v in unused.items()
        ]
        parts.append(f"the sampler picks {', '.join(picks)}")
    said = {
        k: f"{k}={S.fmt(v['spec'])} (the recipe's {S.fmt(v['given'])})" for k, v in (overridden or {}).items()
    }
    for default, words in (
        (False, "your fixed {} stay"),
        (True, "the defaults {} of parameters not in your space stay"),
    ):
        if texts := [text for k, text in said.items() if bool(overridden[k].get("default")) is default]:
            parts.append(words.format(", ".join(texts)))
    return f"(in the recipe trials {'; '.join(parts)})" if parts else None


class _Tolerant(io.TextIOBase):
    """A text stream that drops what it can no longer write: its reader left (``| head``, a
    ``tee`` that died: EPIPE) or its terminal hung up (ssh closed: EIO). The study goes on; the
    descriptor is pointed at /dev/null so that Ray's and logging's writes to it fail no more."""

    def __init__(self, stream: TextIO):
        super().__init__()
        self._stream, self._gone = stream, False

    def _drop(self, exc: OSError) -> None:
        if exc.errno not in (errno.EPIPE, errno.EIO):
            raise exc
        self._gone = True
        with contextlib.suppress(OSError, ValueError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                return self._stream.write(text)
            except OSError as exc:
                self._drop(exc)
        return len(text)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except OSError as exc:
                self._drop(exc)

    def fileno(self) -> int:
        return self._stream.fileno()

    def writable(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:  # buffer, errors, name, reconfigure, ...: the stream's
        return getattr(self._stream, name)

    def isatty(self) -> bool:
        return not self._gone and self._stream.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream, "encoding", "utf-8")

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self._stream, "errors", None)


@contextlib.contextmanager
def tolerant_output() -> Iterator[None]:
    """``launch``/``resume`` with stdout and stderr as :class:`_Tolerant` streams: a closed pipe
    ended the study (``launch ... | head -3`` exited 0 before its first trial, the study left for
    nothing) or crashed it mid-run (exit 1, a 1,400-character TuneError line)."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tolerant(sys.stdout), _Tolerant(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def recipe_plan_text(i: int, scaling: str, params: dict[str, Any]) -> str:
    """The i-th recipe trial (0: the reference) as the launch header and the dry run say it."""
    what = "the reference (torchvision's recipe for this architecture" if i == 0 else "the recipe (again"
    return f"trial {i + 1} is {what}, lr scaled to the batch by the {scaling} rule): {S.params_text(params)}"
