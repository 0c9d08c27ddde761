"""`/ui`, the live dashboard: served without a token from files in the package, and driven in a
real headless Chromium (Debian's `chromium`, through its `chromedriver`) against a real
head and agents. Without a browser the browser test skips, saying why (`.ci/ensure-chromium`
installs one as root). `GSWARM_UPDATE_SCREENSHOTS=1` writes the screenshots to `docs/ui.png`
and `docs/watch.png` (a frame of `gswarm watch`, as SVG, shown in the same browser)."""

from __future__ import annotations

import asyncio
import io
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from rich.console import Console
from yarl import URL

from gswarm.agent.serving import ServingConfig, Template
from gswarm.cli.watch import follow, frame, load_view
from gswarm.client import GswarmClient
from gswarm.head.app import HeadServer
from tests.conftest import AgentRunner, free_port, wait_for
from tests.webdriver import Browser, browser_missing, chromium

UI_DIR = Path(__file__).resolve().parent.parent / "gswarm" / "head" / "ui"
DOCS = Path(__file__).resolve().parent.parent / "docs"
ENSURE = Path(__file__).resolve().parent.parent / ".ci" / "ensure-chromium"


# ---------------------------------------------------------------- served openly, nothing from elsewhere


async def test_the_page_and_its_assets_need_no_token_and_name_no_other_host(head: HeadServer) -> None:
    async with aiohttp.ClientSession() as http:
        for path, kind in (("/ui", "text/html"), ("/ui/", "text/html"), ("/ui/app.js", "text/javascript")):
            async with http.get(head.url + path) as resp:
                assert resp.status == 200, path
                assert resp.content_type == kind
                policy = resp.headers["Content-Security-Policy"]
                assert "script-src 'self'" in policy and "default-src 'none'" in policy
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
        async with http.get(head.url + "/ui/app.css") as resp:
            assert resp.status == 200 and resp.content_type == "text/css"
        # The page holds no data; everything else still needs the token.
        async with http.get(head.url + "/nodes") as resp:
            assert resp.status == 401
        for bad in ("/ui/nothing.js", "/ui/..%2Fhttp.py", "/ui/%2e%2e/http.py", "/ui/index.html/x"):
            async with http.get(URL(head.url + bad, encoded=True)) as resp:
                assert resp.status == 404, bad
                assert (await resp.json())["error"]["code"] == "not_found"
    # Offline: every file the page loads comes from /ui/, and no asset names another host.
    page = (UI_DIR / "index.html").read_text()
    loaded = set(re.findall(r'(?:src|href)="([^"]+)"', page))
    assert loaded == {"/ui/app.css", "/ui/app.js", "/ui/favicon.svg"}
    for asset in UI_DIR.iterdir():
        text = asset.read_text()
        # An XML namespace (`xmlns="..."`) names a vocabulary, it is never fetched.
        without_namespaces = re.sub(r"xmlns(?::\w+)?=\"[^\"]*\"", "", text)
        urls = set(re.findall(r"(?:https?|wss?)://[^\s'\"`)]*", without_namespaces))
        assert not urls, (asset.name, urls)
        assert "@import" not in text and "url(" not in text, asset.name


# ---------------------------------------------------------------- the browser


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    missing = browser_missing(ENSURE)
    if missing:
        pytest.skip(f"no browser for the dashboard test: {missing}")
    async with chromium(tmp_path / "chromium-profile") as b:
        yield b


CELL = '#matrix button[data-model="{model}"][data-device="{device}"]'
TINY_A = "a:disk"


