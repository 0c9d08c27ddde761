"""The event stream: global seq, replay with since=, topics, live follow, slow subscribers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from gswarm.client import GswarmClient
from gswarm.head.app import HeadServer
from gswarm.protocol import Event, Notice
from tests.conftest import AgentRunner, fast_settings, wait_for


async def test_every_change_is_an_event_with_increasing_seq(client: GswarmClient) -> None:
    for i in range(5):
        await client.register_model(f"m{i}", "llm")
    await client.delete_model("m0")
    events = await client.list_events(0)
    assert [e.kind for e in events] == ["model.registered"] * 5 + ["model.deleted"]
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert events[-1].key == "m0"


async def test_replay_since_then_live(head: HeadServer, client: GswarmClient, agents: AgentRunner) -> None:
    for i in range(3):
        await client.register_model(f"m{i}", "llm")
    first = (await client.list_events(0))[0].seq
    got: list[Event | Notice] = []

    async def follow() -> None:
        async for msg in client.events(since=first, topics=["model"]):
            got.append(msg)
            if isinstance(msg, Event) and msg.key == "live-one":
                return

    task = asyncio.create_task(follow())
    await wait_for(lambda: any(isinstance(m, Notice) and m.code == "live" for m in got))
    await agents.start(head, "w1")  # node events: filtered out by topic
    await client.register_model("live-one", "llm")
    await asyncio.wait_for(task, 10)
    keys = [m.key for m in got if isinstance(m, Event)]
    assert keys == ["m1", "m2", "live-one"]  # after `since`, none twice, no other topic


async def test_replay_reads_back_from_sqlite_past_the_ring(tmp_path: Path) -> None:
    settings = fast_settings(event_ring=4)
    server = HeadServer(tmp_path / "state", "127.0.0.1", 0, settings)
    await server.start()
    try:
        async with GswarmClient(server.url, server.head.tokens.api_token) as c:
            for i in range(12):
                await c.register_model(f"m{i}", "llm")
            want = [f"m{i}" for i in range(2, 12)]

            async def replayed() -> bool:  # once the writer thread has committed
                return [e.key for e in await c.list_events(2)] == want

            await wait_for(replayed, timeout=10)
    finally:
        await server.stop()


async def test_slow_subscriber_is_dropped_and_fast_one_keeps_up(tmp_path: Path) -> None:
    settings = fast_settings(subscriber_queue=8)
    server = HeadServer(tmp_path / "state", "127.0.0.1", 0, settings)
    await server.start()
    token = server.head.tokens.api_token
    n_models = 150
    try:
        async with GswarmClient(server.url, token) as fast, aiohttp.ClientSession() as raw:
            slow = await raw.ws_connect(
                server.url.replace("http", "ws") + f"/ws/events?token={token}", autoclose=False
            )
            fast_keys: list[str] = []

            async def follow_fast() -> None:
                async for msg in fast.events(topics=["model"]):
                    if isinstance(msg, Event):
                        fast_keys.append(msg.key)
                        if len(fast_keys) == n_models:
                            return

            fast_task = asyncio.create_task(follow_fast())
            await wait_for(lambda: server.head.bus.subscriber_count == 2)
            blob = "x" * 60_000  # big events fill the slow reader's socket buffers quickly
            for i in range(n_models):
                await fast.register_model(f"m{i:03d}", "llm", metadata={"blob": blob})
            await asyncio.wait_for(fast_task, 20)
            assert fast_keys == [f"m{i:03d}" for i in range(n_models)]
            info = await fast.info()
            assert info["subscribers_dropped"] == 1 and info["subscribers"] == 1

            # The slow reader now reads: it sees some events, then the stream ends.
            received = 0
            while True:
                msg = await slow.receive(timeout=15)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                received += 1
            assert received < n_models
            await slow.close()
    finally:
        await server.stop()


async def test_events_socket_requires_a_token(head: HeadServer) -> None:
    async with aiohttp.ClientSession() as s:
        try:
            await s.ws_connect(head.url.replace("http", "ws") + "/ws/events")
        except aiohttp.WSServerHandshakeError as exc:
            assert exc.status == 401
        else:
            raise AssertionError("connected without a token")
