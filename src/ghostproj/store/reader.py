"""Reading a run: a validated run (or a lone shard file) ready for chunked, verified
reads; full verification; the check a resumed run makes of its shards."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import GhostprojError
from .coverage import check_exactly_once, index_digest
from .manifest import (
    MANIFEST,
    PROJECTOR_FILE,
    SHARD_RE,
    STORE_DTYPES,
    LayerInfo,
    Manifest,
    ShardEntry,
    read_manifest,
)
from .shards import (
    REPAIR_HINT,
    ShardHasher,
    ShardHeader,
    damaged_shard,
    file_sha256_matches,
    read_rows,
    read_shard_header,
    validate_shard,
)


@dataclass
class Run:
    """A validated projection run (or a single shard file) ready for chunked reads."""

    path: Path
    manifest: Manifest
    shards: list[ShardHeader]

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def store_dtype(self) -> torch.dtype:
        return STORE_DTYPES[self.manifest.store_dtype]

    @property
    def rows(self) -> int:
        return sum(h.tensors["index"][1][0] for h in self.shards)

    @property
    def layers(self) -> list[LayerInfo]:
        return self.manifest.layers

    def iter_chunks(self, chunk_rows: int = 8192, prefetch: bool = True, convert=None, verify: bool = True):
        """Yield (index [n] int64, grads [n, D] in the store dtype, or ``convert(grads)``) in
        shard order. With ``prefetch`` the next chunk is read (and converted) in a background
        thread while the caller computes on this one. With ``verify`` each shard's sha256
        (where the manifest records one) is computed from the bytes read, in that same
        thread, and a shard that differs stops the iteration, naming it, before its last
        chunk is yielded."""
        spans = []
        for h, entry in zip(self.shards, self.manifest.shards):
            rows = h.tensors["index"][1][0]
            hasher = ShardHasher(h, entry.sha256) if verify and entry.sha256 else None
            if rows == 0 and hasher is None:
                continue  # nothing to read or to check
            starts = list(range(0, rows, chunk_rows)) or [0]
            spans += [(h, start, min(rows, start + chunk_rows), hasher, start == starts[-1]) for start in starts]

        def load(span):
            h, start, stop, hasher, last = span
            if hasher is not None and start == 0:
                hasher.start()
            grads = read_rows(h, "grads", start, stop, hasher)
            if hasher is not None and last:
                hasher.finish()
            return read_rows(h, "index", start, stop), (grads if convert is None else convert(grads))

        loaded = map(load, spans) if not prefetch or len(spans) < 2 else _prefetched(load, spans)
        for idx, grads in loaded:
            if len(idx):  # an empty shard is read only to check its hash
                yield idx, grads

    def verify_hashes(self) -> None:
        """Hash every shard in full (for readers that do not stream the rows)."""
        for h, entry in zip(self.shards, self.manifest.shards):
            if entry.sha256 and not file_sha256_matches(h.path, entry.sha256):
                raise damaged_shard(h.path, "its sha256 differs from the manifest")

    def part(self, i: int, k: int) -> "Run":
        """Shards i, i + k, i + 2k, ... of this run: k disjoint parts that cover it."""
        if k < 1 or not 0 <= i < k:
            raise GhostprojError(f"--part must be in 0..{k - 1} for --num-parts {k}.")
        return Run(self.path, self.manifest.replace(shards=self.manifest.shards[i::k]), self.shards[i::k])

    def read_column(self, name: str) -> torch.Tensor:
        parts = [read_rows(h, name, 0, h.tensors[name][1][0]) for h in self.shards]
        return torch.cat(parts) if parts else torch.empty(0)


def _shard_only_manifest(path: Path, header: ShardHeader) -> Manifest:
    """A single shard outside its run directory: one anonymous block of D columns."""
    parent = path.parent
    if (parent / MANIFEST).is_file():
        manifest = read_manifest(parent)
        entry = next((s for s in manifest.shards if s.file == path.name), None)
        if entry is None:
            raise GhostprojError(f"{path} is not listed in the manifest beside it.")
        return manifest.replace(shards=[entry])
    grads = header.tensors.get("grads")
    if grads is None or len(grads[1]) != 2:
        raise GhostprojError(f"{path} is not a ghostproj shard (it has no 2-D 'grads' tensor).")
    dtype_name = next((k for k, v in STORE_DTYPES.items() if v == grads[0]), None)
    if dtype_name is None:
        raise GhostprojError(f"{path} stores its gradients as {grads[0]}, which no ghostproj run uses.")
    dim = grads[1][1]
    return Manifest(fingerprint=header.metadata.get("fingerprint", ""), fingerprint_parts={},
                    layers=[LayerInfo("all", "?", 0, 0, dim, 1, 0)], store_dtype=dtype_name,
                    shards=[ShardEntry(path.name, grads[1][0], bytes=path.stat().st_size)], complete=True)


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
    if require_complete and not manifest.complete:
        raise GhostprojError(f"{p} is an unfinished run; rerun its project command to complete it.")
    if p.is_dir():
        check_projector_file(p, manifest)
    store_dtype = STORE_DTYPES[manifest.store_dtype]
    headers = []
    for entry in manifest.shards:
        shard_path = base / entry.file
        if not shard_path.is_file():
            raise GhostprojError(f"Shard {shard_path} is missing; {REPAIR_HINT}.")
        if entry.bytes is not None and shard_path.stat().st_size != entry.bytes:
            raise damaged_shard(shard_path, "its size differs from the manifest")
        header = read_shard_header(shard_path)
        validate_shard(header, entry.rows, manifest.dim, store_dtype, manifest.fingerprint)
        headers.append(header)
    if p.is_dir():  # a lone shard of a run is one part of it, not the whole
        by_file = {h.path.name: h for h in headers}
        check_exactly_once(manifest, p, lambda entry: index_digest(
            read_rows(by_file[entry.file], "index", 0, entry.rows).numpy()))
    return Run(base if p.is_dir() else p, manifest, headers)


def shard_index_digest(path: Path, rows: int) -> str:
    """The index digest of a shard file's rows, from its index column alone."""
    return index_digest(read_rows(read_shard_header(path), "index", 0, rows).numpy())


