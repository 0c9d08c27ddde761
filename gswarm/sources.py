"""Where a download comes from: parse and validate a source URL. No I/O.

- Hugging Face: `https://huggingface.co/ORG/REPO` (also `/tree/REV`), `hf://ORG/REPO[@REV]`
  or plain `ORG/REPO`; the bytes come from `HF_ENDPOINT` when it is set.
- Any other `http(s)://` URL: one file.
- `file:///path`: a local file or directory on the agent's machine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit

from gswarm.errors import BadRequest

_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_REPO_ID_RE = re.compile(rf"(?:{_REPO_PART}/)?{_REPO_PART}")
_HUB_HOSTS = frozenset({"huggingface.co", "www.huggingface.co", "hf.co"})


@dataclass(frozen=True, slots=True)
class HubSource:
    """A Hugging Face model repo at a revision."""

    repo_id: str
    revision: str = "main"

    def __str__(self) -> str:
        return f"hf://{self.repo_id}@{self.revision}"


@dataclass(frozen=True, slots=True)
class HttpSource:
    """One file at an http(s) URL."""

    url: str
    filename: str

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True, slots=True)
class FileSource:
    """A file or directory on the agent's own filesystem."""

    path: str

    def __str__(self) -> str:
        return f"file://{self.path}"


Source = HubSource | HttpSource | FileSource


def _bad(url: str, why: str) -> BadRequest:
    return BadRequest(
        f"invalid source {url!r}: {why}", code="invalid_source", details={"field": "source_url"}
    )


def _repo(url: str, repo_id: str, revision: str) -> HubSource:
    if not _REPO_ID_RE.fullmatch(repo_id) or ".." in repo_id:
        raise _bad(url, f"{repo_id!r} is not a repo id (ORG/NAME)")
    if not revision or ".." in revision or revision.startswith("/") or len(revision) > 200:
        raise _bad(url, f"{revision!r} is not a revision")
    return HubSource(repo_id, revision)


def _split(url: str) -> SplitResult:
    try:
        parts = urlsplit(url)
        parts.hostname  # noqa: B018 (parses the host: an unclosed [IPv6 is a ValueError here)
    except ValueError as exc:
        raise _bad(url, str(exc)) from None
    return parts


def parse_source(url: str) -> Source:
    """Parse a source URL; BadRequest naming what is wrong."""
    if not isinstance(url, str) or not url.strip():
        raise _bad(str(url), "empty")
    url = url.strip()
    if url.startswith("hf://"):
        rest = url[5:].strip("/")
        repo_id, _, revision = rest.partition("@")
        return _repo(url, repo_id, revision or "main")
    if url.startswith("file://"):
        parts = _split(url)
        if parts.netloc not in ("", "localhost"):
            # file://relative/x would otherwise name /x on the host "relative".
            raise _bad(url, "file:// needs an absolute path (file:///path)")
        path = unquote(parts.path)
        if not path.startswith("/") or "\x00" in path:
            raise _bad(url, "file:// needs an absolute path (file:///path)")
        return FileSource(path)
    if url.startswith(("http://", "https://")):
        parts = _split(url)
        if not parts.hostname:
            raise _bad(url, "no host")
        if parts.hostname.lower() in _HUB_HOSTS:
            segs = [s for s in parts.path.split("/") if s]
            if segs and segs[0] in ("models",):
                segs = segs[1:]
            if len(segs) < 1:
                raise _bad(url, "no repo in the path")
            if len(segs) >= 4 and segs[2] == "tree":
                return _repo(url, "/".join(segs[:2]), unquote("/".join(segs[3:])))
            if len(segs) > 2:
                raise _bad(url, "expected https://huggingface.co/ORG/REPO[/tree/REV]")
            return _repo(url, "/".join(segs), "main")
        name = unquote(parts.path.rstrip("/").rpartition("/")[2])
        if not name or name in (".", "..") or "\x00" in name:
            raise _bad(url, "the URL does not name a file")
        return HttpSource(url, name)
    if "://" not in url and _REPO_ID_RE.fullmatch(url.partition("@")[0]):
        repo_id, _, revision = url.partition("@")
        return _repo(url, repo_id, revision or "main")
    raise _bad(
        url, "expected https://huggingface.co/ORG/REPO, hf://ORG/REPO, ORG/REPO, http(s):// or file://"
    )
