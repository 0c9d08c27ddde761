"""Byte sizes as people write them (`16G`, `512MiB`, `1.5T`): binary units. No I/O."""

from __future__ import annotations

import re

_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """`16G`, `512MiB`, `1.5T`, `1048576` -> bytes."""
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"not a size: {text!r} (try 16G, 512M)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
