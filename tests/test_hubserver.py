"""Tests for the fake Hub server, driven by the real ``huggingface_hub`` client."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import huggingface_hub
import pytest
import pytest_asyncio
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder
from yarl import URL

from tests.hubserver import DEFAULT_LFS_THRESHOLD, HubRepo, HubServer, ThreadedHubServer

pytestmark = pytest.mark.asyncio

REPO_ID = "test-org/tiny-model"
BIG_NAME = "model.safetensors"
BIG_SIZE = 70 * 1024 * 1024
SMALL_FILES: dict[str, bytes] = {
    "config.json": b'{"hidden_size": 8}\n',
    "README.md": b"# tiny model\n",
    "sub/a.json": b'{"nested": true}\n',
    "sub/deeper/b.txt": b"hello world\n" * 100,
    "empty.txt": b"",
}
HUBSERVER_PY = Path(__file__).with_name("hubserver.py")


def _sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _read(path: str | Path) -> bytes:
    return Path(path).read_bytes()


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A ~70 MB file on disk (served as LFS) and its sha256."""
    path = tmp_path_factory.mktemp("hub-src") / BIG_NAME
    data = random.Random(1234).randbytes(BIG_SIZE)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


@pytest.fixture
def hf_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep huggingface_hub online, quiet and away from the user's home."""
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    # Read at import time by huggingface_hub, so patch the constant as well.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def _repo(big_path: Path) -> HubRepo:
    return HubRepo(REPO_ID, {**SMALL_FILES, BIG_NAME: big_path})


@pytest_asyncio.fixture
async def hub(hf_env: None, big_file: tuple[Path, str]) -> AsyncIterator[HubServer]:
    server = HubServer([_repo(big_file[0])])
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _assert_same_files(root: Path, big_sha: str) -> None:
    for name, data in SMALL_FILES.items():
        assert _read(root / name) == data, name
    assert _sha256_file(root / BIG_NAME) == big_sha


async def test_snapshot_download_local_dir(
    hub: HubServer, big_file: tuple[Path, str], tmp_path: Path
) -> None:
    out = await asyncio.to_thread(
        snapshot_download,
        REPO_ID,
        endpoint=hub.url,
        cache_dir=tmp_path / "cache",
        local_dir=tmp_path / "out",
        token=False,
    )
    _assert_same_files(Path(out), big_file[1])
    assert hub.bytes_served[BIG_NAME] == BIG_SIZE
    assert hub.total_bytes_served == BIG_SIZE + sum(map(len, SMALL_FILES.values()))
    assert hub.range_headers == []
    paths = {r.path for r in hub.requests}
    assert f"/api/models/{REPO_ID}/revision/main" in paths
    sha = _repo(big_file[0]).commit_sha
    assert f"/api/models/{REPO_ID}/tree/{sha}" in paths
    # per-file downloads are pinned to the commit sha
    assert f"/{REPO_ID}/resolve/{sha}/sub/a.json" in paths