async def test_dashboard_follows_the_cluster_and_acts(
    head: HeadServer, agents: AgentRunner, client: GswarmClient, hub: Any, browser: Browser, tmp_path: Path
) -> None:
    await agents.start(head, "a", simulate_gpus="1:16G")
    await agents.start(head, "b")
    token = head.head.tokens.api_token

    # Signed in by the fragment, which then leaves the address bar; the token stays for the tab.
    await browser.get(f"{head.url}/ui#token={token}")
    await browser.until("return document.querySelectorAll('#nodes [data-key^=\"node-\"]').length == 2")
    assert "#" not in await browser.url()
    assert await browser.js("return sessionStorage.getItem('gswarm-token')") == token
    await browser.until("return document.getElementById('conn').textContent == 'live'")
    assert await browser.js("return document.querySelectorAll('#nodes progress').length") >= 3  # tiers, GPU

    # A download started from the page (its form, then Confirm); its bar moves, live.
    hub.rate_limit = 24 * 1024 * 1024  # about 3 s for the 70 MiB file
    await browser.click('[data-act="download"]')
    await browser.js("""
        const f = document.getElementById('dialog-form');
        f.elements.model_name.value = 'tiny';
        f.elements.source_url.value = 'org/tiny';
        f.elements.target_device.value = 'a:disk';""")
    await browser.click("#dialog-ok")
    op = (await wait_for(lambda: [o for o in head.head.registry.ops.values() if o.kind == "download"]))[0]
    bar = f'#ops tr[data-op="{op.op_id}"] progress'
    first = await browser.until(f"const p = document.querySelector('{bar}'); return p && p.value")
    # A job follows the download: its DAG shows each action's state.
    job = await client.submit_job(
        {
            "name": "spread tiny",
            "actions": [
                {
                    "id": "fetch",
                    "action": "download",
                    "model": "tiny",
                    "source": "org/tiny",
                    "target": TINY_A,
                },
                {
                    "id": "to-dram",
                    "action": "copy",
                    "model": "tiny",
                    "from": TINY_A,
                    "to": "a:dram",
                    "keep_source": True,
                    "depends_on": ["fetch"],
                },
                {
                    "id": "to-b",
                    "action": "copy",
                    "model": "tiny",
                    "from": TINY_A,
                    "to": "b:disk",
                    "keep_source": True,
                    "depends_on": ["fetch"],
                },
            ],
        }
    )
    row = f'#ops tr[data-op="{op.op_id}"]'
    text = await browser.until(
        f"const p = document.querySelector('{bar}'); const r = document.querySelector('{row}');"
        " return p && p.value > arguments[0] && p.value > p.max / 4 && r.innerText.includes('ETA')"
        " && document.querySelectorAll('#jobs g.action').length == 3 && r.innerText",
        first,
    )
    assert re.search(r"MiB of 70\.0 MiB \(\d+%\) · [\d.]+ MiB/s · ETA \d+s", text), text
    cell = CELL.format(model="tiny", device="a:disk")
    assert await browser.js(f"return document.querySelector('{cell}').dataset.state") == "downloading"
    if os.environ.get("GSWARM_UPDATE_SCREENSHOTS") == "1":
        await browser.screenshot(DOCS / "ui.png")
    else:
        await browser.screenshot(tmp_path / "ui.png")

    # The copies turn ready in the matrix, and the job's actions in its DAG.
    await browser.until(f"return document.querySelector('{cell}').dataset.state == 'ready'", timeout=15)
    for device in ("a:dram", "b:disk"):
        sel = CELL.format(model="tiny", device=device)
        await browser.until(f"const c = document.querySelector('{sel}'); return c?.dataset.state == 'ready'")
    await browser.until(
        f"return [...document.querySelectorAll('[data-job=\"{job.job_id}\"] g.action')]"
        ".every(g => g.dataset.state == 'succeeded')",
    )

    # Dropped from the event stream, the page resumes from the last event it saw: a model
    # registered while it was away shows up without a reload.
    head.head.bus.close_all("test: subscribers dropped")
    await client.register_model("registered-while-away", "llm")
    await browser.until("return !!document.querySelector('#matrix [data-model=\"registered-while-away\"]')")
    await browser.until("return document.getElementById('conn').textContent == 'live'")

    # A confirmed action: remove b's copy.
    await browser.click(CELL.format(model="tiny", device="b:disk"))
    await browser.click('#dialog [data-act="rm"]')
    title = await browser.js("return document.getElementById('dialog-title').textContent")
    assert title == "Remove tiny from b:disk?"
    assert ("tiny", "b:disk") in head.head.registry.locations  # nothing happens before Confirm
    await browser.click("#dialog-ok")
    gone = CELL.format(model="tiny", device="b:disk")
    await browser.until(f"return document.querySelector('{gone}').classList.contains('empty')")
    assert ("tiny", "b:disk") not in head.head.registry.locations
    assert ("tiny", "a:disk") in head.head.registry.locations

    # Replicate it back from the model's name: b:disk is offered (it has no copy), a's are not.
    await browser.click('#matrix [data-act="model"][data-model="tiny"]')
    offered = await browser.js(
        "return [...document.querySelectorAll('#dialog input[type=checkbox]')].map(i => i.value)"
    )
    assert offered == ["b:disk", "b:dram"]
    await browser.click('#dialog input[value="b:disk"]')
    await browser.click("#dialog-ok")
    await browser.until(f"return document.querySelector('{gone}').dataset.state == 'ready'")

    # No script error, nothing the Content-Security-Policy refused.
    assert [line for line in await browser.console() if line.startswith(("SEVERE", "WARNING"))] == []

    # A wrong token shows the sign-in form, which then signs in with the right one: from a page
    # being loaded, and from a #token= typed into the tab already showing it (no reload then).
    for how in ("load", "hash"):
        if how == "load":
            await browser.get("about:blank")
            await browser.get(f"{head.url}/ui#token=wrong")
        else:
            await browser.js("location.hash = 'token=wrong'")
        await browser.until("const s = document.getElementById('signin'); return s && !s.hidden")
        assert await browser.js("return document.getElementById('signin-error').textContent") == "wrong token"
        assert await browser.js("return document.getElementById('dash').hidden")
        assert await browser.js("return sessionStorage.getItem('gswarm-token')") is None
        assert "#" not in await browser.url()
        await browser.js("document.getElementById('token').value = arguments[0]", token)
        await browser.click('#signin-form button[type="submit"]')
        await browser.until("return document.querySelectorAll('#nodes [data-key^=\"node-\"]').length == 2")
        assert await browser.js("return sessionStorage.getItem('gswarm-token')") == token


