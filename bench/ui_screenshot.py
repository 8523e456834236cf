"""The README's MLflow UI screenshot (section "Comparing trials in the MLflow UI"), of a real study.

Runs the code of the headless-Chromium test (``tests/test_ui_browser.py``: ``python -m search ui``
on the study, its experiment page in headless Chromium, the parent run expanded until every trial
run shows) on a study folder made by ``python -m search launch``, and copies the screenshot to
``--out``. Nothing else writes there: the test itself copies its screenshot only when
``SEARCH_SCREENSHOT_DIR`` is set, and CI does not set it.

Run: python bench/ui_screenshot.py runs/det-demo [--out docs/mlflow-ui.png]
Needs: the Debian ``chromium`` package.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import _common as C  # noqa: I001  (puts the repo root on sys.path)

# The "Columns" menu entries toggled before the screenshot: (label, nth match; "lr" is a metric
# first and a parameter second). Hides three empty attribute columns, shows the objective, the
# searched parameters and the search.* tags.
COLUMNS = [
    ("Dataset", 0),
    ("Source", 0),
    ("Models", 0),
    ("best_{metric}", 0),
    ("lr", 1),
    ("optimizer", 0),
    ("trainable", 0),
    ("search.state", 0),
    ("search.reference", 0),
    ("search.stopped.rule", 0),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path, help="a study folder (<output_dir>/<name>) with an MLflow record")
    ap.add_argument("--out", type=Path, default=C.ROOT / "docs" / "mlflow-ui.png")
    args = ap.parse_args()

    from search import run_map
    from tests import test_ui_browser as B

    if B.CHROMIUM is None:
        print("chromium is not installed: apt-get install -y chromium", file=sys.stderr)
        return 1
    exp_dir = args.study.resolve()
    runs = json.loads((exp_dir / run_map.RUNS_FILE).read_text())["runs"]
    children = sorted(k for k in runs if k != "parent")
    with tempfile.TemporaryDirectory(prefix="ui-shot-") as tmp:
        metric = json.loads((exp_dir / "study.json").read_text())["metric"]
        columns = [(name.format(metric=metric), nth) for name, nth in COLUMNS]
        text, shot, _dom, rc = B.browse_study(exp_dir, exp_dir.name, children, Path(tmp), columns)
        missing = [c for c in children if c not in text]
        if missing or rc != 0:
            print(f"page lacks {missing} or the UI exited {rc}", file=sys.stderr)
            return 1
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, args.out)
    print(f"{args.out}: {args.out.stat().st_size} bytes, {len(children)} trial runs of {exp_dir.name}")
    print(f"machine: {C.machine()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
