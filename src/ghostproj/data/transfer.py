"""Moving batches between host and accelerator without making the accelerator wait.

A plain ``.cpu()`` of a batch's result blocks the host until the GPU has finished that
batch, so the next batch's kernels are queued only after the GPU went idle. Copies here
go through pinned host memory with ``non_blocking=True`` and are waited for one batch
later, after the next batch has been queued. On the CPU they are ordinary copies.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host to device; from pinned memory (asynchronous) when the device is a GPU."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class HostCopy:
    """Device tensors on their way to the host; :meth:`result` waits for them."""

    def __init__(self, tensors: list[torch.Tensor]):
        tensors = [t.detach() for t in tensors]
        if any(t.device.type == "cuda" for t in tensors):
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, t in zip(self._host, tensors):
                h.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            self._source = tensors  # kept alive until the copy has landed
        else:
            self._host = [t.cpu() for t in tensors]
            self._event = None
            self._source = None

    def result(self) -> list[torch.Tensor]:
        if self._event is not None:
            self._event.synchronize()
            self._event = self._source = None
        return self._host
