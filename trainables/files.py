"""Small helpers shared by trials, tracking and export (no torch import)."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def plain(obj: Any) -> Any:
    """A JSON/YAML-safe copy: dataclasses and mappings to dicts, tuples and sets to lists,
    one-element tensors and numpy scalars to numbers, non-finite floats and anything else to str."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if callable(getattr(obj, "item", None)):
        try:
            return plain(obj.item())
        except (TypeError, ValueError, RuntimeError):  # a tensor of several elements
            pass
    return str(obj)


def better(a: float | None, b: float | None, mode: str) -> bool:
    """Whether ``a`` beats ``b`` under ``mode`` ("max" or "min"): None or a non-finite ``a`` never
    beats anything; anything else beats None."""
    if a is None or not math.isfinite(a):
        return False
    if b is None:
        return True
    return a > b if mode == "max" else a < b


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DatasetError(ValueError):
    """A dataset problem the user must fix; the message names the file (and id); ``fix``: what to
    do, where the generic advice (fix the dataset or point at another file) does not fit."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.fix = fix