async def test_snapshot_download_cache_layout_and_reuse(
    hub: HubServer, big_file: tuple[Path, str], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    snap = await asyncio.to_thread(snapshot_download, REPO_ID, endpoint=hub.url, cache_dir=cache, token=False)
    _assert_same_files(Path(snap), big_file[1])
    blobs = cache / f"models--{REPO_ID.replace('/', '--')}" / "blobs"
    assert (blobs / big_file[1]).is_file()  # LFS file: etag = sha256
    assert (blobs / _git_sha1(SMALL_FILES["config.json"])).is_file()  # git blob sha1
    served = hub.total_bytes_served

    again = await asyncio.to_thread(
        snapshot_download, REPO_ID, endpoint=hub.url, cache_dir=cache, token=False
    )
    assert again == snap
    assert hub.total_bytes_served == served  # nothing downloaded twice


async def test_hf_hub_download_resumes_after_cut(
    hub: HubServer, big_file: tuple[Path, str], tmp_path: Path
) -> None:
    # huggingface_hub reads the body in 10 MiB chunks (constants.DOWNLOAD_CHUNK_SIZE) and
    # resumes from the last complete chunk, so cut on a chunk boundary for an exact check.
    cut = 2 * huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE
    hub.fail_after[BIG_NAME] = cut
    path = await asyncio.to_thread(
        hf_hub_download,
        REPO_ID,
        BIG_NAME,
        endpoint=hub.url,
        cache_dir=tmp_path / "cache",
        token=False,
    )
    assert _sha256_file(path) == big_file[1]
    assert hub.range_headers == [f"bytes={cut}-"]
    assert hub.bytes_served[BIG_NAME] == BIG_SIZE  # the first 20 MiB were not sent again
    assert hub.request_counts["GET", BIG_NAME] == 2
    assert BIG_NAME not in hub.fail_after  # one-shot


async def test_hf_hub_download_nested_and_commit_revision(
    hub: HubServer, big_file: tuple[Path, str], tmp_path: Path
) -> None:
    sha = _repo(big_file[0]).commit_sha
    path = await asyncio.to_thread(
        hf_hub_download,
        REPO_ID,
        "a.json",
        subfolder="sub",
        revision=sha,
        endpoint=hub.url,
        cache_dir=tmp_path / "cache",
        token=False,
    )
    assert _read(path) == SMALL_FILES["sub/a.json"]
    assert Path(path).parent.parent.name == sha


async def test_resolve_headers_and_ranges(hub: HubServer, big_file: tuple[Path, str]) -> None:
    data = SMALL_FILES["sub/deeper/b.txt"]
    base = f"{hub.url}/{REPO_ID}/resolve/main"
    async with aiohttp.ClientSession() as session:
        async with session.head(f"{base}/{BIG_NAME}") as resp:
            assert resp.status == 200
            assert resp.headers["ETag"] == f'"{big_file[1]}"'
            assert resp.headers["X-Linked-Etag"] == f'"{big_file[1]}"'
            assert resp.headers["X-Linked-Size"] == str(BIG_SIZE)
            assert resp.headers["Content-Length"] == str(BIG_SIZE)
            assert resp.headers["Accept-Ranges"] == "bytes"
            assert resp.headers["X-Repo-Commit"] == _repo(big_file[0]).commit_sha
            assert not [h for h in resp.headers if h.lower().startswith("x-xet")]
            assert await resp.read() == b""
        async with session.head(f"{base}/sub/deeper/b.txt") as resp:
            assert resp.headers["ETag"] == f'"{_git_sha1(data)}"'
            assert "X-Linked-Etag" not in resp.headers

        cases = {"bytes=10-19": (10, 20), "bytes=-5": (len(data) - 5, len(data))}
        cases |= {"bytes=1000-": (1000, len(data)), "bytes=0-99999": (0, len(data))}
        for header, (start, stop) in cases.items():
            async with session.get(f"{base}/sub/deeper/b.txt", headers={"Range": header}) as resp:
                assert resp.status == 206, header
                assert await resp.read() == data[start:stop], header
                assert resp.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{len(data)}"

        for header in ("bytes=5000-", "bytes=9-3", "lines=1-2", "bytes=0-1,4-5"):
            async with session.get(f"{base}/sub/deeper/b.txt", headers={"Range": header}) as resp:
                assert resp.status == 416, header
                assert resp.headers["Content-Range"] == f"bytes */{len(data)}"

        async with session.get(f"{base}/{BIG_NAME}", headers={"Range": "bytes=-1000"}) as resp:
            assert resp.status == 206
            tail = await resp.read()
        assert tail == _read(big_file[0])[-1000:]
    assert hub.range_headers[0] == "bytes=10-19"


async def test_path_safety(hub: HubServer) -> None:
    async with aiohttp.ClientSession() as session:
        for raw in (
            f"/{REPO_ID}/resolve/main/%2E%2E/%2E%2E/etc/passwd",
            f"/{REPO_ID}/resolve/main/sub/../config.json",
            f"/{REPO_ID}/resolve/main//etc/passwd",
            f"/{REPO_ID}/resolve/main/sub%2F..%2Fconfig.json",
            f"/api/models/{REPO_ID}/tree/main/..",
        ):
            url = URL(hub.url + raw, encoded=True)
            async with session.get(url) as resp:
                assert resp.status == 404, raw
                assert resp.headers["X-Error-Code"] == "EntryNotFound", raw


async def test_not_found_errors(hub: HubServer, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url, token=False)
    with pytest.raises(RepositoryNotFoundError):
        await asyncio.to_thread(api.model_info, "test-org/missing")
    with pytest.raises(RepositoryNotFoundError):
        await asyncio.to_thread(
            snapshot_download,
            "test-org/missing",
            endpoint=hub.url,
            cache_dir=tmp_path / "c1",
            token=False,
        )
    with pytest.raises(RepositoryNotFoundError):
        await asyncio.to_thread(
            hf_hub_download, "missing", "x.bin", endpoint=hub.url, cache_dir=tmp_path, token=False
        )
    with pytest.raises(RemoteEntryNotFoundError):
        await asyncio.to_thread(
            hf_hub_download,
            REPO_ID,
            "nope.bin",
            endpoint=hub.url,
            cache_dir=tmp_path / "c2",
            token=False,
        )
    with pytest.raises(RevisionNotFoundError):
        await asyncio.to_thread(
            hf_hub_download,
            REPO_ID,
            "config.json",
            revision="v9",
            endpoint=hub.url,
            cache_dir=tmp_path / "c3",
            token=False,
        )
    with pytest.raises(RevisionNotFoundError):
        await asyncio.to_thread(api.model_info, REPO_ID, revision="v9")
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{hub.url}/api/models/test-org/missing") as resp,
    ):
        assert resp.status == 404
        assert resp.headers["X-Error-Code"] == "RepoNotFound"
        assert "error" in json.loads(await resp.read())


