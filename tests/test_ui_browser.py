"""The real MLflow UI in a real browser: ``python -m search ui`` on a recorded study, its
experiment page opened in headless Chromium (driven over the DevTools protocol), the parent run
expanded, the nested trial runs listed. The screenshot is kept under pytest's tmp folder.

Needs the Debian ``chromium`` package (``apt-get install -y chromium``); skipped without it, except
under CI (``CI`` set), where a missing browser fails the test. With ``SEARCH_SCREENSHOT_DIR`` set, the
screenshot is also copied there as ``mlflow-ui.png`` (the README's is made so:
``SEARCH_SCREENSHOT_DIR=docs python -m pytest -q -m slow tests/test_ui_browser.py``); CI leaves it
unset, so no repository file is rewritten.
The MLflow runs table is rendered by JavaScript and shows child runs only once their parent row
is expanded, so a plain ``--dump-dom`` is not enough: the test clicks the expander.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from search import run_map, tracking
from search.spec import load_spec
from tests.test_tracking import run_toy, write_spec

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,900",
]

SCREENSHOT_ENV = "SEARCH_SCREENSHOT_DIR"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="chromium is not installed"),
]


class Cdp:
    """A minimal Chrome DevTools protocol client over one page's websocket (aiohttp, which MLflow
    already depends on)."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params):
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=60)
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def js(self, expression: str):
        out = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        return out.get("result", {}).get("value")

    async def wait_text(self, needles: list[str], timeout: float) -> str:
        deadline = time.time() + timeout
        text = ""
        while time.time() < deadline:
            text = await self.js("document.body ? document.body.innerText : ''") or ""
            if all(n in text for n in needles):
                return text
            await asyncio.sleep(0.5)
        raise AssertionError(f"page never showed {needles}; it showed: {text[:1500]!r}")


# Toggle one entry of the runs table's "Columns" menu: the nth item (0-based) with exactly this label.
_TOGGLE_COLUMN = """(() => {{
  const hits = [...document.querySelectorAll('body *')].filter(
    e => e.children.length === 0 && e.innerText && e.innerText.trim() === {name});
  const menu = hits.filter(e => e.closest('[role=dialog], [role=menu], [data-radix-popper-content-wrapper]'));
  const el = menu[{nth}];
  if (!el) return false;
  el.click();
  return true;
}})()"""


async def _choose_columns(cdp: Cdp, columns: list[tuple[str, int]]) -> None:
    """Open the "Columns" menu, toggle each ``(label, nth)`` entry, close the menu (Escape)."""
    await cdp.js(
        "[...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Columns').click()"
    )
    await asyncio.sleep(1)
    for name, nth in columns:
        if not await cdp.js(_TOGGLE_COLUMN.format(name=json.dumps(name), nth=int(nth))):
            raise AssertionError(f"no column {name!r} (#{nth}) in the Columns menu")
        await asyncio.sleep(0.3)
    for kind in ("keyDown", "keyUp"):
        await cdp.call(
            "Input.dispatchKeyEvent", type=kind, key="Escape", code="Escape", windowsVirtualKeyCode=27
        )
    await asyncio.sleep(1)


async def _browse(
    ws_url: str,
    url: str,
    parent: str,
    children: list[str],
    shot: Path,
    dom: Path,
    columns: list[tuple[str, int]] | None = None,
) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        cdp = Cdp(ws)
        await cdp.call("Page.enable")
        await cdp.call("Page.navigate", url=url)
        await cdp.wait_text([parent], timeout=120)
        # the parent row's expander (in its run-name cell) reveals the nested runs
        expander = (
            "document.querySelectorAll('[role=row] button[data-component-id*=\"runnamecellrenderer\"]')"
        )
        deadline = time.time() + 60
        while not await cdp.js(f"{expander}.length") and time.time() < deadline:
            await asyncio.sleep(0.5)
        clicked = await cdp.js(
            f"(() => {{ const b = [...{expander}]; b.forEach(x => x.click()); return b.length; }})()"
        )
        assert clicked >= 1, "no expander button in the runs table"
        text = await cdp.wait_text(children, timeout=60)
        if columns:
            await _choose_columns(cdp, columns)
        # room for the runs table: close MLflow's assistant panel and collapse the side bar (when shown)
        await cdp.js(
            "(() => { for (const l of ['Close', 'Toggle sidebar'])"
            " document.querySelectorAll(`button[aria-label='${l}']`).forEach(b => b.click()); })()"
        )
        await asyncio.sleep(1.5)
        png = await cdp.call("Page.captureScreenshot", format="png")
        shot.write_bytes(base64.b64decode(png["data"]))
        dom.write_text(await cdp.js("document.documentElement.outerHTML") or "")
        return text


