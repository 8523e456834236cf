"""Run many ``python -m search ...`` command lines in ONE interpreter, so torch and Ray are
imported once: ``python -m tests.faults.cli_batch CASES.json RESULTS.json``.

CASES.json is a list of ``{"id", "argv", "cwd"}``. Each case runs ``search.cli.main(argv)`` (the
code behind ``python -m search``) in ``cwd`` with stdout and stderr captured (logging re-bound to
the captured stderr, as ``main`` sets it up). ``ray.init`` is replaced by a tripwire that records
the call and raises, so a bad input that slips through to Ray is seen (and never runs a study);
the caller also gives this process a private TMPDIR, where a real Ray session would appear.
RESULTS.json: per case ``{"id", "rc", "stdout", "stderr", "ray_init", "seconds"}``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path


class RayStartBlocked(RuntimeError):
    """Raised by the ``ray.init`` tripwire."""


def main(cases_file: str, results_file: str) -> int:
    import ray

    from search.cli import main as cli_main

    calls: list[dict] = []

    def tripwire(*args, **kwargs):
        calls.append({"args": [str(a) for a in args], "kwargs": {k: str(v) for k, v in kwargs.items()}})
        raise RayStartBlocked("ray.init called (the fault suite blocks it)")

    ray.init = tripwire
    results = []
    for case in json.loads(Path(cases_file).read_text()):
        os.chdir(case["cwd"])
        root = logging.getLogger()
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        out, err = io.StringIO(), io.StringIO()
        n_calls = len(calls)
        t0 = time.time()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli_main(case["argv"])
            except SystemExit as exc:  # argparse usage errors
                rc = exc.code
            except BaseException:  # noqa: BLE001 - reported to the test, which fails on it
                rc = "raised: " + traceback.format_exc()
        results.append(
            {
                "id": case["id"],
                "rc": rc,
                "stdout": out.getvalue(),
                "stderr": err.getvalue(),
                "ray_init": len(calls) > n_calls,
                "ray_initialized": ray.is_initialized(),
                "seconds": round(time.time() - t0, 2),
            }
        )
    Path(results_file).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
