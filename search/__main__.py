"""``python -m search``.

Exits without the interpreter's module teardown. After a study, tearing down torch, Ray's and
gRPC's native state and MLflow's SQLAlchemy engine takes about 2 s here and does nothing a user
needs. ``_finish`` is registered first, so it runs after every other atexit handler (Ray's,
MLflow's, logging's). It flushes stdout and stderr and then leaves with the exit code. The
commands close their own files before returning.
"""

import atexit
import os
import sys

_code = [1]


def _finish() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more to write
            pass
    os._exit(_code[0])


atexit.register(_finish)

from search.cli import main  # noqa: E402  (after the registration: its imports register their own)

try:
    code = main()
except SystemExit as exc:  # argparse's usage errors and --help
    code = exc.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
_code[0] = code or 0
sys.exit(_code[0])