async def test_api_metadata(hub: HubServer, big_file: tuple[Path, str]) -> None:
    api = HfApi(endpoint=hub.url, token=False)
    info = await asyncio.to_thread(api.model_info, REPO_ID)
    assert info.id == REPO_ID
    assert info.sha == _repo(big_file[0]).commit_sha
    assert info.siblings is not None
    sizes = {s.rfilename: s.size for s in info.siblings}
    assert sizes == {**{k: len(v) for k, v in SMALL_FILES.items()}, BIG_NAME: BIG_SIZE}

    full = await asyncio.to_thread(api.model_info, REPO_ID, files_metadata=True)
    assert full.siblings is not None
    lfs = {s.rfilename: s.lfs for s in full.siblings}
    big_lfs = lfs[BIG_NAME]
    assert big_lfs is not None and big_lfs.sha256 == big_file[1]
    assert lfs["config.json"] is None

    files = await asyncio.to_thread(api.list_repo_files, REPO_ID)
    assert sorted(files) == sorted([*SMALL_FILES, BIG_NAME])

    top = await asyncio.to_thread(lambda: list(api.list_repo_tree(REPO_ID)))
    assert {(type(e).__name__, e.path) for e in top} == {
        ("RepoFolder", "sub"),
        *(("RepoFile", n) for n in (*SMALL_FILES, BIG_NAME) if "/" not in n),
    }
    sub = await asyncio.to_thread(lambda: list(api.list_repo_tree(REPO_ID, "sub/deeper")))
    assert [e.path for e in sub] == ["sub/deeper/b.txt"]

    infos = await asyncio.to_thread(
        api.get_paths_info, REPO_ID, ["sub", BIG_NAME, "config.json", "missing.txt"]
    )
    by_path = {e.path: e for e in infos}
    assert set(by_path) == {"sub", BIG_NAME, "config.json"}
    assert isinstance(by_path["sub"], RepoFolder)
    big = by_path[BIG_NAME]
    assert isinstance(big, RepoFile) and big.lfs is not None
    assert big.size == BIG_SIZE and big.lfs.sha256 == big_file[1]
    small = by_path["config.json"]
    assert isinstance(small, RepoFile)
    assert small.lfs is None and small.blob_id == _git_sha1(SMALL_FILES["config.json"])

    refs = await asyncio.to_thread(api.list_repo_refs, REPO_ID)
    assert [b.name for b in refs.branches] == ["main"]


async def test_repo_without_namespace_and_dataset(hf_env: None, tmp_path: Path) -> None:
    model = HubRepo("gpt2", {"config.json": b"{}"})
    dataset = HubRepo("org/data", {"train/part-0.csv": b"a,b\n1,2\n"}, repo_type="dataset")
    async with HubServer([model, dataset]) as hub:
        path = await asyncio.to_thread(
            hf_hub_download, "gpt2", "config.json", endpoint=hub.url, cache_dir=tmp_path, token=False
        )
        assert _read(path) == b"{}"
        snap = await asyncio.to_thread(
            snapshot_download,
            "org/data",
            repo_type="dataset",
            endpoint=hub.url,
            cache_dir=tmp_path,
            token=False,
        )
        assert _read(Path(snap) / "train/part-0.csv") == b"a,b\n1,2\n"


