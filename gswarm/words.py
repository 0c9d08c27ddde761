"""Counts in words, as messages show them to people: `1 file`, `4 files`. No I/O."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str = "") -> str:
    """`n` and the noun, plural unless `n` is 1 (`plural` when the plural is not noun + s)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
