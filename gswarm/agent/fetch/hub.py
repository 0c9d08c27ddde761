"""What to fetch: RemoteFile and FetchPlan, resolved from a Hub repo (through huggingface_hub:
files, sizes, hashes, auth, revision) or from a plain URL."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from gswarm.agent.fetch.common import TransferError
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
    token = os.environ.get("HF_TOKEN") or None
    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.model_info(source.repo_id, revision=source.revision, files_metadata=True)
    except GatedRepoError as exc:
        raise TransferError(f"{source.repo_id} is gated: accept its terms and set HF_TOKEN ({exc})") from None
    except RevisionNotFoundError:
        raise NotFound(
            f"revision {source.revision!r} of {source.repo_id} not found on {endpoint}",
            code="revision_not_found",
        ) from None
    except (RepositoryNotFoundError, EntryNotFoundError):
        raise NotFound(
            f"repository {source.repo_id} not found on {endpoint} (private? set HF_TOKEN)",
            code="repo_not_found",
        ) from None
    except HfHubHTTPError as exc:
        raise TransferError(f"the Hub at {endpoint} answered: {exc}", code="source_error") from None
    except OSError as exc:
        raise TransferError(f"cannot reach the Hub at {endpoint}: {exc}", code="source_unreachable") from None
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
    """A single-file plan for a plain URL (size learnt when fetching)."""
    return FetchPlan(files=[RemoteFile(rel=safe_relpath(source.filename), url=source.url, size=None)])
