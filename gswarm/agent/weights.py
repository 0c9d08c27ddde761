"""Loading a safetensors file onto a device: one buffer per file, filled by double-buffered streaming.

The GPU worker loads weights with `WeightLoader`. For each file it reads and checks the header
itself (`read_layout`: the file is input from elsewhere, so every offset, size and dtype is
checked before anything is allocated), allocates one byte buffer for the whole data section on
the device, and streams the data section into it in chunks through two host staging buffers
used in turn: while chunk k is copied host -> device, chunk k+1 is read from the file into the
other buffer. Each tensor is then a view of the device buffer (a tensor whose offset is not a
multiple of its element size gets an aligned copy of its own).

On CUDA the staging buffers are pinned and the copies run on a stream of their own, an event per
staging buffer saying when it may be refilled. On a simulated GPU (device "cpu") the same code
runs with ordinary host buffers and synchronous copies; only `_CudaCopier` / `_HostCopier`
differ. torch is imported lazily (it is the optional `gpu` extra) and typed as `Any`.
"""

from __future__ import annotations

import ctypes
import io
import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

DEFAULT_CHUNK_BYTES = 64 << 20
"""Bytes per staging buffer: large enough that each copy and read is efficient, small enough
that two pinned buffers cost little host memory."""

MAX_HEADER_BYTES = 100 << 20
"""The largest JSON header accepted (safetensors' own limit): the header is read into memory
before it is checked."""

DTYPE_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
"""Bytes per element of each safetensors dtype this loader knows."""

_TORCH_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}

Progress = Callable[[int], None]
"""Called with the bytes loaded so far (over all files of one `WeightLoader.load`)."""