async def test_rate_limit(hf_env: None, tmp_path: Path) -> None:
    size = 4_000_000
    data = random.Random(7).randbytes(size)
    async with HubServer([HubRepo("org/slow", {"w.bin": data})], rate_limit=2_000_000) as hub:
        await hub.wait_hashed()
        start = time.monotonic()
        path = await asyncio.to_thread(
            hf_hub_download, "org/slow", "w.bin", endpoint=hub.url, cache_dir=tmp_path, token=False
        )
        elapsed = time.monotonic() - start
        assert _read(path) == data
        assert 1.5 <= elapsed < 6, elapsed

        # the limit is shared by all connections: 2 x 2 MB in parallel also take ~2 s
        url = f"{hub.url}/org/slow/resolve/main/w.bin"
        half = size // 2

        async def fetch(session: aiohttp.ClientSession, first: int, last: int) -> bytes:
            async with session.get(url, headers={"Range": f"bytes={first}-{last}"}) as resp:
                assert resp.status == 206
                return await resp.read()

        start = time.monotonic()
        async with aiohttp.ClientSession() as session:
            parts = await asyncio.gather(fetch(session, 0, half - 1), fetch(session, half, size - 1))
        elapsed = time.monotonic() - start
        assert parts[0] + parts[1] == data
        assert 1.5 <= elapsed < 6, elapsed


async def test_threaded_server(hf_env: None, tmp_path: Path) -> None:
    repo = HubRepo("org/threaded", {"a.bin": b"abc", "b/c.txt": b"xyz"})
    with ThreadedHubServer([repo]) as hub:
        out = await asyncio.to_thread(
            snapshot_download,
            "org/threaded",
            endpoint=hub.url,
            local_dir=tmp_path / "out",
            cache_dir=tmp_path / "cache",
            token=False,
        )
        assert _read(Path(out) / "b/c.txt") == b"xyz"
        hub.add_repo(HubRepo("org/late", {"x": b"1"}))
        late = await asyncio.to_thread(
            hf_hub_download, "org/late", "x", endpoint=hub.url, cache_dir=tmp_path, token=False
        )
        assert _read(late) == b"1"
        served, ranges = hub.stats()
        assert served == {"a.bin": 3, "b/c.txt": 3, "x": 1}
        assert ranges == []


async def test_cli_serves_directory(hf_env: None, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    (src / "config.json").write_bytes(b'{"x": 1}')
    (src / "nested" / "w.bin").write_bytes(b"\x00\x01" * 1000)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HUBSERVER_PY),
        "--dir",
        str(src),
        "--repo",
        "org/cli",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        url = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
        assert url.startswith("http://127.0.0.1:")
        out = await asyncio.to_thread(
            snapshot_download,
            "org/cli",
            endpoint=url,
            local_dir=tmp_path / "out",
            cache_dir=tmp_path / "cache",
            token=False,
        )
        assert _read(Path(out) / "nested" / "w.bin") == b"\x00\x01" * 1000
        assert _read(Path(out) / "config.json") == b'{"x": 1}'
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_lfs_threshold_and_validation(hf_env: None) -> None:
    assert DEFAULT_LFS_THRESHOLD == 10 * 1024 * 1024
    server = HubServer(lfs_threshold=4)
    with pytest.raises(ValueError):
        server.add_repo(HubRepo("org/bad", {"../x": b""}))
    with pytest.raises(ValueError):
        server.add_repo(HubRepo("org/bad", {"/abs": b""}))
    server.add_repo(HubRepo("org/ok", {"big": b"12345", "small": b"123"}))
    async with server, aiohttp.ClientSession() as session:
        async with session.head(f"{server.url}/org/ok/resolve/main/big") as resp:
            assert resp.headers["X-Linked-Size"] == "5"
        async with session.head(f"{server.url}/org/ok/resolve/main/small") as resp:
            assert "X-Linked-Size" not in resp.headers


async def test_stop_cuts_inflight_download(hf_env: None) -> None:
    hub = HubServer([HubRepo("org/slow", {"w.bin": b"x" * 4_000_000})], rate_limit=1_000_000)
    await hub.start()
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{hub.url}/org/slow/resolve/main/w.bin") as resp,
    ):
        assert resp.status == 200
        await resp.content.readexactly(100_000)
        start = time.monotonic()
        await hub.stop()
        assert time.monotonic() - start < 1.0
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert 0 < hub.bytes_served["w.bin"] < 4_000_000
