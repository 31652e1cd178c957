"""Projection run directories: shards, manifest, fingerprint, atomic writes and resume.

A run directory holds ``manifest.json``, ``projector.safetensors`` and shards
``grads-rRRR-SSSSS.safetensors``. Run directories may come from someone else, so readers
validate names, sizes and dtypes against the manifest before reading any tensor data,
and nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import GhostprojError
from .layers import LayerInfo

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROJECTOR_FILE = "projector.safetensors"
SHARD_RE = re.compile(r"^grads-r(\d{3})-(\d{5})\.safetensors$")
STORE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_ST_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
# Parts of the fingerprint, in the words `score` uses when two runs disagree.
FINGERPRINT_PARTS = {
    "model_weights": "model weights",
    "layers": "layers",
    "ranks": "k's (ranks)",
    "projector": "projector matrices",
    "loss_reduction": "loss reduction",
    "bias": "bias flag",
}


def _sha(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _all_finite(t: torch.Tensor) -> bool:
    """One pass and no tensor-sized temporary: a NaN or an infinity shows in the minimum or
    the maximum."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def fingerprint(parts: dict[str, str]) -> str:
    return _sha(json.dumps({k: parts[k] for k in sorted(parts)}, sort_keys=True).encode())


def weights_hash(named_tensors: list[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in named_tensors:
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def sampled_weights_hash(named_tensors: list[tuple[str, torch.Tensor]], per_tensor: int = 65536) -> str:
    """A cheap identity of many weights: names, dtypes, shapes and an evenly strided sample
    of at most ``per_tensor`` values of each. Two different checkpoints of a model differ
    in it (fine-tuning moves every weight); hashing all bytes of a multi-billion-parameter
    base would cost a full pass over it."""
    h = hashlib.sha256()
    for name, t in named_tensors:
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // per_tensor)
        h.update(tensor_bytes(flat[::step][:per_tensor]))
    return h.hexdigest()


def fingerprint_parts(
    layers: list[LayerInfo], weights_sha: str, projector_sha: str, loss_reduction: str, bias: bool
) -> dict[str, str]:
    return {
        "model_weights": weights_sha,
        "layers": _sha(json.dumps([[i.name, i.type, i.n_in, i.n_out] for i in layers]).encode()),
        "ranks": _sha(json.dumps([[i.k_in, i.k_out] for i in layers]).encode()),
        "projector": projector_sha,
        "loss_reduction": loss_reduction,
        "bias": "true" if bias else "false",
    }


def differing_part(a: dict, b: dict) -> str | None:
    """The first fingerprint part (in words) on which two manifests disagree, or None."""
    pa, pb = a.get("fingerprint_parts") or {}, b.get("fingerprint_parts") or {}
    if not pa or not pb:  # a bare shard file carries only the fingerprint
        return None if a.get("fingerprint") == b.get("fingerprint") else "fingerprint"
    for key, words in FINGERPRINT_PARTS.items():
        if pa.get(key) != pb.get(key):
            return words
    if a.get("fingerprint") != b.get("fingerprint"):
        return "fingerprint"
    return None


# -- atomic files ----------------------------------------------------------------------
_TMP_MARK = ".tmp-"


def _host() -> str:
    import socket

    return socket.gethostname()


def sweep_stale_temporaries(run_dir: Path) -> list[Path]:
    """Remove temporary files left by writers on this host that were killed mid-write.
    A temporary name carries its writer's host and pid, so a live writer's file (or one
    from another host sharing the filesystem) is never touched."""
    removed = []
    prefix = _TMP_MARK + _host() + "-"
    for path in run_dir.glob(".*" + _TMP_MARK + "*"):
        cut = path.name.rfind(prefix)
        pid = path.name[cut + len(prefix):] if cut >= 0 else ""
        if pid.isdigit() and not _pid_alive(int(pid)):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary name, flush and fsync, then rename: a reader (or a resumed run)
    sees the old file or the new one, never a partial one."""
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{_host()}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_manifest(run_dir: Path, manifest: dict, name: str = MANIFEST) -> None:
    atomic_write(run_dir / name, (json.dumps(manifest, indent=1) + "\n").encode())


def rank_manifest_name(rank: int) -> str:
    """Each torchrun rank's own progress manifest, merged into manifest.json at the end."""
    return f"manifest-r{rank:03d}.json"


def read_manifest(run_dir: str | os.PathLike, name: str = MANIFEST) -> dict:
    run_dir = Path(run_dir)
    path = run_dir / name
    if run_dir.is_file():
        raise GhostprojError(f"{run_dir} is a file; give the run directory that holds it.")
    if not run_dir.is_dir() or not path.is_file():
        raise GhostprojError(f"{run_dir} is not a ghostproj projection run (no {path.name}).")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise GhostprojError(f"{path} is damaged: it is not valid JSON (line {exc.lineno}: {exc.msg}).") from None
    except UnicodeDecodeError:
        raise GhostprojError(f"{path} is damaged: it is not UTF-8 text.") from None
    if not isinstance(manifest, dict) or "format" not in manifest:
        raise GhostprojError(f"{path} is not a ghostproj manifest.")
    if manifest["format"] != FORMAT_VERSION:
        raise GhostprojError(
            f"{path} has format {manifest['format']}, but this ghostproj reads format {FORMAT_VERSION}."
        )
    validate_manifest(manifest, path)
    return manifest


def _is_int(v, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


_LAYER_KEYS = {"name": str, "type": str, "n_in": int, "n_out": int, "k_in": int, "k_out": int, "offset": int}


def validate_manifest(m: dict, path) -> None:
    """Every field a reader relies on, checked before anything is read: a damaged or
    hand-edited manifest is refused in one sentence rather than failing somewhere later."""
    def bad(what: str):
        return GhostprojError(f"{path} is damaged: {what}. Restore it, or project the run again into a new --out.")

    for key, kind in (("fingerprint", str), ("layers", list), ("dim", int), ("store_dtype", str), ("shards", list)):
        if key not in m:
            raise bad(f"it lacks '{key}'")
        if not isinstance(m[key], kind) or isinstance(m[key], bool):
            raise bad(f"'{key}' is not a {kind.__name__}")
    for key, kind in (("bias", bool), ("loss_reduction", str), ("projector", dict), ("model", dict),
                      ("data", dict), ("complete", bool), ("settings", dict)):
        if key in m and not isinstance(m[key], kind):
            raise bad(f"'{key}' is not a {'boolean' if kind is bool else kind.__name__}")
    if m["store_dtype"] not in STORE_DTYPES:
        raise bad(f"its store dtype '{m['store_dtype']}' is none of {', '.join(STORE_DTYPES)}")
    if not m["layers"]:
        raise bad("it lists no layers")
    offset = 0
    for n, layer in enumerate(m["layers"]):
        if not isinstance(layer, dict):
            raise bad(f"layer entry {n} is not an object")
        for key, kind in _LAYER_KEYS.items():
            if key not in layer:
                raise bad(f"layer entry {n} lacks '{key}'")
            ok = isinstance(layer[key], str) if kind is str else _is_int(layer[key])
            if not ok:
                raise bad(f"layer entry {n} has a bad '{key}' ({layer[key]!r})")
        if layer["k_in"] < 1 or layer["k_out"] < 1:
            raise bad(f"layer '{layer['name']}' has a rank below 1")
        if layer["offset"] != offset:
            raise bad(f"layer '{layer['name']}' starts at column {layer['offset']}, not {offset} where the "
                      "previous layer ends")
        offset += layer["k_in"] * layer["k_out"]
    if offset != m["dim"]:
        raise bad(f"its layers add up to {offset} columns but 'dim' says {m['dim']}")
    names = set()
    for n, shard in enumerate(m["shards"]):
        if not isinstance(shard, dict):
            raise bad(f"shard entry {n} is not an object")
        name = shard.get("file", "")
        if not isinstance(name, str) or not SHARD_RE.match(name):
            raise GhostprojError(f"{path} names a shard '{name}' that is not a plain shard file name; refusing it.")
        if name in names:
            raise bad(f"it lists shard {name} twice")
        names.add(name)
        if not _is_int(shard.get("rows")):
            raise bad(f"shard {name} has no valid row count")
        for key, ok in (("bytes", _is_int), ("sha256", lambda v: isinstance(v, str) and len(v) == 64),
                        ("rank", _is_int)):
            if key in shard and not ok(shard[key]):
                raise bad(f"shard {name} has a bad '{key}'")
    projector = m.get("projector")
    if projector is not None and ("kind" not in projector or "seed" not in projector):
        raise bad("its 'projector' lacks 'kind' or 'seed'")


def require_keys(m: dict, keys: tuple[str, ...], path, why: str) -> None:
    """Keys an older or hand-written manifest may lack but this use needs."""
    for key in keys:
        if key not in m:
            raise GhostprojError(f"{path} lacks '{key}', which {why} needs; it was not written by `ghostproj project`.")


# -- shard files ------------------------------------------------------------------------
def encode_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialize tensors in the safetensors format with a deterministic header (sorted keys,
    fixed metadata order), so identical runs give byte-identical files."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {k: str(metadata[k]) for k in sorted(metadata)}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        raw = tensor_bytes(t)
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep tensor data 8-byte aligned
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


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


REPAIR_HINT = "rerun the project command that wrote the run (it recomputes damaged shards), or restore the file"


def damaged_shard(path: Path, why: str) -> GhostprojError:
    return GhostprojError(f"Shard {path} is damaged: {why}; {REPAIR_HINT}.")


def layers_from_manifest(manifest: dict) -> list[LayerInfo]:
    return [LayerInfo.from_json(d) for d in manifest["layers"]]


# -- writing a run ---------------------------------------------------------------------
class RunWriter:
    """Buffers per-example rows and writes full shards atomically, rewriting the manifest
    after each one so an interrupted run can resume from its last complete shard.

    Encoding, hashing and writing a shard happen on a background thread, so the model does
    not wait for the disk; at most one shard is in flight, so memory stays bounded, and a
    write error surfaces at the next ``add`` or at ``finish``."""

    def __init__(self, run_dir: Path, manifest: dict, shard_size: int, rank: int = 0,
                 manifest_name: str = MANIFEST):
        if shard_size < 1:
            raise GhostprojError(f"--shard-size must be at least 1, got {shard_size}.")
        self.run_dir = run_dir
        self.manifest = manifest
        self.shard_size = shard_size
        self.rank = rank
        self.manifest_name = manifest_name
        self.store_dtype = STORE_DTYPES[manifest["store_dtype"]]
        self._buf: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._buffered = 0
        self._pending = None  # the shard write in flight
        self._pool = None

    @property
    def rows_written(self) -> int:
        return sum(s["rows"] for s in self.manifest["shards"])

    def add(self, grads: torch.Tensor, index: torch.Tensor, loss: torch.Tensor, tokens: torch.Tensor) -> None:
        self._buf.append((grads.detach().cpu(), index.cpu(), loss.detach().cpu(), tokens.cpu()))
        self._buffered += grads.shape[0]
        while self._buffered >= self.shard_size:
            self._flush(self.shard_size)

    def finish(self, summary: dict, started: float | None = None) -> None:
        """Write what is buffered, then mark the run complete with ``summary``, its bytes
        counted from the shards and its seconds from ``started`` (a perf_counter value)."""
        import time

        if self._buffered:
            self._flush(self._buffered)
        self.close()
        summary = dict(summary, bytes=sum(s["bytes"] for s in self.manifest["shards"]))
        if started is not None:
            summary["seconds"] = round(time.perf_counter() - started, 3)
        self.manifest["complete"] = True
        self.manifest["summary"] = summary
        write_manifest(self.run_dir, self.manifest, self.manifest_name)

    def replace_shard(self, pos: int, grads: torch.Tensor, index: torch.Tensor, loss: torch.Tensor,
                      tokens: torch.Tensor) -> None:
        """Rewrite the shard at ``pos`` of the manifest's list (a damaged or missing one)
        with recomputed rows, under its own name, and record it."""
        self.wait()
        entry = self.manifest["shards"][pos]
        stored = self._checked(grads, index)
        data = encode_shard(stored, index, loss, tokens, self.manifest["fingerprint"])
        atomic_write(self.run_dir / entry["file"], data)
        entry.update(rows=int(grads.shape[0]), sha256=_sha(data), bytes=len(data), index_min=int(index.min()),
                     index_max=int(index.max()))
        write_manifest(self.run_dir, self.manifest, self.manifest_name)

    def _flush(self, n: int) -> None:
        """Hand the first ``n`` buffered rows to the writer thread. Joining, checking,
        converting and encoding them all happen there: on a GPU the main thread is what
        keeps the device fed, so it only splits the list of batches."""
        take, rest, count = [], [], 0
        for part in self._buf:
            rows = part[0].shape[0]
            if count + rows <= n:
                take.append(part)
                count += rows
            elif count < n:
                k = n - count
                take.append(tuple(c[:k] for c in part))
                rest.append(tuple(c[k:] for c in part))
                count = n
            else:
                rest.append(part)
        self._buf = rest
        self._buffered -= n
        self.wait()  # one shard in flight at a time; also re-raises its error
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ghostproj-writer")
        self._pending = self._pool.submit(self._encode_and_write, take, n)

    def _encode_and_write(self, parts: list, n: int) -> None:
        grads, index, loss, tokens = (torch.cat([p[c] for p in parts]) for c in range(4))
        self._write(self._checked(grads, index), index, loss, tokens, n)

    def _checked(self, grads: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``grads`` in the store dtype, refused when a value is or becomes non-finite."""
        if not _all_finite(grads):
            bad = int(index[~torch.isfinite(grads).all(dim=1)][0])
            raise GhostprojError(f"Example {bad} produced a non-finite gradient; the model or data is broken there.")
        stored = grads.to(self.store_dtype)
        if stored.dtype != grads.dtype and not _all_finite(stored):
            raise GhostprojError(
                f"Projected gradients exceed the range of {self.manifest['store_dtype']}; use --store-dtype bfloat16 or float32."
            )
        return stored

    def wait(self) -> None:
        """Block until the shard in flight is on disk (and its manifest entry written)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Finish the write in flight (if any) and stop the writer thread."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def _write(self, stored, index, loss, tokens, n: int) -> None:
        seq = sum(1 for s in self.manifest["shards"] if s.get("rank", 0) == self.rank)
        name = f"grads-r{self.rank:03d}-{seq:05d}.safetensors"
        data = encode_shard(stored, index, loss, tokens, self.manifest["fingerprint"])
        atomic_write(self.run_dir / name, data)
        self.manifest["shards"].append(
            {
                "file": name,
                "rank": self.rank,
                "rows": n,
                "sha256": _sha(data),
                "bytes": len(data),
                "index_min": int(index.min()),
                "index_max": int(index.max()),
            }
        )
        write_manifest(self.run_dir, self.manifest, self.manifest_name)


# -- reading a run ---------------------------------------------------------------------
@dataclass
class Run:
    """A validated projection run (or a single shard file) ready for chunked reads."""

    path: Path
    manifest: dict
    shards: list[ShardHeader]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def rows(self) -> int:
        return sum(h.tensors["index"][1][0] for h in self.shards)

    @property
    def layers(self) -> list[LayerInfo]:
        return layers_from_manifest(self.manifest)

    def iter_chunks(self, chunk_rows: int = 8192, prefetch: bool = True, convert=None, verify: bool = True):
        """Yield (index [n] int64, grads [n, D] in the store dtype, or ``convert(grads)``) in
        shard order. With ``prefetch`` the next chunk is read (and converted) in a background
        thread while the caller computes on this one. With ``verify`` each shard's sha256
        (where the manifest records one) is computed from the bytes read, in that same
        thread, and a shard that differs stops the iteration, naming it, before its last
        chunk is yielded."""
        entries = self.manifest["shards"]
        spans = []
        for h, entry in zip(self.shards, entries):
            rows = h.tensors["index"][1][0]
            hasher = ShardHasher(h, entry["sha256"]) if verify and "sha256" in entry else None
            starts = list(range(0, rows, chunk_rows)) or [0]
            for start in starts:
                spans.append((h, start, min(rows, start + chunk_rows), hasher, start == starts[-1]))

        def load(span):
            h, start, stop, hasher, last = span
            if hasher is not None and start == 0:
                hasher.start()
            grads = read_rows(h, "grads", start, stop, hasher)
            if hasher is not None and last:
                hasher.finish()
            return read_rows(h, "index", start, stop), (grads if convert is None else convert(grads))

        spans = [s for s in spans if s[2] > s[1] or s[3] is not None]
        if not prefetch or len(spans) < 2:
            for span in spans:
                idx, grads = load(span)
                if len(idx):
                    yield idx, grads
            return
        from concurrent.futures import ThreadPoolExecutor

        # one intra-op thread: a multi-threaded conversion here would stall the caller's
        # multi-threaded products whenever the two compete for the cores
        with ThreadPoolExecutor(max_workers=1, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            pending = pool.submit(load, spans[0])
            for nxt in spans[1:]:
                current = pending.result()
                pending = pool.submit(load, nxt)
                if len(current[0]):
                    yield current
            current = pending.result()
            if len(current[0]):
                yield current

    def verify_hashes(self) -> None:
        """Hash every shard in full (for readers that do not stream the rows)."""
        for h, entry in zip(self.shards, self.manifest["shards"]):
            if "sha256" in entry and not file_sha256_matches(h.path, entry["sha256"]):
                raise damaged_shard(h.path, "its sha256 differs from the manifest")

    def read_column(self, name: str) -> torch.Tensor:
        parts = [read_rows(h, name, 0, h.tensors[name][1][0]) for h in self.shards]
        return torch.cat(parts) if parts else torch.empty(0)


def _shard_only_manifest(path: Path, header: ShardHeader) -> dict:
    """A single shard outside its run directory: one anonymous block of D columns."""
    parent = path.parent
    if (parent / MANIFEST).is_file():
        manifest = read_manifest(parent)
        entry = next((s for s in manifest["shards"] if s["file"] == path.name), None)
        if entry is None:
            raise GhostprojError(f"{path} is not listed in the manifest beside it.")
        manifest = dict(manifest, shards=[entry])
        return manifest
    grads = header.tensors.get("grads")
    if grads is None or len(grads[1]) != 2:
        raise GhostprojError(f"{path} is not a ghostproj shard (it has no 2-D 'grads' tensor).")
    dtype_name = next(k for k, v in STORE_DTYPES.items() if v == grads[0])
    dim = grads[1][1]
    return {
        "format": FORMAT_VERSION,
        "fingerprint": header.metadata.get("fingerprint", ""),
        "fingerprint_parts": {},
        "layers": [{"name": "all", "type": "?", "n_in": 0, "n_out": 0, "k_in": dim, "k_out": 1, "offset": 0}],
        "dim": dim,
        "store_dtype": dtype_name,
        "shards": [{"file": path.name, "rows": grads[1][0], "bytes": path.stat().st_size}],
        "data": {},
        "complete": True,
    }


def open_run(path: str | os.PathLike, require_complete: bool = True) -> Run:
    """Open a run directory or single shard file, checking sizes, dtypes and headers of
    every shard against the manifest before any tensor data is read."""
    p = Path(path)
    if p.is_file():
        if not SHARD_RE.match(p.name) and p.suffix != ".safetensors":
            raise GhostprojError(f"{p} is neither a projection run directory nor a shard file.")
        header = read_shard_header(p)
        manifest = _shard_only_manifest(p, header)
        base = p.parent
    elif p.is_dir():
        manifest = read_manifest(p)
        base = p
    else:
        raise GhostprojError(f"{p} does not exist.")
    if require_complete and not manifest.get("complete", False):
        raise GhostprojError(f"{p} is an unfinished run; rerun its project command to complete it.")
    store_dtype = STORE_DTYPES.get(manifest["store_dtype"])
    if store_dtype is None:
        raise GhostprojError(f"{p} records an unknown store dtype '{manifest['store_dtype']}'.")
    headers = []
    for entry in manifest["shards"]:
        shard_path = base / entry["file"]
        if not shard_path.is_file():
            raise GhostprojError(f"Shard {shard_path} is missing; {REPAIR_HINT}.")
        if "bytes" in entry and shard_path.stat().st_size != entry["bytes"]:
            raise damaged_shard(shard_path, "its size differs from the manifest")
        header = read_shard_header(shard_path)
        validate_shard(header, int(entry["rows"]), int(manifest["dim"]), store_dtype, manifest["fingerprint"])
        headers.append(header)
    return Run(base if p.is_dir() else p, manifest, headers)


def damaged_shards(run_dir: Path, manifest: dict, hash_all: bool) -> list[tuple[int, str]]:
    """(position in the manifest's shard list, what is wrong) for every listed shard that is
    missing, of the wrong size, has a bad header or (for the last shard, which a crash is
    likeliest to have hit, and for every shard with ``hash_all``) a differing sha256."""
    store_dtype = STORE_DTYPES[manifest["store_dtype"]]
    found = []
    last = len(manifest["shards"]) - 1
    for pos, entry in enumerate(manifest["shards"]):
        path = run_dir / entry["file"]
        if not path.is_file():
            found.append((pos, "it is missing"))
            continue
        if "bytes" in entry and path.stat().st_size != entry["bytes"]:
            found.append((pos, "its size differs from the manifest"))
            continue
        try:
            validate_shard(read_shard_header(path), int(entry["rows"]), int(manifest["dim"]), store_dtype,
                           manifest["fingerprint"])
        except GhostprojError:
            found.append((pos, "its header does not match the manifest"))
            continue
        if (hash_all or pos == last) and "sha256" in entry and not file_sha256_matches(path, entry["sha256"]):
            found.append((pos, "its sha256 differs from the manifest"))
    return found


@dataclass
class VerifyReport:
    manifest: dict
    rows: int
    bytes: int


def verify_run(path: str | os.PathLike, hash_shards: bool = True) -> VerifyReport:
    """Check every shard (sha256 unless ``hash_shards`` is False) and the row coverage."""
    run = open_run(path, require_complete=False)
    total = 0
    for entry, header in zip(run.manifest["shards"], run.shards):
        total += header.path.stat().st_size
        if hash_shards and "sha256" in entry and not file_sha256_matches(header.path, entry["sha256"]):
            raise damaged_shard(header.path, "its sha256 differs from the manifest")
    index = run.read_column("index")
    if index.numel() != index.unique().numel():
        raise GhostprojError(f"{path} holds some examples more than once.")
    part = run.manifest.get("part")
    count = part["rows"] if part else run.manifest.get("data", {}).get("count")
    if run.manifest.get("complete") and count is not None and index.numel() != count:
        what = f"its part of the data has {count}" if part else f"its data has {count} examples"
        raise GhostprojError(f"{path} holds {index.numel()} rows but {what}.")
    return VerifyReport(run.manifest, index.numel(), total)


# -- locking --------------------------------------------------------------------------------
class RunLock:
    """One writer per run directory (per rank): a lock file holding pid and host. A lock
    whose process is gone (same host) is stale and taken over, so a crash never blocks a
    resume."""

    def __init__(self, run_dir: Path, rank: int | None = None):
        self.path = run_dir / (".lock" if rank is None else f".lock-r{rank:03d}")

    def acquire(self) -> "RunLock":
        me = f"{os.getpid()} {_host()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.path.read_text(errors="replace").split() if self.path.exists() else []
                if len(holder) == 2 and holder[1] == _host() and not _pid_alive(int(holder[0])):
                    self.path.unlink(missing_ok=True)  # stale: its writer died
                    continue
                who = " ".join(holder) or "another process"
                raise GhostprojError(
                    f"{self.path.parent} is being written by process {who}; wait for it or remove {self.path} "
                    "if that process is gone."
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            sweep_stale_temporaries(self.path.parent)
            return self
        raise GhostprojError(f"Cannot take the lock {self.path}.")

    def release(self) -> None:
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- merging parts ------------------------------------------------------------------------------
def merge_manifests(parts: list[dict], by_shard_id: bool = True) -> dict:
    """One complete manifest from the manifests of disjoint parts of one run (job-array
    shards or torchrun ranks). Refuses parts that are incomparable, incomplete, overlapping
    or missing. ``by_shard_id=False`` (torchrun ranks, possibly from runs with different
    numbers of ranks) skips the shard-id bookkeeping; the caller checks row coverage."""
    if not parts:
        raise GhostprojError("There is nothing to merge.")
    first = parts[0]
    k = first.get("part", {}).get("num_shards", 1)
    seen: dict[int, int] = {}
    for n, m in enumerate(parts):
        part = differing_part(first, m)
        if part is not None:
            raise GhostprojError(f"Part {n + 1} is not comparable with part 1: their {part} differ.")
        if m.get("data", {}).get("sha256") != first.get("data", {}).get("sha256"):
            raise GhostprojError(f"Part {n + 1} was projected from different data than part 1.")
        info = m.get("part", {"shard_id": 0, "num_shards": 1})
        if not by_shard_id:
            if not m.get("complete"):
                raise GhostprojError(f"Part {n + 1} is unfinished; rerun it first.")
            continue
        if info["num_shards"] != k:
            raise GhostprojError(f"Part {n + 1} splits the data into {info['num_shards']} shards, part 1 into {k}.")
        if info["shard_id"] in seen:
            raise GhostprojError(f"Parts {seen[info['shard_id']] + 1} and {n + 1} both hold shard {info['shard_id']}; "
                                 "they overlap.")
        seen[info["shard_id"]] = n
        if not m.get("complete"):
            raise GhostprojError(f"Part {n + 1} (shard {info['shard_id']}) is unfinished; rerun it first.")
    missing = sorted(set(range(k)) - set(seen)) if by_shard_id else []
    if missing:
        raise GhostprojError(f"Shards {', '.join(map(str, missing))} of {k} are missing from the merge.")
    merged = json.loads(json.dumps(first))
    merged.pop("part", None)
    merged["shards"] = sorted((s for m in parts for s in m["shards"]), key=lambda s: s["file"])
    names = [s["file"] for s in merged["shards"]]
    if len(set(names)) != len(names):
        raise GhostprojError("Two parts hold shard files of the same name; they were written with the same rank.")
    summary = dict(first.get("summary") or {})
    for key in ("examples", "tokens", "no_label", "truncated", "prompt_too_long", "bytes"):
        summary[key] = sum((m.get("summary") or {}).get(key, 0) for m in parts)
    merged["summary"] = summary
    merged["complete"] = True
    return merged


def merge_runs(out: str | os.PathLike, parts: list[str]) -> dict:
    """Join job-array parts into one run directory ``out``: shards are hard-linked (copied
    across file systems), every part is validated first, and nothing in the parts changes."""
    import shutil

    out = Path(out)
    runs = [open_run(p) for p in parts]
    merged = merge_manifests([r.manifest for r in runs])
    seen: set[int] = set()
    for r in runs:
        idx = set(r.read_column("index").tolist())
        if seen & idx:
            raise GhostprojError(f"{r.path} holds examples that another part holds too.")
        seen |= idx
    if out.exists() and any(out.iterdir()):
        raise GhostprojError(f"{out} is not empty; merge into a new directory.")
    out.mkdir(parents=True, exist_ok=True)
    sources = [(runs[0].path / PROJECTOR_FILE, out / PROJECTOR_FILE)]
    for r in runs:
        sources += [(h.path, out / h.path.name) for h in r.shards]
    for src, dst in sources:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    write_manifest(out, merged)
    return merged
