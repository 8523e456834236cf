"""The real MLflow UI in a real browser: ``python -m search ui`` on a recorded study, its
experiment page opened in headless Chromium (driven over the DevTools protocol), the parent run
expanded, the nested trial runs listed. The screenshot is kept under pytest's tmp folder.

Needs the Debian ``chromium`` package (``apt-get install -y chromium``); skipped without it.
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

from search import tracking
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
    "--window-size=1400,900",
]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")]


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


async def _browse(ws_url: str, url: str, parent: str, children: list[str], shot: Path, dom: Path) -> str:
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


def test_mlflow_ui_lists_nested_trial_runs(ray_local, tmp_path):
    spec = load_spec(write_spec(tmp_path, name="browsed"))
    exp_dir = Path(spec.output_dir) / spec.name
    exp_dir.mkdir(parents=True)
    (exp_dir / "spec.yaml").write_text(Path(tmp_path / "spec.yaml").read_text())
    cb = tracking.make_callback(spec, exp_dir, resume=False)
    run_toy(spec, exp_dir, [{"kind": k} for k in ("ok", "stop", "error", "diverge")], [cb])
    children = sorted(
        k for k in json.loads((exp_dir / tracking.RUNS_FILE).read_text())["runs"] if k != "parent"
    )
    assert len(children) == 4

    ui = subprocess.Popen(
        [sys.executable, "-m", "search", "ui", str(exp_dir), "--port", "0"],
        cwd=tmp_path,
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
        profile = tmp_path / "chromium-profile"
        browser = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        shot, dom = tmp_path / "mlflow-ui.png", tmp_path / "mlflow-ui.html"
        text = asyncio.run(_browse(_devtools_ws(profile), url, "browsed", children, shot, dom))
        print(f"screenshot: {shot}")
        assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        for name in children:
            assert name in text and name in dom.read_text()
    finally:
        for proc in (browser, ui):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
    assert ui.returncode == 0  # SIGTERM stops the UI (and its server) cleanly
