"""Writing a run: rows cut into shards at fixed places of the run's row stream, each shard
handed to a background thread, the manifest rewritten after each one so an interrupted
run resumes with exactly the shards it is missing."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import GhostprojError
from .coverage import index_digest
from .files import atomic_write
from .fingerprint import sha256_hex
from .manifest import MANIFEST, SHARD_RE, STORE_DTYPES, Manifest, ShardEntry, shard_file_name, write_manifest
from .shards import all_finite, encode_shard


@dataclass(frozen=True)
class ShardSpan:
    """One shard of a run: rows [lo, hi) of its row stream (the rows in the order its
    batches produce them), written to ``file``; ``digest`` is the index digest those rows
    must have (None where the rows are not known in advance)."""

    file: str
    lo: int
    hi: int
    digest: str | None = None

    @property
    def rows(self) -> int:
        return self.hi - self.lo


def plan_shards(order: np.ndarray, shard_size: int, rank: int, first_seq: int = 0) -> list[ShardSpan]:
    """The shards of a row stream whose dataset indices are ``order``: one every
    ``shard_size`` rows, whatever the batches, so the cut never depends on where a run
    was interrupted."""
    if shard_size < 1:
        raise GhostprojError(f"--shard-size must be at least 1, got {shard_size}.")
    n = len(order)
    return [ShardSpan(shard_file_name(rank, first_seq + k), lo, min(lo + shard_size, n),
                      index_digest(order[lo:lo + shard_size]))
            for k, lo in enumerate(range(0, n, shard_size))]


class RunWriter:
    """Writes the shards of a run from its rows, given in row-stream order.

    With ``spans`` (a resume plan) only those shards are written, each from exactly its
    rows, and the rows of other shards are dropped; a batch is fed with its position in
    the stream. Without, rows are cut every ``shard_size`` rows as they come, numbered
    after the shards the manifest already lists.

    Encoding, hashing and writing a shard happen on a background thread, so the model does
    not wait for the disk; at most one shard is in flight, so memory stays bounded, and a
    write error surfaces at the next ``add`` or at ``finish``."""

    def __init__(self, run_dir: Path, manifest: Manifest, shard_size: int | None = None, rank: int = 0,
                 manifest_name: str = MANIFEST, spans: list[ShardSpan] | None = None):
        if spans is None and (shard_size is None or shard_size < 1):
            raise GhostprojError(f"--shard-size must be at least 1, got {shard_size}.")
        self.run_dir, self.manifest, self.manifest_name = run_dir, manifest, manifest_name
        self.shard_size, self.rank = shard_size, rank
        self.planned = spans is not None
        self.todo = sorted(spans or [], key=lambda s: s.lo)
        self.store_dtype = STORE_DTYPES[manifest.store_dtype]
        self._buf: list[tuple[int, tuple[torch.Tensor, ...]]] = []  # (stream position, rows)
        self._received = self._cut = 0  # streaming: rows seen so far, and where the next shard starts
        self._next_seq = 1 + max((int(SHARD_RE.match(s.file).group(2)) for s in manifest.shards
                                  if (s.rank or 0) == rank), default=-1)
        self._pending = None  # the shard write in flight
        self._pool = None

    @property
    def rows_written(self) -> int:
        return self.manifest.rows

    def add(self, grads: torch.Tensor, index: torch.Tensor, loss: torch.Tensor, tokens: torch.Tensor,
            start: int | None = None) -> None:
        """Rows [start, start + n) of the stream (``start`` only with a plan)."""
        rows = (grads.detach().cpu(), index.cpu(), loss.detach().cpu(), tokens.cpu())
        n = rows[0].shape[0]
        if not self.planned:
            start, self._received = self._received, self._received + n
            while self._received - self._cut >= self.shard_size:
                self._open(self._cut + self.shard_size)
        self._buf.append((start, rows))
        self._flush_ready(start + n)

    def _open(self, end: int) -> None:
        """Streaming: the next shard, from the last cut to ``end``."""
        self.todo.append(ShardSpan(shard_file_name(self.rank, self._next_seq), self._cut, end))
        self._next_seq, self._cut = self._next_seq + 1, end

    def _flush_ready(self, end: int) -> None:
        """Write every shard whose rows have all arrived (the stream has reached ``end``),
        and drop buffered rows no shard still to write needs."""
        while self.todo and self.todo[0].hi <= end:
            span = self.todo.pop(0)
            self._submit(span, self._take(span))
        keep_from = self.todo[0].lo if self.todo else (end if self.planned else self._cut)
        self._buf = [(s, r) for s, r in self._buf if s + r[0].shape[0] > keep_from]

    def _take(self, span: ShardSpan) -> list[tuple[torch.Tensor, ...]]:
        parts, at = [], span.lo
        for s, rows in self._buf:
            a, b = max(span.lo, s), min(span.hi, s + rows[0].shape[0])
            if a >= b:
                continue
            if a != at:
                break
            parts.append(tuple(c[a - s:b - s] for c in rows))
            at = b
        if at != span.hi:
            raise GhostprojError(f"Rows {at}..{span.hi} of shard {span.file} never arrived; the run is kept as it "
                                 "is, rerun the command to resume.")
        return parts

    def flush(self) -> None:
        """Streaming: write every row received so far (what is buffered becomes a shard) and
        wait until it is on disk with its manifest entry."""
        if not self.planned and self._received > self._cut:
            self._open(self._received)
            self._flush_ready(self._received)
        self.wait()

    def finish(self, summary: dict, started: float | None = None) -> None:
        """Write what is buffered, then mark the run complete with ``summary``, its bytes
        counted from the shards and its seconds from ``started`` (a perf_counter value)."""
        if not self.planned and self._received > self._cut:
            self._open(self._received)
            self._flush_ready(self._received)
        self.close()
        if self.todo:
            raise GhostprojError(f"Shard {self.todo[0].file} was never completed; rerun the command to resume.")
        summary = dict(summary, bytes=self.manifest.bytes)
        if started is not None:
            summary["seconds"] = round(time.perf_counter() - started, 3)
        self.manifest.complete, self.manifest.summary = True, summary
        write_manifest(self.run_dir, self.manifest, self.manifest_name)

    def _submit(self, span: ShardSpan, parts: list) -> None:
        """Hand one shard's rows to the writer thread. Joining, checking, converting and
        encoding them all happen there: on a GPU the main thread is what keeps the device
        fed."""
        self.wait()  # one shard in flight at a time; also re-raises its error
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ghostproj-writer")
        self._pending = self._pool.submit(self._encode_and_write, span, parts)

    def _encode_and_write(self, span: ShardSpan, parts: list) -> None:
        grads, index, loss, tokens = (torch.cat([p[c] for p in parts]) for c in range(4))
        digest = index_digest(index.numpy())
        if span.digest is not None and digest != span.digest:
            raise GhostprojError(f"Shard {span.file} would hold other examples than planned; nothing of it was "
                                 "written. Rerun the command to resume.")
        stored = self._checked(grads, index)
        data = encode_shard(stored, index, loss, tokens, self.manifest.fingerprint)
        atomic_write(self.run_dir / span.file, data)
        entry = ShardEntry(span.file, span.rows, rank=self.rank, sha256=sha256_hex(data), bytes=len(data),
                           index_min=int(index.min()) if len(index) else 0,
                           index_max=int(index.max()) if len(index) else 0, index_digest=digest)
        shards = [s for s in self.manifest.shards if s.file != span.file] + [entry]
        self.manifest.shards = sorted(shards, key=lambda s: s.file)
        write_manifest(self.run_dir, self.manifest, self.manifest_name)

    def _checked(self, grads: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``grads`` in the store dtype, refused when a value is or becomes non-finite."""
        if not all_finite(grads):
            bad = int(index[~torch.isfinite(grads).all(dim=1)][0])
            raise GhostprojError(f"Example {bad} produced a non-finite gradient; the model or data is broken there.")
        stored = grads.to(self.store_dtype)
        if stored.dtype != grads.dtype and not all_finite(stored):
            raise GhostprojError(
                f"Projected gradients exceed the range of {self.manifest.store_dtype}; use --store-dtype bfloat16 or float32."
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


def keep_first_rows(run_dir: Path, manifest: Manifest, rows: int, name: str = MANIFEST) -> torch.Tensor:
    """Cut a streamed run back to the first ``rows`` rows of its stream: shards past them are
    deleted and a shard they end inside is rewritten with its first part. Returns the
    dataset indices of the rows kept. What a resumed writer continues from."""
    from .shards import read_rows, read_shard_header

    kept, indices, at = [], [], 0
    for entry in sorted(manifest.shards, key=lambda s: s.file):
        n, path = entry.rows, run_dir / entry.file
        if at >= rows:
            path.unlink(missing_ok=True)
            continue
        header = read_shard_header(path)
        if at + n > rows:  # the cut falls inside this shard
            n = rows - at
            columns = [read_rows(header, c, 0, n) for c in ("grads", "index", "loss", "tokens")]
            data = encode_shard(*columns, manifest.fingerprint)
            atomic_write(path, data)
            index = columns[1]
            entry = dataclasses.replace(entry, rows=n, sha256=sha256_hex(data), bytes=len(data),
                         index_min=int(index.min()) if n else 0, index_max=int(index.max()) if n else 0,
                         index_digest=index_digest(index.numpy()))
        else:
            index = read_rows(header, "index", 0, n)
        indices.append(index)
        kept.append(entry)
        at += n
    if at < rows:
        raise GhostprojError(f"{run_dir} holds {at} rows, fewer than the {rows} it should keep.")
    manifest.shards, manifest.complete = kept, False
    write_manifest(run_dir, manifest, name)
    return torch.cat(indices) if indices else torch.empty(0, dtype=torch.long)

