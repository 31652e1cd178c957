"""Writing a run: shards handed to a background thread, the manifest rewritten after each
one so an interrupted run resumes from its last complete shard."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import GhostprojError
from .files import atomic_write
from .fingerprint import sha256_hex
from .manifest import MANIFEST, STORE_DTYPES, write_manifest
from .shards import all_finite, encode_shard


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
        self.run_dir, self.manifest, self.manifest_name = run_dir, manifest, manifest_name
        self.shard_size, self.rank = shard_size, rank
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
        entry.update(rows=int(grads.shape[0]), sha256=sha256_hex(data), bytes=len(data), index_min=int(index.min()),
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
        if not all_finite(grads):
            bad = int(index[~torch.isfinite(grads).all(dim=1)][0])
            raise GhostprojError(f"Example {bad} produced a non-finite gradient; the model or data is broken there.")
        stored = grads.to(self.store_dtype)
        if stored.dtype != grads.dtype and not all_finite(stored):
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
                "sha256": sha256_hex(data),
                "bytes": len(data),
                "index_min": int(index.min()),
                "index_max": int(index.max()),
            }
        )
        write_manifest(self.run_dir, self.manifest, self.manifest_name)
