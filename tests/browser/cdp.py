"""A headless Chromium driven over the DevTools protocol: load a page, collect console errors,
check its images, take a full-page screenshot."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    """The path of a Chromium binary, or None."""
    env = os.environ.get("SORTLINE_CHROMIUM")
    if env:
        return env
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


@dataclass
class PageCheck:
    """What loading one page showed."""

    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads
    images: list[dict] = field(default_factory=list)  # alt, complete, naturalWidth/Height
    title: str = ""

    @property
    def broken_images(self) -> list[dict]:
        return [
            i
            for i in self.images
            if not i["complete"] or i["naturalWidth"] == 0 or i.get("shownWidth", 1) <= 0
        ]


class Chromium:
    """One headless browser process (use as a context manager)."""

    def __init__(self, binary: str, timeout: float = 30.0):
        self.binary, self.timeout = binary, timeout
        self.profile = tempfile.mkdtemp(prefix="sortline-chromium-")
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def __enter__(self) -> Chromium:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-dev-shm-usage",
                f"--user-data-dir={self.profile}",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.timeout
        lines = []
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                break
            lines.append(line)
            m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if m:
                self.port = int(m.group(1))
                break
        if not self.port:
            self.__exit__(None, None, None)
            raise RuntimeError("chromium did not start:\n" + "".join(lines[-20:]))
        # keep draining stderr so the browser never blocks on a full pipe
        import threading

        threading.Thread(target=lambda: self.proc.stderr.read(), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def _new_page(self) -> str:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/json/new?about:blank", method="PUT"
        )
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            return json.load(r)["webSocketDebuggerUrl"]

    def check(self, page: Path, screenshot: Path, width: int = 1280) -> PageCheck:
        """Load *page*; return its console errors and images; write a full-page PNG."""
        from websockets.sync.client import connect

        result = PageCheck()
        with connect(self._new_page(), max_size=None, open_timeout=self.timeout) as ws:
            ids = iter(range(1, 1_000_000))
            events: list[dict] = []

            def call(method: str, **params) -> dict:
                i = next(ids)
                ws.send(json.dumps({"id": i, "method": method, "params": params}))
                while True:
                    msg = json.loads(ws.recv(timeout=self.timeout))
                    if msg.get("id") == i:
                        if "error" in msg:
                            raise RuntimeError(f"{method}: {msg['error']}")
                        return msg.get("result", {})
                    events.append(msg)

            def wait_for(method: str) -> None:
                deadline = time.monotonic() + self.timeout
                while not any(e.get("method") == method for e in events):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no {method} within {self.timeout} s")
                    events.append(json.loads(ws.recv(timeout=self.timeout)))

            for domain in ("Page", "Runtime", "Log", "Network"):
                call(f"{domain}.enable")
            call(
                "Emulation.setDeviceMetricsOverride",
                width=width,
                height=900,
                deviceScaleFactor=1,
                mobile=False,
            )
            call("Page.navigate", url=page.resolve().as_uri())
            wait_for("Page.loadEventFired")
            info = call(
                "Runtime.evaluate",
                returnByValue=True,
                awaitPromise=True,
                expression="""
                Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null)))
                .then(() => ({title: document.title, images: Array.from(document.images).map(i => (
                  {alt: i.alt, complete: i.complete, naturalWidth: i.naturalWidth,
                   naturalHeight: i.naturalHeight, shownWidth: i.getBoundingClientRect().width}
                  ))}))""",
            )
            value = info["result"]["value"]
            result.title, result.images = value["title"], value["images"]
            shot = call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            import base64

            screenshot.write_bytes(base64.b64decode(shot["data"]))
            for e in events:
                m, p = e.get("method"), e.get("params", {})
                if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                    result.errors.append(
                        "console: "
                        + " ".join(
                            str(a.get("value", a.get("description", ""))) for a in p.get("args", [])
                        )
                    )
                elif m == "Runtime.exceptionThrown":
                    result.errors.append("exception: " + p["exceptionDetails"].get("text", ""))
                elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                    result.errors.append(
                        f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}"
                    )
                elif m == "Network.loadingFailed":
                    result.errors.append(f"network: {p.get('errorText')}")
        return result
