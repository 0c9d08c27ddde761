"""The weight loader of the GPU worker (gswarm.agent.weights) on the simulated GPU (device "cpu",
the same streaming code as on CUDA): tensors byte-identical to safetensors' own loader for every
dtype and chunk size, and hostile headers refused before anything is allocated. Needs torch and
safetensors (the gpu extra); elsewhere these tests skip."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="needs torch (the gpu extra): run `tox -e py`")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="needs safetensors (the gpu extra)")

from gswarm.agent.weights import MAX_HEADER_BYTES, HeaderError, WeightLoader  # noqa: E402

CODES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _mixed() -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)
    return {
        "w.f32": torch.randn(33, 31, generator=g),
        "w.f16": torch.randn(257, generator=g).half(),
        "w.bf16": torch.randn(5, 7, 3, generator=g).bfloat16(),
        "ids.i64": torch.randint(-(2**40), 2**40, (19,), generator=g),
        "mask.bool": torch.rand(23, generator=g) > 0.5,
        "scale.scalar": torch.tensor(3.25),
        "empty.f32": torch.empty(0, 4),
        **(
            {"w.f8": torch.randn(9, generator=g).to(torch.float8_e4m3fn)}
            if hasattr(torch, "float8_e4m3fn")
            else {}
        ),
    }


def _raw(t: Any) -> Any:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _assert_identical(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert (g.dtype, tuple(g.shape), g.device.type) == (w.dtype, tuple(w.shape), "cpu"), name
        assert torch.equal(_raw(g), _raw(w)), name


def _write_by_hand(path: Path, tensors: dict[str, Any], starts: dict[str, int]) -> None:
    """A safetensors file with each tensor at the data-section offset `starts` gives (so offsets
    that safetensors' writer would never choose, such as misaligned ones)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    size = max(starts[n] + t.numel() * t.element_size() for n, t in tensors.items())
    data = bytearray(size)
    for name, t in tensors.items():
        raw = bytes(_raw(t).tolist())
        start = starts[name]
        data[start : start + len(raw)] = raw
        header[name] = {
            "dtype": CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [start, start + len(raw)],
        }
    _write_raw(path, json.dumps(header).encode(), bytes(data))


def _write_raw(path: Path, header: bytes, data: bytes, header_len: int | None = None) -> None:
    length = len(header) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", length) + header + data)


@pytest.mark.parametrize("chunk", [1, 7, 4096, 64 << 20], ids=lambda c: f"chunk{c}")
def test_loaded_tensors_are_byte_identical_to_load_file(tmp_path: Path, chunk: int) -> None:
    """Chunks of 1 and 7 bytes are smaller than most tensors and divide nothing evenly."""
    path = tmp_path / "mixed.safetensors"
    safetensors_torch.save_file(_mixed(), str(path))
    seen: list[int] = []
    got = WeightLoader("cpu", chunk_bytes=chunk).load([str(path)], seen.append)
    _assert_identical(got, safetensors_torch.load_file(str(path)))
    data_bytes = sum(t.numel() * t.element_size() for t in _mixed().values())
    assert seen == sorted(seen) and seen[-1] == data_bytes
    # The worker holds its own copy, one buffer for the file: rewriting the file changes nothing.
    assert len({t.untyped_storage().data_ptr() for t in got.values() if t.numel()}) == 1
    before = {n: t.clone() for n, t in got.items()}
    path.write_bytes(b"\0" * path.stat().st_size)
    _assert_identical(got, before)


def test_misaligned_offsets_and_several_files(tmp_path: Path) -> None:
    """Tensors at offsets that are not multiples of their element size still load (copied to an
    aligned place of their own); names of all files are merged; progress counts across files."""
    first = {
        "pad": torch.arange(3, dtype=torch.uint8),
        "odd.f32": torch.randn(10),
        "odd.i64": torch.arange(-5, 6, dtype=torch.int64),
        "odd.f16": torch.randn(3).half(),
        "odd.scalar": torch.tensor(-1.5),
        "odd.empty": torch.empty(0, dtype=torch.int32),
    }
    starts = {"pad": 0, "odd.f32": 3, "odd.i64": 43, "odd.f16": 131, "odd.scalar": 137, "odd.empty": 141}
    _write_by_hand(tmp_path / "a.safetensors", first, starts)
    second = {"b.bf16": torch.randn(4, 4).bfloat16(), "b.bool": torch.tensor([True, False, True])}
    safetensors_torch.save_file(second, str(tmp_path / "b.safetensors"))
    seen: list[int] = []
    paths = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    got = WeightLoader("cpu", chunk_bytes=16).load(paths, seen.append)
    _assert_identical(got, {**first, **second})
    _assert_identical(got, {k: v for p in paths for k, v in safetensors_torch.load_file(p).items()})
    assert all(t.data_ptr() % t.element_size() == 0 for t in got.values())
    assert seen[-1] == 141 + 32 + 3


def test_a_name_in_two_files_is_refused(tmp_path: Path) -> None:
    for name in ("a", "b"):
        safetensors_torch.save_file({"w": torch.ones(2)}, str(tmp_path / f"{name}.safetensors"))
    with pytest.raises(ValueError, match="'w' is in more than one file"):
        WeightLoader("cpu").load([str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")])


def _entry(dtype: str, shape: list[Any], offsets: list[Any]) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


HOSTILE: list[tuple[str, bytes, bytes, int | None, str]] = [
    ("header length beyond the file", b"{}", b"", 1000, "runs past the end"),
    ("huge header", b"{}", b"", MAX_HEADER_BYTES + 1, "larger than the limit"),
    ("not JSON", b"{nope", b"", None, "not valid JSON"),
    ("not an object", b"[1, 2]", b"", None, "not a JSON object"),
    (
        "offsets beyond the data",
        json.dumps({"w": _entry("F32", [4], [0, 16])}).encode(),
        b"\0" * 8,
        None,
        "outside",
    ),
    ("offsets reversed", json.dumps({"w": _entry("U8", [0], [8, 4])}).encode(), b"\0" * 8, None, "outside"),
    (
        "overlapping tensors",
        json.dumps({"a": _entry("F32", [2], [0, 8]), "b": _entry("F32", [2], [4, 12])}).encode(),
        b"\0" * 12,
        None,
        "overlaps",
    ),
    (
        "shape x dtype mismatch",
        json.dumps({"w": _entry("F32", [3], [0, 8])}).encode(),
        b"\0" * 8,
        None,
        "needs 12",
    ),
    ("unknown dtype", json.dumps({"w": _entry("Q7", [1], [0, 1])}).encode(), b"\0", None, "unknown dtype"),
    (
        "negative dimension",
        json.dumps({"w": _entry("U8", [-1], [0, 0])}).encode(),
        b"",
        None,
        "invalid shape",
    ),
    (
        "boolean offset",
        json.dumps({"w": _entry("U8", [1], [False, True])}).encode(),
        b"\0",
        None,
        "invalid data_off",
    ),
    ("duplicate name", b'{"w": {}, "w": {}}', b"", None, "names 'w' twice"),
    ("file too short", b"", b"", None, "too short"),
]


@pytest.mark.parametrize(
    ("header", "data", "length", "why"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE]
)
def test_hostile_headers_are_refused(
    tmp_path: Path, header: bytes, data: bytes, length: int | None, why: str
) -> None:
    path = tmp_path / "bad.safetensors"
    if header or data or length is not None:
        _write_raw(path, header, data, length)
    else:
        path.write_bytes(b"\1\0\0")
    with pytest.raises(HeaderError, match=why):
        WeightLoader("cpu").load([str(path)])
