"""The agent's handlers of the tier ops: `download`, `copy` (also `move`) and `delete`.

Each writes into the tier's partial directory, verifies, and publishes by rename; nothing
half-done is ever visible as a copy. Ops on the same model and tier are serialised.
"""

from __future__ import annotations

import asyncio
import errno
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

import msgspec

from gswarm.agent.context import OpContext
from gswarm.agent.fetch.common import (
    ByteCounter,
    Cancelled,
    RateLimit,
    TransferError,
    check_bandwidth,
    local_write_error,
    run_blocking,
)
from gswarm.agent.fetch.http_client import fetch_json
from gswarm.agent.fetch.hub import FetchPlan, RemoteFile, resolve_http, resolve_hub
from gswarm.agent.fetch.local import copy_files, list_local
from gswarm.agent.fetch.ranges import DOWNLOAD_PLAN, DOWNLOAD_STATE, RangeDownloader, write_plan
from gswarm.agent.fetch.verify import VERIFY_WORKERS, hash_manifest, verify_files
from gswarm.agent.file_roots import FileRoots
from gswarm.agent.stores import Manifest, ManifestFile, TierStore, safe_relpath
from gswarm.errors import BadRequest, Conflict, Forbidden, GswarmError, NotFound
from gswarm.ops import (
    CopyArgs,
    CopyResult,
    DeleteArgs,
    DeleteResult,
    DownloadArgs,
    DownloadResult,
    FetchArgs,
    FetchResult,
    PeerSource,
)
from gswarm.sources import FileSource, HttpSource, HubSource, parse_source
from gswarm.words import counted

_LOCKS: dict[tuple[str, str, str], asyncio.Lock] = {}


def _lock(ctx: OpContext, tier: str, model: str) -> asyncio.Lock:
    key = (ctx.agent.instance_id, tier, model)
    lock = _LOCKS.get(key)
    if lock is None:
        lock = _LOCKS[key] = asyncio.Lock()
    return lock


def _store(ctx: OpContext, tier: str) -> TierStore:
    store = ctx.agent.stores.get(tier)
    if store is None:
        raise BadRequest(
            f"this node has no tier {tier!r} (it has {', '.join(ctx.agent.stores)})", code="invalid_device"
        )
    return store


W = TypeVar("W", DownloadResult, FetchResult, CopyResult)


def _result(
    kind: type[W],
    store: TierStore,
    path: Path,
    manifest: Manifest,
    *,
    already_present: bool = False,
    from_peer: str = "",
    removed_source: bool = False,
    source_tier: str = "",
) -> W:
    return kind(
        model=manifest.model,
        tier=store.name,
        path=str(path),
        size=manifest.size,
        files=len(manifest.files),
        source=manifest.source,
        revision=manifest.revision,
        already_present=already_present,
        from_peer=from_peer,
        removed_source=removed_source,
        source_tier=source_tier,
    )


def _track(ctx: OpContext, counter: ByteCounter) -> None:
    ctx.progress_source = lambda: counter.value


Produce = Callable[[Path, threading.Event, RateLimit | None], Awaitable[Manifest]]


async def _new_copy(
    ctx: OpContext, store: TierStore, model: str, bandwidth: int | None, produce: Produce, kind: type[W]
) -> W:
    """The frame of every op that writes a new copy: one writer per model and tier, nothing to do
    when the copy is there, `produce` fills the partial directory, then verify-and-publish."""
    check_bandwidth(bandwidth)
    async with _lock(ctx, store.name, model):
        existing = await asyncio.to_thread(store.manifest, model)
        if existing is not None:
            return _result(kind, store, store.model_dir(model), existing, already_present=True)
        cancel = threading.Event()
        partial = store.partial_dir(model)
        limit = RateLimit(bandwidth, cancel) if bandwidth else None
        try:
            manifest = await produce(partial, cancel, limit)
            manifest.model = model
            manifest.created_at = time.time()
            path = await asyncio.to_thread(store.publish, model, partial, manifest)
            # Published first, so peers reading the partial copy find the final one at once.
            await asyncio.to_thread(_drop_bookkeeping, path)
        except asyncio.CancelledError:
            # A user's cancel gives the space back; a stop keeps the work to resume, as a crash does.
            if not ctx.keep_partial:
                await asyncio.to_thread(store.discard_partial, model)
            raise
        except OSError as exc:
            ctx.partial = await asyncio.to_thread(store.partial_holding, model)
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise local_write_error(exc, f"{model} to {store.name}") from None
        except Exception:
            # Kept to resume; the head lists it as a partial copy that a delete frees.
            ctx.partial = await asyncio.to_thread(store.partial_holding, model)
            raise
        return _result(kind, store, path, manifest, from_peer=ctx.peer)


