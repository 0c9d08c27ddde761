"""What to fetch: RemoteFile and FetchPlan, resolved from a Hub repo (through huggingface_hub:
files, sizes, hashes, auth, revision) or from a plain URL."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from gswarm.agent.fetch.common import TransferError, network_reason
from gswarm.agent.stores import safe_relpath
from gswarm.errors import NotFound
from gswarm.sources import HttpSource, HubSource


@dataclass
class RemoteFile:
    """One file to fetch: where from, where to, and what it must hash to."""

    rel: str
    url: str
    size: int | None
    sha256: str = ""
    git_sha1: str = ""


@dataclass
class FetchPlan:
    """A resolved source: its files and the revision they come from."""

    files: list[RemoteFile]
    revision: str = ""
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Bytes to fetch in all (unknown sizes count as 0)."""
        return sum(f.size or 0 for f in self.files)


def hub_endpoint() -> str:
    """The Hub to talk to: `$HF_ENDPOINT` read now (not at import), else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hub_token() -> str | None:
    """`$HF_TOKEN` read now, if set."""
    return os.environ.get("HF_TOKEN") or None


def on_hub(url: str) -> bool:
    """Whether `url` is on the Hub this agent talks to (its scheme, host and port)."""
    hub, there = urlsplit(hub_endpoint()), urlsplit(url)
    return (hub.scheme, hub.netloc) == (there.scheme, there.netloc)


HUB_UNREACHABLE_HINT = (
    "check the network, or set HF_ENDPOINT to a mirror (and HF_TOKEN for gated repos) where the agent runs"
)


def access_hint(gated: bool = False) -> str:
    """What to do when the Hub refuses a repo, which depends on whether a token was sent."""
    if hub_token() is None:
        if gated:
            return "accept its terms on the Hub, then set HF_TOKEN (that account's) where the agent runs"
        return "set HF_TOKEN where the agent runs, to a token that may read it"
    if gated:
        return "the HF_TOKEN set where the agent runs may not read it: accept its terms with that account"
    return "the HF_TOKEN set where the agent runs may not read it"


def resolve_hub(source: HubSource, allow: list[str] | None, ignore: list[str] | None) -> FetchPlan:
    """List a Hub repo's files (sizes, hashes) at a revision through huggingface_hub."""
    from huggingface_hub import HfApi, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import build_hf_headers, filter_repo_objects  # type: ignore[attr-defined]

    endpoint = hub_endpoint()
    token = hub_token()
    repo = source.repo_id
    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.model_info(repo, revision=source.revision, files_metadata=True)
    except GatedRepoError:
        raise TransferError(
            f"{repo} is a gated repo on {endpoint}: {access_hint(gated=True)}", code="source_forbidden"
        ) from None
    except RevisionNotFoundError:
        raise NotFound(
            f"revision {source.revision!r} of {repo} not found on {endpoint}", code="revision_not_found"
        ) from None
    except (RepositoryNotFoundError, EntryNotFoundError):
        raise NotFound(
            f"repository {repo} not found on {endpoint} (a private repo needs HF_TOKEN where the agent runs)",
            code="repo_not_found",
        ) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status in (401, 403):
            raise TransferError(
                f"the Hub at {endpoint} refused {repo} (HTTP {status}): {access_hint()}",
                code="source_forbidden",
            ) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TransferError(
            f"the Hub at {endpoint} answered HTTP {status or '?'} for {repo}: {first}", code="source_error"
        ) from None
    except Exception as exc:
        reason = network_reason(exc)
        if reason is None:
            raise
        raise TransferError(
            f"cannot reach the Hub at {endpoint} ({reason}): {HUB_UNREACHABLE_HINT}",
            code="source_unreachable",
        ) from None
    commit = info.sha or source.revision
    siblings = list(
        filter_repo_objects(
            info.siblings or [], allow_patterns=allow, ignore_patterns=ignore, key=lambda s: s.rfilename
        )
    )
    files = []
    for s in siblings:
        rel = safe_relpath(s.rfilename)
        lfs = s.lfs
        files.append(
            RemoteFile(
                rel=rel,
                url=hf_hub_url(source.repo_id, s.rfilename, revision=commit, endpoint=endpoint),
                size=lfs.size if lfs is not None else s.size,
                sha256=lfs.sha256 if lfs is not None else "",
                git_sha1="" if lfs is not None else (s.blob_id or ""),
            )
        )
    if not files:
        raise TransferError(f"{source.repo_id}@{source.revision}: no files to download (check the patterns)")
    headers = build_hf_headers(token=token)
    return FetchPlan(files=files, revision=commit, headers=headers)


def resolve_http(source: HttpSource) -> FetchPlan:
    """A single-file plan for a plain URL (size learnt when fetching). A URL on the Hub carries
    `$HF_TOKEN`, as the Hub's own downloads do (never to another host: see `request`)."""
    token = hub_token()
    headers = {"Authorization": f"Bearer {token}"} if token and on_hub(source.url) else {}
    return FetchPlan(
        files=[RemoteFile(rel=safe_relpath(source.filename), url=source.url, size=None)], headers=headers
    )