def check_projector_file(run_dir: Path, manifest: Manifest) -> None:
    """Refuse a run whose projector file is missing or differs from the sha256 its manifest
    records (runs written before the sha256 was recorded are not checked)."""
    expected = (manifest.projector or {}).get("sha256")
    if expected is None:
        return
    path = run_dir / PROJECTOR_FILE
    if not path.is_file():
        raise GhostprojError(f"{path} is missing; rerun the run's project command to rebuild it.")
    if not file_sha256_matches(path, expected):
        raise GhostprojError(f"{path} is damaged: its sha256 differs from the manifest; rerun the run's project "
                             "command to rebuild it.")


def damaged_shards(run_dir: Path, manifest: Manifest, hash_all: bool) -> list[tuple[int, str]]:
    """(position in the manifest's shard list, what is wrong) for every listed shard that is
    missing, of the wrong size, has a bad header or (for the last shard, which a crash is
    likeliest to have hit, and for every shard with ``hash_all``) a differing sha256."""
    store_dtype = STORE_DTYPES[manifest.store_dtype]
    found = []
    last = len(manifest.shards) - 1
    for pos, entry in enumerate(manifest.shards):
        path = run_dir / entry.file
        if not path.is_file():
            found.append((pos, "it is missing"))
            continue
        if entry.bytes is not None and path.stat().st_size != entry.bytes:
            found.append((pos, "its size differs from the manifest"))
            continue
        try:
            validate_shard(read_shard_header(path), entry.rows, manifest.dim, store_dtype, manifest.fingerprint)
        except GhostprojError:
            found.append((pos, "its header does not match the manifest"))
            continue
        if (hash_all or pos == last) and entry.sha256 and not file_sha256_matches(path, entry.sha256):
            found.append((pos, "its sha256 differs from the manifest"))
    return found


@dataclass
class VerifyReport:
    manifest: Manifest
    rows: int
    bytes: int


def verify_run(path: str | os.PathLike, hash_shards: bool = True) -> VerifyReport:
    """Check every shard (sha256 unless ``hash_shards`` is False) and the row coverage."""
    run = open_run(path, require_complete=False)
    total = 0
    for entry, header in zip(run.manifest.shards, run.shards):
        total += header.path.stat().st_size
        if hash_shards and entry.sha256 and not file_sha256_matches(header.path, entry.sha256):
            raise damaged_shard(header.path, "its sha256 differs from the manifest")
    index = run.read_column("index")
    if index.numel() != index.unique().numel():
        raise GhostprojError(f"{path} holds some examples more than once.")
    part = run.manifest.part
    count = part["rows"] if part else run.manifest.data.get("count")
    if run.manifest.complete and count is not None and index.numel() != count:
        what = f"its part of the data has {count}" if part else f"its data has {count} examples"
        raise GhostprojError(f"{path} holds {index.numel()} rows but {what}.")
    return VerifyReport(run.manifest, index.numel(), total)


def _prefetched(load, items: list):
    """``load`` of each item in order, the next one loading on a background thread while the
    caller works on the current one. One intra-op thread there: a multi-threaded conversion
    would stall the caller's multi-threaded products whenever the two compete for the cores."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        pending = pool.submit(load, items[0])
        for nxt in items[1:]:
            current = pending.result()
            pending = pool.submit(load, nxt)
            yield current
        yield pending.result()
