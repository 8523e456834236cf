"""Benchmark timing hook, active only when ``BENCH_TIMING_DIR`` is set (bench/orchestration.py).

Put this folder on ``PYTHONPATH``: every Python process started with that environment (the
launcher, Ray's workers, a plain loop's worker processes) then wraps
``trainables.engine.train_one_epoch`` and ``trainables.engine.evaluate`` the moment that module is
imported, and appends one JSON line per call, ``{"pid", "fn", "start", "end"}`` (``time.time()``),
to ``$BENCH_TIMING_DIR/<pid>.jsonl``. Nothing else is imported or changed; processes that never
import ``trainables.engine`` (Ray's own daemons) are untouched. The project's code is not edited.
"""

import os
import sys

_DIR = os.environ.get("BENCH_TIMING_DIR")
_TARGET = "trainables.engine"


def _patch(module):
    import functools
    import json
    import time

    path = os.path.join(_DIR, f"{os.getpid()}.jsonl")

    def wrap(name, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                with open(path, "a") as f:
                    f.write(
                        json.dumps({"pid": os.getpid(), "fn": name, "start": start, "end": time.time()})
                        + "\n"
                    )

        return timed

    for name in ("train_one_epoch", "evaluate"):
        setattr(module, name, wrap(name, getattr(module, name)))


if _DIR:
    import importlib.abc
    import importlib.util

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != _TARGET:
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            if spec is None or spec.loader is None:
                return spec
            original = spec.loader.exec_module

            def exec_module(module):
                original(module)
                _patch(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())
