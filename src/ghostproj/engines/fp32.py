"""Float32 arithmetic on activations and gradients of any precision.

Projected gradients are accumulated in float32 whatever the model runs in: a bf16 model,
or a float32 model under ``torch.autocast``. What keeps that cheap:

- on a GPU, a low-precision tensor meets a copy of the projection matrix in its own dtype
  in one tensor-core product whose float32 accumulator is written out as it is
  (``torch.mm(..., out_dtype=torch.float32)``): no upcast copy of the activation at all,
  and the only extra rounding is that of the matrix to the model's dtype (a fixed relative
  2^-9 per entry for bf16, far below the model's own bf16 rounding);
- elsewhere (the CPU, or a torch without ``out_dtype``) a low-precision tensor is upcast a
  slice of rows at a time, so projecting a bf16 activation never holds a float32 copy of
  all of it (that copy is twice the activation: 1.4 GB for the 16 x 2048 x 11008 MLP input
  of a 7B Llama batch);
- the engines' own products run with autocast off, so an autocast region around the
  user's forward/backward cannot push them down to bf16.
"""

from __future__ import annotations

import contextlib

import torch

# Largest float32 slice made from a low-precision tensor at once.
UPCAST_BYTES = 64 * 2**20


_HAS_AUTOCAST = {"cpu": True, "cuda": True}  # device type -> whether autocast exists for it


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for the device type (never on the meta device, which has none).
    Called in every projected layer's backward, so the question of existence is asked once."""
    has = _HAS_AUTOCAST.get(device_type)
    if has is None:
        has = _HAS_AUTOCAST[device_type] = torch.amp.is_autocast_available(device_type)
    return has and torch.is_autocast_enabled(device_type)


def no_autocast(device: torch.device):
    """A context in which autocast is off for ``device``'s type."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know: nothing to turn off
        return contextlib.nullcontext()


def _float32_rows(rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """rows [N, n] times float32 w [n, k]: a new float32 [N, k] tensor."""
    if rows.dtype == torch.float32:
        return torch.mm(rows, w)
    step = max(1, UPCAST_BYTES // (4 * w.shape[0]))
    if rows.shape[0] <= step:
        return torch.mm(rows.float(), w)
    out = torch.empty(rows.shape[0], w.shape[1], dtype=torch.float32, device=rows.device)
    for start in range(0, rows.shape[0], step):
        torch.mm(rows[start:start + step].float(), w, out=out[start:start + step])
    return out


_OUT_DTYPE_MM: dict[tuple[str, torch.dtype], bool] = {}


def mm_out_float32_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for ``dtype`` operands on
    ``device`` (CUDA in recent torch releases); probed once per device type and dtype."""
    key = (device.type, dtype)
    if key not in _OUT_DTYPE_MM:
        try:
            a = torch.ones(2, 2, device=device, dtype=dtype)
            _OUT_DTYPE_MM[key] = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE_MM[key] = False
    return _OUT_DTYPE_MM[key]


class Projection:
    """A fixed float32 matrix ``full`` [n, k], applied to rows [N, n] of the dtype it was
    made for (``dtype``), giving float32 [N, k] by the cheapest exact-enough route:
    one float32 product for float32 inputs, one tensor-core product with a float32 result
    for low-precision inputs on a GPU, sliced upcasting otherwise."""

    def __init__(self, full: torch.Tensor, dtype: torch.dtype) -> None:
        self.full = full
        self.low = None
        if dtype != torch.float32 and full.device.type == "cuda" and mm_out_float32_supported(full.device, dtype):
            self.low = full.to(dtype)
        self._low_dtype = None if self.low is None else dtype
        # None on the meta device (a dry run's trace), which has no autocast
        self._autocast_type = full.device.type if torch.amp.is_autocast_available(full.device.type) else None

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, n] times the matrix: a new float32 [N, k] tensor (never a view, so an
        autograd Function can save it under torch.compile)."""
        if self._autocast_type is not None and torch.is_autocast_enabled(self._autocast_type):
            with no_autocast(x.device):
                return self._rows(x)
        return self._rows(x)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype is torch.float32:
            return torch.mm(x, self.full)
        if dtype is self._low_dtype:
            return torch.mm(x, self.low, out_dtype=torch.float32)
        return _float32_rows(x, self.full)