def _devtools_ws(profile: Path, timeout: float = 60) -> str:
    """The websocket URL of the browser's first page (port from ``DevToolsActivePort``)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        port_file = profile / "DevToolsActivePort"
        if port_file.is_file() and port_file.read_text().strip():
            port = port_file.read_text().splitlines()[0].strip()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as resp:
                    pages = [t for t in json.load(resp) if t.get("type") == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            except OSError:
                pass
        time.sleep(0.3)
    raise RuntimeError("chromium did not open its DevTools port")


def browse_study(
    exp_dir: Path,
    parent: str,
    children: list[str],
    work: Path,
    columns: list[tuple[str, int]] | None = None,
) -> tuple[str, Path, Path, int]:
    """``python -m search ui`` on ``exp_dir``, its page in headless Chromium, the parent run
    expanded until every name of ``children`` shows; returns (page text, screenshot, DOM file, the
    UI's exit code after SIGTERM). ``work``: the UI's cwd and the browser profile's folder.
    ``columns``: entries of the table's "Columns" menu to toggle, as (label, nth match).
    Shared with ``bench/ui_screenshot.py`` (the README's screenshot of a real study)."""
    ui = subprocess.Popen(
        [sys.executable, "-m", "search", "ui", str(exp_dir), "--port", "0"],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,
    )
    browser = None
    try:
        url = ui.stdout.readline().strip()  # printed once /health answers
        assert url.startswith("http://127.0.0.1:") and "/#/experiments/" in url, (url, ui.stderr.read())
        profile = work / "chromium-profile"
        browser = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        shot, dom = work / "mlflow-ui.png", work / "mlflow-ui.html"
        text = asyncio.run(_browse(_devtools_ws(profile), url, parent, children, shot, dom, columns))
    finally:
        for proc in (browser, ui):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
    return text, shot, dom, ui.returncode


def keep_screenshot(shot: Path, env: dict[str, str] | None = None) -> Path | None:
    """Copy ``shot`` to ``$SEARCH_SCREENSHOT_DIR/mlflow-ui.png`` when that variable is set."""
    folder = (os.environ if env is None else env).get(SCREENSHOT_ENV)
    if not folder:
        return None
    dest = Path(folder).resolve() / "mlflow-ui.png"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, dest)
    return dest


def test_mlflow_ui_lists_nested_trial_runs(ray_local, tmp_path):
    if CHROMIUM is None:  # only under CI (skipped otherwise): the browser test must run there
        pytest.fail("chromium is not installed (CI is set): apt-get install -y chromium")
    spec = load_spec(write_spec(tmp_path, name="browsed"))
    exp_dir = Path(spec.output_dir) / spec.name
    exp_dir.mkdir(parents=True)
    (exp_dir / "spec.yaml").write_text(Path(tmp_path / "spec.yaml").read_text())
    cb = tracking.make_callback(spec, exp_dir, resume=False)
    run_toy(spec, exp_dir, [{"kind": k} for k in ("ok", "stop", "error", "diverge")], [cb])
    children = sorted(
        k for k in json.loads((exp_dir / run_map.RUNS_FILE).read_text())["runs"] if k != "parent"
    )
    assert len(children) == 4

    text, shot, dom, ui_rc = browse_study(exp_dir, "browsed", children, tmp_path)
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in children:
        assert name in text and name in dom.read_text()
    kept = keep_screenshot(shot)
    if kept is not None:
        assert kept.read_bytes() == shot.read_bytes()
        print(f"screenshot kept: {kept}")
    assert ui_rc == 0  # SIGTERM stops the UI (and its server) cleanly
