"""Training chunks delivered where the score's products run.

On the CPU a chunk is a fresh float32 tensor converted on the reading thread. On a GPU the
reading thread copies the selected columns, still in the store dtype, into one of three
pinned host buffers; the host-to-device copy runs on its own stream into one of two device
buffers, and the next chunk's copy is queued before the caller computes on this one, so
the copies overlap the previous chunk's products. Every device chunk has the same shape
(the buffer's full ``chunk_rows``; rows past the chunk's end are stale and ignored), so
the GPU kernels, and the last bits of every row's scores, never depend on how the rows
were split into shards, chunks or processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import GhostprojError
from ..store.reader import Run
from .columns import chunks

GPU_CHUNK_BYTES = 256 * 2**20  # store-dtype bytes per chunk on a GPU: large enough to hide per-chunk overhead


@dataclass
class Chunk:
    index: torch.Tensor  # [n] dataset indices, on the host
    rows: torch.Tensor  # [n or chunk_rows, D'] float32 on the device; may be changed in place
    n: int  # valid rows (the first n of ``rows``)
    store_dtype: torch.dtype


def check_chunk_rows(chunk_rows: int | None) -> None:
    if chunk_rows is not None and chunk_rows < 1:
        raise GhostprojError(f"--chunk-rows must be at least 1, got {chunk_rows}.")


def chunk_rows_for(device: torch.device, chunk_rows: int | None, width: int, store_dtype: torch.dtype,
                   rows: int) -> int:
    """``chunk_rows`` as given, or the default for the device: 8192 on the CPU (what the
    score benchmark found best there), about 256 MiB of stored rows on a GPU, never more
    than the run's ``rows`` (pass the whole run's, also for a part, so that every part
    computes with the same shapes)."""
    if chunk_rows is not None:
        return chunk_rows
    if device.type != "cuda":
        return 8192
    per_row = max(1, width * store_dtype.itemsize)
    return max(1, min(GPU_CHUNK_BYTES // per_row, rows))


def feed(run: Run, cols: torch.Tensor | None, chunk_rows: int, device: torch.device):
    """Yield a :class:`Chunk` per ``chunk_rows`` training rows, on ``device``."""
    if device.type != "cuda":
        for idx, x in chunks(run, cols, chunk_rows):
            yield Chunk(idx, x, x.shape[0], x.dtype)
        return
    yield from _CudaFeed(run, cols, chunk_rows, device)


class _CudaFeed:
    RING = 3  # pinned buffers: one being filled, one being copied, one spare for the copy not yet waited on

    def __init__(self, run: Run, cols: torch.Tensor | None, chunk_rows: int, device: torch.device):
        self.run, self.cols, self.chunk_rows, self.device = run, cols, chunk_rows, device
        self.dtype = run.store_dtype
        width = run.dim if cols is None else cols.numel()
        self.pinned = [torch.empty(chunk_rows, width, dtype=self.dtype, pin_memory=True) for _ in range(self.RING)]
        self.pinned_free = [torch.cuda.Event() for _ in range(self.RING)]  # the copy out of it was done
        self.staged = [torch.zeros(chunk_rows, width, dtype=self.dtype, device=device) for _ in range(2)]
        self.copied = [torch.cuda.Event() for _ in range(2)]
        self.used = [torch.cuda.Event() for _ in range(2)]  # the caller's work on it was queued before this
        self.copy_stream = torch.cuda.Stream(device)
        self._filled = 0

    def _to_pinned(self, grads: torch.Tensor) -> tuple[int, int]:
        """On the reading thread: the chunk's selected columns into the next pinned buffer."""
        slot = self._filled % self.RING
        self._filled += 1
        self.pinned_free[slot].synchronize()  # its previous chunk has left for the device
        n = grads.shape[0]
        target = self.pinned[slot][:n]
        if self.cols is None:
            target.copy_(grads)
        else:
            torch.index_select(grads, 1, self.cols, out=target)
        return slot, n

    def _upload(self, k: int, idx: torch.Tensor, slot: int, n: int) -> tuple[torch.Tensor, int, int]:
        side = k % 2
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.used[side])  # the chunk two back is done with this buffer
            self.staged[side][:n].copy_(self.pinned[slot][:n], non_blocking=True)
            self.copied[side].record(self.copy_stream)
            self.pinned_free[slot].record(self.copy_stream)
        return idx, side, n

    def __iter__(self):
        stream = torch.cuda.current_stream(self.device)
        pending = None
        for k, (idx, (slot, n)) in enumerate(self.run.iter_chunks(self.chunk_rows, convert=self._to_pinned)):
            upload = self._upload(k, idx, slot, n)
            if pending is not None:
                yield self._deliver(pending, stream)
            pending = upload
        if pending is not None:
            yield self._deliver(pending, stream)
        stream.synchronize()

    def _deliver(self, pending, stream):
        idx, side, n = pending
        stream.wait_event(self.copied[side])
        rows = self.staged[side].float()  # a fresh float32 tensor the caller may change in place
        self.used[side].record(stream)  # its copy to float32 is queued; the buffer may be refilled after it
        return Chunk(idx, rows, n, self.dtype)
