"""Open a page in headless Chromium (Debian's `chromium`) over the DevTools protocol: console errors, failed
requests, JavaScript values, first paint and a screenshot. Used by the gallery test and its benchmark.

Nothing beyond the standard library and `websockets` (a dependency of prefect): no Playwright, no download.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), *CHROMIUM_NAMES):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@dataclass
class PageResult:
    console_errors: list[str] = field(default_factory=list)
    """console.error/warning calls, uncaught exceptions and failed loads (images, scripts) the browser logged."""
    values: dict[str, Any] = field(default_factory=dict)
    first_contentful_paint_ms: float | None = None
    load_event_ms: float | None = None
    screenshot: bytes | None = None


class Browser:
    """One headless Chromium with a page target, driven through its DevTools websocket."""

    def __init__(self, width: int = 1280, height: int = 900, timeout: float = 60.0):
        exe = find_chromium()
        if exe is None:
            raise FileNotFoundError("no chromium on PATH (apt-get install -y chromium)")
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="lumosx-chromium-")
        self.proc = subprocess.Popen(
            [
                exe,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
                "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        port = self._port()
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                    targets = [t for t in json.load(r) if t.get("type") == "page"]
                if targets:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("chromium exposed no page target")
            time.sleep(0.1)
        from websockets.sync.client import connect

        self.ws = connect(targets[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=timeout)
        self.ids = itertools.count(1)
        self.events: list[dict] = []

    def _port(self) -> int:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + self.timeout
        for line in self.proc.stderr:
            m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if m:
                return int(m.group(1))
            if time.monotonic() > deadline:
                break
        raise RuntimeError("chromium did not start its DevTools server")

    def send(self, method: str, **params: Any) -> dict:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv(timeout=self.timeout))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)
        raise TimeoutError(method)

    def wait_event(self, method: str) -> dict:
        for e in self.events:
            if e.get("method") == method:
                return e
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv(timeout=self.timeout))
            self.events.append(msg)
            if msg.get("method") == method:
                return msg
        raise TimeoutError(method)

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(
        self,
        url: str,
        values: dict[str, str] | None = None,
        screenshot: bool = False,
        settle_s: float = 0.5,
    ) -> PageResult:
        """Load `url`, wait for its load event and `settle_s`, then read `values` (name -> JS expression)."""
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")
        self.events.clear()
        self.send("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")
        time.sleep(settle_s)
        out = PageResult()
        out.first_contentful_paint_ms = self.evaluate(
            "(() => { const e = performance.getEntriesByName('first-contentful-paint')[0];"
            " return e ? e.startTime : null; })()"
        )
        out.load_event_ms = self.evaluate(
            "(() => { const n = performance.getEntriesByType('navigation')[0]; return n ? n.loadEventEnd : null; })()"
        )
        for name, expr in (values or {}).items():
            out.values[name] = self.evaluate(expr)
        if screenshot:
            shot = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=False)
            out.screenshot = base64.b64decode(shot["data"])
        # Drain what arrived meanwhile, then collect every complaint the page caused.
        with contextlib.suppress(TimeoutError):
            while True:
                self.events.append(json.loads(self.ws.recv(timeout=0.2)))
        for e in self.events:
            method, p = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
                out.console_errors.append(
                    " ".join(str(a.get("value", a.get("description"))) for a in p["args"])
                )
            elif method == "Runtime.exceptionThrown":
                out.console_errors.append(p["exceptionDetails"].get("text", "exception"))
            elif method == "Log.entryAdded" and p["entry"].get("level") in ("error", "warning"):
                out.console_errors.append(f"{p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
            elif method == "Network.loadingFailed":
                out.console_errors.append(f"load failed: {p.get('errorText')}")
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