class HeaderError(ValueError):
    """A safetensors file whose header is malformed or does not fit the file."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file; `start`/`end` are byte offsets into the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Layout:
    """A checked safetensors header: where the data section starts and how much of it the
    tensors use (`data_bytes`, the end of the last tensor)."""

    data_offset: int
    data_bytes: int
    tensors: tuple[TensorEntry, ...]


def read_layout(f: BinaryIO, file_size: int) -> Layout:
    """Read and check the header of the safetensors file `f` (positioned at its start).

    Refuses (HeaderError) a header length beyond the file or above MAX_HEADER_BYTES, JSON that is
    not an object of tensor entries, duplicate names, unknown dtypes, shapes that are not lists
    of non-negative integers, offsets outside the data section or overlapping, and a byte count
    that is not the shape's element count times the dtype's size. `__metadata__` is ignored.
    """
    prefix = f.read(8)
    if len(prefix) != 8:
        raise HeaderError(f"file of {file_size} bytes is too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_HEADER_BYTES:
        raise HeaderError(f"header of {header_len} bytes is larger than the limit of {MAX_HEADER_BYTES}")
    if 8 + header_len > file_size:
        raise HeaderError(f"header of {header_len} bytes runs past the end of the {file_size}-byte file")
    raw = f.read(header_len)
    if len(raw) != header_len:
        raise HeaderError("file ended inside the header")
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeaderError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise HeaderError("header is not a JSON object")
    data_offset = 8 + header_len
    data_size = file_size - data_offset
    tensors = [_entry(name, spec, data_size) for name, spec in header.items() if name != "__metadata__"]
    end = 0
    for t in sorted((t for t in tensors if t.end > t.start), key=lambda t: t.start):
        if t.start < end:
            raise HeaderError(f"tensor {t.name!r} overlaps another tensor (bytes {t.start}..{t.end})")
        end = t.end
    return Layout(data_offset, max((t.end for t in tensors), default=0), tuple(tensors))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise HeaderError(f"header names {key!r} twice")
        out[key] = value
    return out


def _entry(name: str, spec: Any, data_size: int) -> TensorEntry:
    if not isinstance(spec, dict):
        raise HeaderError(f"entry {name!r} is not an object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise HeaderError(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise HeaderError(f"tensor {name!r} has invalid shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise HeaderError(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    start, end = offsets
    if not start <= end <= data_size:
        raise HeaderError(
            f"tensor {name!r} data_offsets [{start}, {end}] lie outside the {data_size}-byte data section"
        )
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - start != expected:
        raise HeaderError(
            f"tensor {name!r} spans {end - start} bytes, but shape {shape} of {dtype} needs {expected}"
        )
    return TensorEntry(name, dtype, tuple(shape), start, end)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def torch_dtype(torch: Any, name: str) -> Any:
    """The torch dtype of safetensors dtype `name`; HeaderError when this torch has none."""
    attr = _TORCH_DTYPES.get(name)
    dtype = getattr(torch, attr, None) if attr is not None else None
    if dtype is None:
        raise HeaderError(f"dtype {name!r} is not supported by torch {torch.__version__}")
    return dtype


class _HostCopier:
    """Staging for a device in host memory (a simulated GPU): plain buffers, copies done at once."""

    def __init__(self, torch: Any, chunk_bytes: int) -> None:
        self.buffers = [torch.empty(chunk_bytes, dtype=torch.uint8) for _ in range(2)]

    def begin(self) -> None:
        pass

    def wait_free(self, i: int) -> None:
        pass

    def copy(self, dst: Any, i: int, n: int) -> None:
        dst.copy_(self.buffers[i][:n])

    def finish(self) -> None:
        pass


class _CudaCopier:
    """Staging for a CUDA device: pinned buffers, asynchronous copies on a stream of their own,
    an event per buffer recorded after its copy (the buffer may be refilled once it completed)."""

    def __init__(self, torch: Any, device: Any, chunk_bytes: int) -> None:
        self.torch = torch
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.buffers = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.events = [torch.cuda.Event(), torch.cuda.Event()]
        self.pending = [False, False]

    def begin(self) -> None:
        # The destination was just allocated on the current stream, possibly from memory whose
        # last use there has not finished yet: the copy stream starts after it.
        self.stream.wait_stream(self.torch.cuda.current_stream(self.device))

    def wait_free(self, i: int) -> None:
        if self.pending[i]:
            self.events[i].synchronize()
            self.pending[i] = False

    def copy(self, dst: Any, i: int, n: int) -> None:
        with self.torch.cuda.stream(self.stream):
            dst.copy_(self.buffers[i][:n], non_blocking=True)
        self.events[i].record(self.stream)
        self.pending[i] = True

    def finish(self) -> None:
        self.stream.synchronize()
        self.pending = [False, False]


class WeightLoader:
    """Loads safetensors files onto one device (`cuda:N` or `cpu`), `chunk_bytes` at a time."""

    def __init__(self, device: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        self.device = device
        self.chunk_bytes = chunk_bytes

    def load(self, paths: list[str], progress: Progress | None = None) -> dict[str, Any]:
        """All tensors of the files `paths` by name, resident on the device. Raises HeaderError
        for a malformed file and ValueError for a name found in two files. `progress` gets the
        bytes loaded so far after each chunk."""
        import torch

        device = torch.device(self.device)
        copier: _HostCopier | _CudaCopier
        if device.type == "cuda":
            copier = _CudaCopier(torch, device, self.chunk_bytes)
        else:
            copier = _HostCopier(torch, self.chunk_bytes)
        tensors: dict[str, Any] = {}
        done = 0

        def file_progress(n: int) -> None:
            if progress is not None:
                progress(done + n)

        for path in paths:
            buffer, layout = self._stream_file(torch, device, copier, path, file_progress)
            done += layout.data_bytes
            for name, tensor in _views(torch, buffer, layout).items():
                if name in tensors:
                    raise ValueError(f"tensor {name!r} is in more than one file")
                tensors[name] = tensor
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the aligned copies of misaligned tensors included
        return tensors

    def _stream_file(
        self, torch: Any, device: Any, copier: _HostCopier | _CudaCopier, path: str, progress: Progress
    ) -> tuple[Any, Layout]:
        """The data section of `path` in one new device buffer, read chunk by chunk into the two
        staging buffers in turn, each chunk's copy overlapping the read of the next."""
        with open(path, "rb", buffering=0) as f:
            layout = read_layout(f, os.fstat(f.fileno()).st_size)
            for t in layout.tensors:
                torch_dtype(torch, t.dtype)  # a dtype this torch lacks fails before allocating
            buffer = torch.empty(layout.data_bytes, dtype=torch.uint8, device=device)
            copier.begin()
            try:
                pos, i = 0, 0
                while pos < layout.data_bytes:
                    n = min(self.chunk_bytes, layout.data_bytes - pos)
                    copier.wait_free(i)
                    _read_exactly(f, copier.buffers[i], n)
                    copier.copy(buffer[pos : pos + n], i, n)
                    pos += n
                    i ^= 1
                    progress(pos)
            finally:
                copier.finish()
        return buffer, layout


def _read_exactly(f: io.FileIO, staging: Any, n: int) -> None:
    """Fill the first `n` bytes of the host tensor `staging` from `f`."""
    view = memoryview((ctypes.c_ubyte * n).from_address(staging.data_ptr())).cast("B")
    got = 0
    while got < n:
        k = f.readinto(view[got:])
        if not k:
            raise HeaderError(f"file ended {n - got} bytes before the end of its data section")
        got += k


def _views(torch: Any, buffer: Any, layout: Layout) -> dict[str, Any]:
    """The tensors of `layout` as views of the byte buffer holding its data section; a tensor whose
    offset is not a multiple of its element size (torch cannot view it) is copied to its own."""
    out: dict[str, Any] = {}
    for t in layout.tensors:
        dtype = torch_dtype(torch, t.dtype)
        raw = buffer[t.start : t.end]
        if t.start % DTYPE_SIZES[t.dtype] == 0:
            out[t.name] = raw.view(dtype).view(t.shape)
        else:
            own = torch.empty(t.shape, dtype=dtype, device=buffer.device)
            own.view(-1).view(torch.uint8).copy_(raw)
            out[t.name] = own
    return out
