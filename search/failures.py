"""The one reading of why a trial failed: its error text (Ray's traceback file) and the exception
line shown to users. ``study.json`` (the progress callback) and MLflow (the tracker) both record
the line from :func:`failure_reason`, so they never disagree."""

from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
ERROR_MARK = ".trial_error"  # in <exp>/trial_<id>/: the error a trial's own code raised


def raised_itself(exp_dir: Path, trial_id: str) -> bool:
    """Whether the trial's own code raised (:mod:`search.worker` marked it): Ray restarts it under
    ``search.max_failures`` like a worker that died, but that restart only fails at once, so
    it is no retry to count or announce."""
    return (Path(exp_dir) / f"trial_{trial_id}" / ERROR_MARK).is_file()


def error_text(trial: Any) -> str:
    """The trial's error file (Ray's traceback text), without terminal colour codes; "" when
    there is none or it cannot be read."""
    path = getattr(trial, "error_file", None)
    try:
        if path and Path(path).is_file():
            text = Path(path).read_text(errors="replace")
        else:
            text = str(trial.get_error() or "")
    except Exception:  # noqa: BLE001 - the error file is a nicety
        return ""
    return _ANSI.sub("", text)


def error_line(text: str) -> str | None:
    """The exception line of a traceback (``Type: message``), one line of at most 500 characters."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if (
            head
            and head.replace(".", "").replace("_", "").isalnum()
            and head.endswith(("Error", "Exception", "Interrupt", "Diverged"))
        ):
            return " ".join(ln.split())[:500]
    return " ".join(lines[-1].split())[:500] if lines else None


def failure_reason(trial: Any) -> str | None:
    """The exception line of a failed Ray trial (None when it left no error text)."""
    return error_line(error_text(trial))


def disk_full(
    exc: BaseException | None, codes: tuple[int, ...] = (errno.ENOSPC, errno.EDQUOT)
) -> OSError | None:
    """The ENOSPC/EDQUOT error (or another of ``codes``) behind ``exc`` (itself, or along its
    cause/context chain: Ray wraps what a callback raised), if any. A full disk or quota is the
    machine's fault, never a trial's or the study's: the driver stops resumably, a trial is retried
    from its last checkpoint."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in codes:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


_DB_ERROR = re.compile(r"\((sqlite3\.\w+|psycopg2?\.[\w.]+|pymysql\.[\w.]+)\) ([^\[]+?)\s*(?:\[SQL:|$)")


def exception_line(exc: BaseException, limit: int = 300) -> str:
    """An exception in one line of at most ``limit`` characters: a database error as its driver's
    words (SQLAlchemy's text goes on with the whole statement and its parameters)."""
    text = " ".join(str(exc).split())
    if found := _DB_ERROR.search(text):
        text = f"{found.group(1)}: {found.group(2)}"
    return f"{type(exc).__name__}: {text if len(text) <= limit else text[: limit - 3] + '...'}"