async def download(ctx: OpContext, args: DownloadArgs) -> DownloadResult:
    """Fetch a model from the Hub, a URL or a local path into a tier (peers first, if given)."""
    store = _store(ctx, args.tier)
    source = parse_source(args.source_url)
    peer_errors: list[str] = []

    async def produce(partial: Path, cancel: threading.Event, limit: RateLimit | None) -> Manifest:
        if args.peers:
            try:
                return await _from_peers(ctx, store, args.model_name, args.peers, partial, cancel, limit)
            except TransferError as exc:
                peer_errors.append(exc.message)
        ctx.progress(0, 0, f"resolving {source}")
        if isinstance(source, FileSource):
            return await _from_local(ctx, store, source, partial, cancel, limit)
        return await _from_remote(ctx, store, source, args, partial, cancel, limit)

    result = await _new_copy(ctx, store, args.model_name, args.bandwidth_limit, produce, DownloadResult)
    result.peer_errors = peer_errors
    return result


async def fetch(ctx: OpContext, args: FetchArgs) -> FetchResult:
    """Pull a verified copy of a model from peers (in the order given) into a tier."""
    store = _store(ctx, args.tier)

    async def produce(partial: Path, cancel: threading.Event, limit: RateLimit | None) -> Manifest:
        return await _from_peers(ctx, store, args.model_name, args.peers, partial, cancel, limit)

    return await _new_copy(ctx, store, args.model_name, args.bandwidth_limit, produce, FetchResult)


async def _from_peers(
    ctx: OpContext,
    store: TierStore,
    model: str,
    peers: list[PeerSource],
    partial: Path,
    cancel: threading.Event,
    limit: RateLimit | None,
) -> Manifest:
    """Fetch from the first peer that works; a failing peer hands over to the next, and what
    was fetched already is kept (every peer serves the same verified bytes)."""
    errors: list[str] = []
    for peer in peers:
        headers = {"Authorization": f"Bearer {peer.token}"}
        base = f"{peer.url.rstrip('/')}/models/{quote(model)}/{peer.tier}"
        try:
            ctx.progress(ctx.done, ctx.total, f"asking {peer.node_id} for its manifest")
            raw = await run_blocking(cancel, fetch_json, f"{base}/manifest", headers, 15.0, ctx.agent.tls)
            remote = msgspec.convert(raw, Manifest)
            files = [
                RemoteFile(
                    rel=safe_relpath(str(f["path"])),
                    url=f"{base}/files/{quote(str(f['path']))}",
                    size=int(f["size"]),
                    sha256=str(f.get("sha256") or ""),
                    git_sha1=str(f.get("git_sha1") or ""),
                )
                for f in raw["files"]
            ]
            counter = ByteCounter()
            downloader = await asyncio.to_thread(
                RangeDownloader, partial, headers, counter, cancel, limit=limit, tls=ctx.agent.tls
            )
            have = downloader.already_done(files)
            await asyncio.to_thread(store.check_space, remote.size - have)
            await asyncio.to_thread(write_plan, partial, model, files, remote.source, remote.revision)
            counter.value = have
            _track(ctx, counter)
            ctx.progress(have, remote.size, f"fetching from {peer.node_id}")
            try:
                await run_blocking(cancel, downloader.run, files)
                ctx.progress_source = None
                ctx.progress(remote.size, remote.size, "verifying")
                entries = await run_blocking(
                    cancel, verify_files, partial, files, cancel, 4, downloader.hashes
                )
            except Cancelled:
                raise asyncio.CancelledError from None
            except TransferError as exc:
                if exc.code == "checksum_mismatch":
                    await asyncio.to_thread(downloader.state.forget, exc.message.partition(":")[0])
                raise
            ctx.peer = peer.node_id
            return Manifest(model=model, files=entries, source=remote.source, revision=remote.revision)
        except (TransferError, NotFound, Forbidden, msgspec.ValidationError) as exc:
            ctx.progress_source = None
            message = exc.message if isinstance(exc, GswarmError) else str(exc)
            errors.append(f"{peer.node_id}: {message}")
    raise TransferError("no peer could serve the copy: " + "; ".join(errors), code="peers_failed")