async def test_dashboard_serves_stops_and_cancels(
    head: HeadServer,
    agents: AgentRunner,
    client: GswarmClient,
    tiny_repo_dir: Path,
    hub: Any,
    browser: Browser,
) -> None:
    config = ServingConfig(
        templates={
            "pyhttp": Template(
                command=[sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1"], health="/"
            )
        },
        health_interval=0.3,
        stop_grace=3,
    )
    await agents.start(head, "w1", serving_config=config)
    assert (await client.download("m", f"file://{tiny_repo_dir}", "w1:disk", wait=True)).state == "succeeded"
    await browser.get(f"{head.url}/ui#token={head.head.tokens.api_token}")

    # Serve a copy from its cell: the service shows its health and URL, and the cell says so.
    port = free_port()
    await browser.click(CELL.format(model="m", device="w1:disk"))
    await browser.click('#dialog [data-act="serve"]')
    await browser.js(
        "const f = document.getElementById('dialog-form');"
        "f.elements.port.value = arguments[0]; f.elements.backend.value = 'pyhttp';",
        str(port),
    )
    await browser.click("#dialog-ok")
    row = '#services tr[data-key="svc-m@w1:disk"]'
    await browser.until(
        f"const r = document.querySelector('{row}'); return r && r.innerText.includes('ready')"
    )
    href = await browser.js(f"return document.querySelector('{row} a').getAttribute('href')")
    assert href == f"http://127.0.0.1:{port}"
    cell = CELL.format(model="m", device="w1:disk")
    assert "ready" in await browser.js(f"return document.querySelector('{cell} .svc').textContent")

    # Copy it to dram from its cell (the dialog offers the node's other tier).
    await browser.click(cell)
    await browser.click('#dialog [data-act="copy"]')
    assert await browser.js("return document.querySelector('#dialog select').value") == "w1:dram"
    await browser.click("#dialog-ok")
    dram = CELL.format(model="m", device="w1:dram")
    await browser.until(f"const c = document.querySelector('{dram}'); return c?.dataset.state == 'ready'")

    # Stop it, confirmed.
    await browser.click(f'{row} [data-act="stop"]')
    assert (
        await browser.js("return document.getElementById('dialog-title').textContent") == "Stop m on w1:disk?"
    )
    await browser.click("#dialog-ok")
    await browser.until(f"return !document.querySelector('{row}')")
    assert not head.head.registry.services

    # Cancel a slow download from its row, confirmed: the op ends cancelled, its copy goes.
    hub.rate_limit = 1 << 20
    slow = await client.download("slow", "org/tiny", "w1:dram")
    op_row = f'#ops tr[data-op="{slow.op_id}"]'
    await browser.click(f'{op_row} [data-act="cancel"]')
    assert (
        await browser.js("return document.getElementById('dialog-title').textContent")
        == "Cancel this operation?"
    )
    await browser.click("#dialog-ok")
    await browser.until(f"return document.querySelector('{op_row}').dataset.state == 'cancelled'")
    gone = CELL.format(model="slow", device="w1:dram")
    await browser.until(f"return document.querySelector('{gone}').classList.contains('empty')")
    assert (await client.get_op(slow.op_id)).state == "cancelled"
    assert [line for line in await browser.console() if line.startswith(("SEVERE", "WARNING"))] == []


async def test_watch_frame_of_a_cluster_at_work_as_a_screenshot(
    head: HeadServer,
    agents: AgentRunner,
    client: GswarmClient,
    tiny_repo_dir: Path,
    hub: Any,
    browser: Browser,
    tmp_path: Path,
) -> None:
    """`gswarm watch` during a download, next to a service: its frame recorded as SVG by rich,
    shown in the browser and screenshot (for the README)."""
    config = ServingConfig(
        templates={
            "pyhttp": Template(
                command=[sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1"], health="/"
            )
        },
        health_interval=0.3,
    )
    await agents.start(head, "gpu-node-1", simulate_gpus="2:80G", serving_config=config)
    await agents.start(head, "gpu-node-2", simulate_gpus="2:80G")
    ready = await client.download("tiny-chat", f"file://{tiny_repo_dir}", "gpu-node-1:disk", wait=True)
    assert ready.state == "succeeded"
    serve = await client.serve("tiny-chat", "gpu-node-1:disk", free_port(), backend="pyhttp", wait=True)
    assert serve.state == "succeeded"

    view = await load_view(client)
    follower = asyncio.create_task(follow(client, view, lambda: None))
    try:
        hub.rate_limit = 12 * 1024 * 1024
        op = await client.download("tiny", "org/tiny", "gpu-node-2:disk")
        await wait_for(
            lambda: (
                (o := view.ops.get(op.op_id)) and o.progress.rate and o.progress.done * 3 > o.progress.total
            )
        )
        console = Console(
            width=80, record=True, file=io.StringIO(), force_terminal=True, color_system="truecolor"
        )
        console.print(frame(view, time.time()))
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await client.cancel_op(op.op_id)
    svg = console.export_svg(title="gswarm watch")
    svg = re.sub(r"@font-face\s*\{[^}]*\}", "", svg)  # fonts from a CDN: the local monospace will do
    box = re.search(r'viewBox="0 0 ([\d.]+) ([\d.]+)"', svg)
    assert box is not None
    width, height = (round(float(n)) for n in box.groups())
    page = tmp_path / "watch.html"
    style = f"html,body{{margin:0;overflow:hidden;background:#fff}}svg{{display:block;width:{width}px}}"
    page.write_text(f"<!doctype html><style>{style}</style><body>{svg}</body>")
    await browser.get(page.as_uri())
    text = await browser.js("return document.body.textContent.replaceAll('\\u00a0', ' ')")
    assert "→ gpu-node-2:disk" in text and re.search(r"\d+% [\d.]+/73\.4 MB", text), text
    assert "ready" in text and "tiny-chat" in text
    target = DOCS if os.environ.get("GSWARM_UPDATE_SCREENSHOTS") == "1" else tmp_path
    await browser.screenshot(target / "watch.png", width=width, height=height)
