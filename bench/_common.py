"""Shared helpers for the bench/ scripts: machine description, ratio statistics, printing.

Every benchmark here measures A and B side by side in one process run, interleaved (A B, B A,
A B, ...), and prints ratios: absolute times on a shared 2-core machine are noise.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def machine() -> dict[str, Any]:
    """CPU model, core count, load average, Python/torch versions (printed with every result)."""
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "python": platform.python_version(),
    }
    try:
        import torch

        out["torch"] = torch.__version__
        out["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return out


def spread(values: list[float]) -> dict[str, float]:
    """median, min, max, n of a list of ratios."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(vals), "min": vals[0], "max": vals[-1], "n": len(vals)}


def fmt(s: dict[str, float], digits: int = 3) -> str:
    return f"{s['median']:.{digits}f} (min {s['min']:.{digits}f}, max {s['max']:.{digits}f}, n={s['n']})"


def command_line() -> str:
    return "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(ROOT))] + sys.argv[1:])


def dump(path: str | None, obj: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(obj, indent=1, default=str))


def bare_steps(model: Any, optimizer: Any, scheduler: Any, batches: list, params: dict[str, Any]) -> float:
    """Seconds of the bare training steps over pre-loaded ``batches`` (forward, the weighted loss,
    zero_grad, backward, optimizer and scheduler step: no loader, no bookkeeping), the model in
    the trial's train mode."""
    from trainables import freeze, losses

    freeze.train_mode(model)
    t0 = time.perf_counter()
    for images, targets in batches:
        loss = losses.weighted_total(model(images, targets), params)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return time.perf_counter() - t0


class Clock:
    """perf_counter stopwatch."""

    def __enter__(self) -> Clock:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.t0
