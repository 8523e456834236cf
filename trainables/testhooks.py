"""Test hook: stop a process dead at a named point, so a test can kill a study exactly there.

``SEARCH_TEST_PAUSE_AT=point`` (or ``point@N``: the N-th time this process passes it) and
``SEARCH_TEST_PAUSE_DIR=folder``: the first process to reach the point claims
``folder/paused`` (``O_EXCL``: one pause per study, whichever process gets there first), writes
the point's name and its pid into it, and sleeps until it is killed. With
``SEARCH_TEST_HOOK_ACTION=enospc`` it raises ``OSError(ENOSPC)`` there instead (once per study:
a full disk), with ``erofs`` ``OSError(EROFS)`` (the folder made read-only). Without both
variables :func:`pause_point` does nothing. The tests kill the study's processes once ``paused``
exists (``tests/faults/test_crash_points.py``); nothing in the product sets these variables.
"""

from __future__ import annotations

import errno
import os
import time
from collections import Counter
from pathlib import Path

PAUSE_AT_ENV = "SEARCH_TEST_PAUSE_AT"
PAUSE_DIR_ENV = "SEARCH_TEST_PAUSE_DIR"
ACTION_ENV = "SEARCH_TEST_HOOK_ACTION"  # "pause" (the default), "enospc" or "erofs"
PAUSED_FILE = "paused"

_passes: Counter[str] = Counter()


def pause_point(name: str) -> None:
    """Sleep here forever when the test hook names this point (see the module docstring)."""
    want, folder = os.environ.get(PAUSE_AT_ENV), os.environ.get(PAUSE_DIR_ENV)
    if not want or not folder:
        return
    point, _, nth = want.partition("@")
    if point != name:
        return
    _passes[name] += 1
    if _passes[name] != (int(nth) if nth else 1):
        return
    try:
        fd = os.open(Path(folder) / PAUSED_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return  # another process paused first
    with os.fdopen(fd, "w") as f:
        f.write(f"{name} {os.getpid()}\n")
    if os.environ.get(ACTION_ENV) == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (test hook at {name})")
    if os.environ.get(ACTION_ENV) == "erofs":
        raise OSError(errno.EROFS, f"Read-only file system (test hook at {name})")
    while True:
        time.sleep(3600)