async def _from_remote(
    ctx: OpContext,
    store: TierStore,
    source: HubSource | HttpSource,
    args: DownloadArgs,
    partial: Path,
    cancel: threading.Event,
    limit: RateLimit | None = None,
) -> Manifest:
    plan: FetchPlan
    if isinstance(source, HubSource):
        plan = await run_blocking(cancel, resolve_hub, source, args.allow_patterns, args.ignore_patterns)
    else:
        plan = resolve_http(source)
    counter = ByteCounter()
    downloader = await asyncio.to_thread(
        RangeDownloader, partial, plan.headers, counter, cancel, limit=limit, tls=ctx.agent.tls
    )
    await run_blocking(cancel, downloader.probe_sizes, plan.files)  # a URL's size: the total up front
    have = downloader.already_done(plan.files)
    if plan.total:
        await asyncio.to_thread(store.check_space, plan.total - have)
    if all(f.size is not None for f in plan.files):
        await asyncio.to_thread(write_plan, partial, args.model_name, plan.files, str(source), plan.revision)
    else:
        await asyncio.to_thread(partial.mkdir, parents=True, exist_ok=True)
    counter.value = have
    _track(ctx, counter)
    what = f"downloading {counted(len(plan.files), 'file')}"
    ctx.progress(have, plan.total, what + (" (resuming)" if have else ""))
    try:
        await run_blocking(cancel, downloader.run, plan.files)
    except Cancelled:
        raise asyncio.CancelledError from None
    total = sum(f.size or 0 for f in plan.files)
    ctx.progress_source = None
    ctx.progress(total, total, "verifying")
    try:
        files = await run_blocking(
            cancel, verify_files, partial, plan.files, cancel, VERIFY_WORKERS, downloader.hashes
        )
    except TransferError as exc:
        if exc.code == "checksum_mismatch":
            # Never keep bytes that failed their checksum: the next attempt fetches them anew.
            bad = exc.message.partition(":")[0]
            await asyncio.to_thread(downloader.state.forget, bad)
        raise
    src = str(source)
    return Manifest(
        model="",
        files=files,
        source=src if isinstance(source, HubSource) else source.url,
        revision=plan.revision,
    )


async def _from_local(
    ctx: OpContext,
    store: TierStore,
    source: FileSource,
    partial: Path,
    cancel: threading.Event,
    limit: RateLimit | None = None,
) -> Manifest:
    root = Path(source.path)
    base, files = await asyncio.to_thread(_list_allowed, ctx.agent.file_roots, source.path)
    total = sum(size for _, size in files)
    await asyncio.to_thread(store.discard_partial, partial.name)
    await asyncio.to_thread(store.check_space, total)
    counter = ByteCounter()
    _track(ctx, counter)
    ctx.progress(0, total, f"copying {counted(len(files), 'file')} from {root}")
    try:
        await run_blocking(
            cancel, copy_files, base, partial, files, counter, cancel, 4, ctx.agent.file_roots.check_fd, limit
        )
        ctx.progress_source = None
        ctx.progress(total, total, "hashing")
        entries = await run_blocking(cancel, hash_manifest, partial, [rel for rel, _ in files], cancel)
    except Cancelled:
        raise asyncio.CancelledError from None
    except Forbidden:
        await asyncio.to_thread(store.discard_partial, partial.name)
        raise
    return Manifest(model="", files=entries, source=f"file://{root}")


def _list_allowed(roots: FileRoots, path: str) -> tuple[Path, list[tuple[str, int]]]:
    """A `file://` source's files, each of them below a root this node allows (Forbidden else)."""
    base, files = list_local(roots.check(path))
    for rel, _ in files:
        roots.check(str(base / rel))
    return base, files


