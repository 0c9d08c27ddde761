"""The range downloader on its own, against a real HTTP file server on 127.0.0.1: files split
across streams (one writer per file, idle streams taking chunks from the tail), checksums taken
while the bytes arrive, resuming after a stop, and bytes that do not match."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from gswarm.agent.fetch.common import ByteCounter, Cancelled, TransferError
from gswarm.agent.fetch.hub import RemoteFile
from gswarm.agent.fetch.ranges import RangeDownloader
from gswarm.agent.fetch.verify import verify_files

MIB = 1 << 20
CHUNK = MIB


@pytest.fixture
def source(tmp_path: Path) -> dict[str, bytes]:
    """A model with one file much larger than the rest, one small file and an empty one."""
    files = {
        "big.bin": os.urandom(12 * MIB + 12345),
        "mid.bin": os.urandom(3 * MIB),
        "small.json": b'{"a": 1}\n',
        "empty.txt": b"",
    }
    root = tmp_path / "src"
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[str]:
    """A plain file server with Range support (aiohttp's FileResponse) for tmp_path/src."""
    root = tmp_path / "src"

    async def handle(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(root / request.match_info["name"])

    app = web.Application()
    app.router.add_get("/{name}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


def remote(url: str, files: dict[str, bytes], corrupt: str = "") -> list[RemoteFile]:
    """What to fetch, with the real sha256 of each file (a wrong one for `corrupt`)."""
    return [
        RemoteFile(
            rel=name,
            url=f"{url}/{name}",
            size=len(data),
            sha256=hashlib.sha256(data + (b"x" if name == corrupt else b"")).hexdigest(),
        )
        for name, data in files.items()
    ]


async def test_streams_split_files_and_hash_every_byte_once(
    tmp_path: Path, source: dict[str, bytes], server: str
) -> None:
    dest = tmp_path / "dest"
    wanted = remote(server, source)
    counter = ByteCounter()
    downloader = RangeDownloader(dest, {}, counter, threading.Event(), workers=4, chunk=CHUNK)
    await asyncio.to_thread(downloader.run, wanted)
    assert counter.value == sum(len(d) for d in source.values())
    for name, data in source.items():
        assert (dest / name).read_bytes() == data
        assert downloader.hashes[name][0] == hashlib.sha256(data).hexdigest()
    entries = await asyncio.to_thread(verify_files, dest, wanted, threading.Event(), 4, downloader.hashes)
    assert {e.path: e.size for e in entries} == {n: len(d) for n, d in source.items()}


async def test_resumes_where_it_stopped_and_checks_the_whole_file(
    tmp_path: Path, source: dict[str, bytes], server: str
) -> None:
    dest = tmp_path / "dest"
    wanted = remote(server, source)
    total = sum(len(d) for d in source.values())
    cancel = threading.Event()
    counter = ByteCounter()

    def stop_midway() -> None:
        while counter.value < total // 2:
            if cancel.wait(0.001):
                return
        cancel.set()

    watcher = threading.Thread(target=stop_midway)
    watcher.start()
    first = RangeDownloader(dest, {}, counter, cancel, workers=3, chunk=CHUNK)
    with pytest.raises(Cancelled):
        await asyncio.to_thread(first.run, wanted)
    cancel.set()
    watcher.join()

    second = RangeDownloader(dest, {}, ByteCounter(), threading.Event(), workers=3, chunk=CHUNK)
    kept = second.already_done(wanted)
    assert total // 2 <= kept < total
    again = ByteCounter(kept)
    second.counter = again
    await asyncio.to_thread(second.run, wanted)
    assert again.value == total  # nothing fetched twice
    for name, data in source.items():
        assert (dest / name).read_bytes() == data
        assert second.hashes[name][0] == hashlib.sha256(data).hexdigest()


async def test_bytes_that_do_not_match_are_caught(
    tmp_path: Path, source: dict[str, bytes], server: str
) -> None:
    dest = tmp_path / "dest"
    wanted = remote(server, source, corrupt="big.bin")
    downloader = RangeDownloader(dest, {}, ByteCounter(), threading.Event(), workers=4, chunk=CHUNK)
    await asyncio.to_thread(downloader.run, wanted)
    with pytest.raises(TransferError) as err:
        await asyncio.to_thread(verify_files, dest, wanted, threading.Event(), 4, downloader.hashes)
    assert err.value.code == "checksum_mismatch" and "big.bin" in err.value.message
