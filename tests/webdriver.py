"""A small W3C WebDriver client over aiohttp, for driving a headless Chromium through
`chromedriver` from async tests (the head and agents keep running on the same event loop).

It speaks the few commands the dashboard test needs: navigate, run a script, wait for a
condition, click an element, take a full-page screenshot (through chromedriver's CDP endpoint).
Selenium would do the same, but its dependency trio registers a Hypothesis plugin that warns at
import (an error under `-W error`, breaking every Hypothesis test of the run)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"
"""The key of an element reference in WebDriver's JSON."""

CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


class WebDriverError(AssertionError):
    """A command the browser refused, or a condition not met in time."""


def browser_missing(ensure_script: Path) -> str:
    """Why no browser can be driven here ('' when chromium and chromedriver are installed):
    what `ensure_script --check` says."""
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return ""
    why = subprocess.run([str(ensure_script), "--check"], capture_output=True, text=True, check=False)
    return (why.stdout + why.stderr).strip() or "chromium and chromedriver are not installed"


class Browser:
    """One Chromium session, driven through chromedriver's HTTP API."""

    def __init__(self, http: aiohttp.ClientSession, base: str, session_id: str) -> None:
        self._http = http
        self._base = f"{base}/session/{session_id}"

    async def command(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One WebDriver command; its `value`."""
        async with self._http.request(method, self._base + path, json=body) as resp:
            data = await resp.json()
        if resp.status != 200:
            value = data.get("value", {})
            raise WebDriverError(f"{method} {path}: {value.get('error')}: {value.get('message', '')[:500]}")
        return data.get("value")

    async def get(self, url: str) -> None:
        """Navigate and wait for the page to load."""
        await self.command("POST", "/url", {"url": url})

    async def url(self) -> str:
        """The address bar."""
        return str(await self.command("GET", "/url"))

    async def js(self, script: str, *args: Any) -> Any:
        """Run a function body in the page (`return` its value)."""
        return await self.command("POST", "/execute/sync", {"script": script, "args": list(args)})

    async def until(self, script: str, *args: Any, timeout: float = 10.0) -> Any:
        """Poll a function body until it returns something truthy; that value."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.js(script, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                text = str(await self.js("return document.body ? document.body.innerText : ''"))
                raise WebDriverError(f"not met within {timeout} s: {script}\n--- page ---\n{text[:3000]}")
            await asyncio.sleep(0.05)

    async def click(self, css: str, timeout: float = 10.0) -> None:
        """A real click (pointer events at the element's centre) on what `css` selects, once visible."""
        await self.until(
            "const e = document.querySelector(arguments[0]); return !!e && e.getClientRects().length > 0",
            css,
            timeout=timeout,
        )
        ref = await self.command("POST", "/element", {"using": "css selector", "value": css})
        await self.command("POST", f"/element/{ref[ELEMENT]}/click", {})

    async def console(self) -> list[str]:
        """What the page wrote to the console since the last call, script errors and refusals by
        the Content-Security-Policy included, as `LEVEL message`."""
        entries = await self.command("POST", "/se/log", {"type": "browser"})
        return [f"{e['level']} {e['message']}" for e in entries]

    async def cdp(self, cmd: str, params: dict[str, Any]) -> Any:
        """A Chrome DevTools Protocol command."""
        return await self.command("POST", "/goog/cdp/execute", {"cmd": cmd, "params": params})

    async def screenshot(self, path: Path, width: int = 1360, height: int | None = None) -> None:
        """A PNG of the whole page, however long (or of its top `height` pixels)."""
        if height is None:
            height = int(await self.js("return document.documentElement.scrollHeight"))
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        await self.cdp("Emulation.setDeviceMetricsOverride", metrics)
        try:
            png = await self.command("GET", "/screenshot")
        finally:
            await self.cdp("Emulation.clearDeviceMetricsOverride", {})
        await asyncio.to_thread(path.write_bytes, base64.b64decode(png))


@contextlib.asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[Browser]:
    """A chromedriver process and a headless Chromium with a fresh profile in `profile`."""
    log = (profile.parent / "chromedriver.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        str(shutil.which("chromedriver")), "--port=0", stdout=asyncio.subprocess.PIPE, stderr=log
    )
    try:
        assert proc.stdout is not None
        port = 0
        async with asyncio.timeout(15):
            while not port:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    raise WebDriverError("chromedriver ended before it listened")
                if m := re.search(r"started successfully on port (\d+)", line):
                    port = int(m.group(1))
        base = f"http://127.0.0.1:{port}"
        caps = {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": str(shutil.which("chromium")),
                "args": [*CHROMIUM_ARGS, "--window-size=1360,1000", f"--user-data-dir={profile}"],
            },
        }
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            async with http.post(f"{base}/session", json={"capabilities": {"alwaysMatch": caps}}) as resp:
                data = await resp.json()
            if resp.status != 200:
                raise WebDriverError(f"no browser session: {data.get('value', {}).get('message', data)}")
            browser = Browser(http, base, data["value"]["sessionId"])
            try:
                yield browser
            finally:
                with contextlib.suppress(aiohttp.ClientError, WebDriverError, TimeoutError):
                    await browser.command("DELETE", "")
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()
