"""Shard files: a small safetensors codec with deterministic headers, header validation
before any tensor data is read, chunked row reads, and sha256 checks computed from
the bytes a read reads anyway."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import GhostprojError
from .manifest import FORMAT_VERSION

_ST_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8,
}


_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def all_finite(t: torch.Tensor) -> bool:
    """One pass and no tensor-sized temporary: a NaN or an infinity shows in the minimum or
    the maximum."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def encode_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialize tensors in the safetensors format with a deterministic header (sorted keys,
    fixed metadata order), so identical runs give byte-identical files."""
    return b"".join(safetensors_parts(tensors, metadata))


def safetensors_header(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                       metadata: dict[str, str] | None = None) -> bytes:
    """The header of a safetensors file holding tensors of these (dtype, shape), their data
    following in sorted name order: known before any tensor is, so a file can be written
    one tensor at a time."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {k: str(metadata[k]) for k in sorted(metadata)}
    offset = 0
    for name in sorted(specs):
        dtype, shape = specs[name]
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep tensor data 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def tensor_buffer(t: torch.Tensor):
    """A tensor's bytes as a buffer over its memory (no copy when it is contiguous on the CPU)."""
    t = t.detach().cpu().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""


def safetensors_parts(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> list:
    """encode_safetensors as [header bytes, one buffer per tensor]: the buffers are views of
    the tensors' memory, so a large file is written without a copy of it."""
    header = safetensors_header({n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}, metadata)
    return [header, *(tensor_buffer(tensors[n]) for n in sorted(tensors))]


def encode_shard(grads: torch.Tensor, index: torch.Tensor, loss: torch.Tensor, tokens: torch.Tensor, fp: str) -> bytes:
    tensors = {
        "grads": grads,
        "index": index.to(torch.int64),
        "loss": loss.to(torch.float32),
        "tokens": tokens.to(torch.int32),
    }
    return encode_safetensors(tensors, {"format": str(FORMAT_VERSION), "fingerprint": fp})


@dataclass
class ShardHeader:
    path: Path
    data_start: int
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]  # name -> dtype, shape, begin, end
    metadata: dict[str, str]


def read_shard_header(path: Path) -> ShardHeader:
    """Parse and validate a safetensors header without reading tensor data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("too short")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise ValueError("header size out of range")
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise GhostprojError(f"Shard {path} is missing; {REPAIR_HINT}.") from None
    except PermissionError:
        raise GhostprojError(f"Shard {path} cannot be read: permission denied.") from None
    except (ValueError, UnicodeDecodeError, OSError):
        raise damaged_shard(path, "its header cannot be read") from None
    data_start = 8 + n
    metadata = header.pop("__metadata__", {}) or {}
    tensors = {}
    try:
        for name, spec in header.items():
            dtype = _ST_DTYPES[spec["dtype"]]
            shape = tuple(int(s) for s in spec["shape"])
            begin, end = (int(o) for o in spec["data_offsets"])
            numel = int(np.prod(shape)) if shape else 1
            if end - begin != numel * torch.empty(0, dtype=dtype).element_size() or data_start + end > size:
                raise ValueError(name)
            tensors[name] = (dtype, shape, begin, end)
    except (KeyError, ValueError, TypeError):
        raise damaged_shard(path, "its tensors do not fit the file (truncated?)") from None
    return ShardHeader(path, data_start, tensors, metadata)


def validate_shard(header: ShardHeader, rows: int, dim: int, store_dtype: torch.dtype, fp: str) -> None:
    want = {
        "grads": (store_dtype, (rows, dim)),
        "index": (torch.int64, (rows,)),
        "loss": (torch.float32, (rows,)),
        "tokens": (torch.int32, (rows,)),
    }
    for name, (dtype, shape) in want.items():
        got = header.tensors.get(name)
        if got is None or got[0] != dtype or got[1] != shape:
            raise damaged_shard(header.path, f"its tensor '{name}' does not match the manifest")
    if header.metadata.get("fingerprint") != fp:
        raise GhostprojError(f"Shard {header.path} belongs to a different run (its fingerprint differs); "
                             "it was copied in from elsewhere: remove it and rerun the project command.")


def read_rows(header: ShardHeader, name: str, start: int, stop: int, hasher=None) -> torch.Tensor:
    """Rows [start, stop) of a 1-D or 2-D tensor, read from disk into fresh memory (no mmap,
    so resident memory stays bounded by the chunk). ``hasher`` is fed the bytes read."""
    dtype, shape, begin, _ = header.tensors[name]
    row_elems = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    itemsize = torch.empty(0, dtype=dtype).element_size()
    count = (stop - start) * row_elems
    buf = bytearray(count * itemsize)
    with open(header.path, "rb") as f:
        f.seek(header.data_start + begin + start * row_elems * itemsize)
        got = f.readinto(buf)
    if got != len(buf):
        raise GhostprojError(f"Shard {header.path} is truncated; {REPAIR_HINT}")
    if hasher is not None:
        hasher.update(buf)
    t = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
    t = t.view(dtype)
    return t.reshape((stop - start,) + tuple(shape[1:]))


class ShardHasher:
    """The sha256 of a shard file computed from the bytes a chunked read of its 'grads'
    rows reads anyway: the bytes before them once, each chunk as it is read (in order),
    the bytes after them at the end. Shards whose 'grads' rows are not read front to back
    are hashed in one separate pass instead."""

    def __init__(self, header: ShardHeader, expected: str) -> None:
        self.header, self.expected = header, expected
        self._h = hashlib.sha256()

    def _raw(self, begin: int, end: int) -> bytes:
        with open(self.header.path, "rb") as f:
            f.seek(begin)
            return f.read(end - begin)

    def start(self) -> None:
        self._h.update(self._raw(0, self.header.data_start + self.header.tensors["grads"][2]))

    def update(self, data) -> None:
        self._h.update(data)

    def finish(self) -> None:
        size = self.header.path.stat().st_size
        self._h.update(self._raw(self.header.data_start + self.header.tensors["grads"][3], size))
        if self._h.hexdigest() != self.expected:
            raise damaged_shard(self.header.path, "its sha256 differs from the manifest")


def file_sha256_matches(path: Path, expected: str) -> bool:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest() == expected


REPAIR_HINT = ("rerun the project command that wrote the run with --verify (it recomputes damaged shards), or restore "
               "the file")


def damaged_shard(path: Path, why: str) -> GhostprojError:
    return GhostprojError(f"Shard {path} is damaged: {why}; {REPAIR_HINT}.")