async def copy(ctx: OpContext, args: CopyArgs) -> CopyResult:
    """Copy (or move) a published copy between this node's tiers."""
    if args.source_tier == args.target_tier:
        raise BadRequest("source and target are the same tier")
    src = _store(ctx, args.source_tier)
    dst = _store(ctx, args.target_tier)
    model = args.model_name
    first, second = sorted([args.source_tier, args.target_tier])
    async with _lock(ctx, first, model), _lock(ctx, second, model):
        manifest = await asyncio.to_thread(src.manifest, model)
        if manifest is None:
            raise Conflict(f"{model} is not held on {args.source_tier} of this node", code="not_held")
        present = await asyncio.to_thread(dst.manifest, model)
        if present is not None and _same(present, manifest):
            removed = False
            if args.remove_source:
                removed = await asyncio.to_thread(src.remove, model)
            return _result(
                CopyResult,
                dst,
                dst.model_dir(model),
                present,
                already_present=True,
                removed_source=removed,
                source_tier=args.source_tier,
            )
        cancel = threading.Event()
        partial = dst.partial_dir(model)
        await asyncio.to_thread(dst.discard_partial, model)
        await asyncio.to_thread(dst.check_space, manifest.size)
        counter = ByteCounter()
        _track(ctx, counter)
        ctx.progress(0, manifest.size, f"copying {args.source_tier} -> {args.target_tier}")
        files = [(f.path, f.size) for f in manifest.files]
        try:
            await run_blocking(cancel, copy_files, src.model_dir(model), partial, files, counter, cancel)
            if args.verify == "sha256":
                ctx.progress_source = None
                ctx.progress(manifest.size, manifest.size, "verifying")
                await run_blocking(cancel, _verify_against, partial, manifest, cancel)
        except (asyncio.CancelledError, Cancelled):
            if not ctx.keep_partial:
                await asyncio.to_thread(dst.discard_partial, model)
            raise asyncio.CancelledError from None
        except BaseException:
            await asyncio.to_thread(dst.discard_partial, model)
            raise
        copied = Manifest(
            model=model,
            files=manifest.files,
            source=manifest.source,
            revision=manifest.revision,
            created_at=time.time(),
        )
        path = await asyncio.to_thread(dst.publish, model, partial, copied)
        removed = False
        if args.remove_source:
            removed = await asyncio.to_thread(src.remove, model)
        return _result(CopyResult, dst, path, copied, removed_source=removed, source_tier=args.source_tier)


def _drop_bookkeeping(partial: Path) -> None:
    for name in (DOWNLOAD_STATE, DOWNLOAD_PLAN):
        (partial / name).unlink(missing_ok=True)


def _same(a: Manifest, b: Manifest) -> bool:
    return [(f.path, f.size, f.sha256) for f in a.files] == [(f.path, f.size, f.sha256) for f in b.files]


def _verify_against(root: Path, manifest: Manifest, cancel: threading.Event) -> list[ManifestFile]:
    wanted = [RemoteFile(rel=f.path, url="", size=f.size, sha256=f.sha256) for f in manifest.files]
    return verify_files(root, wanted, cancel)


async def delete(ctx: OpContext, args: DeleteArgs) -> DeleteResult:
    """Remove a published copy (and any unfinished work) of a model from a tier."""
    if args.tier.startswith("gpu"):
        index = int(args.tier[3:])
        for svc in [  # the builtin server serves from the resident copy; other backends load their own
            s
            for s in ctx.agent.services.services()
            if s.model == args.model_name and s.device.endswith(f":{args.tier}") and s.backend == "builtin"
        ]:
            await ctx.agent.services.stop(svc.service_id)
        freed = await ctx.agent.gpu_pool.unload(index, args.model_name)
        ctx.agent.holdings_changed()
        return DeleteResult(model=args.model_name, tier=args.tier, removed=freed > 0, freed=freed)
    store = _store(ctx, args.tier)
    async with _lock(ctx, args.tier, args.model_name):
        removed = await asyncio.to_thread(store.remove, args.model_name)
        partial = await asyncio.to_thread(store.partial_holding, args.model_name)
        await asyncio.to_thread(store.discard_partial, args.model_name)
    freed = partial.size if partial is not None else 0
    return DeleteResult(
        model=args.model_name, tier=args.tier, removed=removed or partial is not None, freed=freed
    )
