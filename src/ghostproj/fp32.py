"""Float32 arithmetic on activations and gradients of any precision.

Projected gradients are accumulated in float32 whatever the model runs in: a bf16 model,
or a float32 model under ``torch.autocast``. Two things make that cheap:

- a low-precision tensor is upcast a slice of rows at a time, so projecting a bf16
  activation never holds a float32 copy of all of it (that copy is twice the activation:
  1.4 GB for the 16 x 2048 x 11008 MLP input of a 7B Llama batch);
- the engines' own products run with autocast off, so an autocast region around the
  user's forward/backward cannot push them down to bf16.
"""

from __future__ import annotations

import contextlib

import torch

# Largest float32 slice made from a low-precision tensor at once.
UPCAST_BYTES = 64 * 2**20


def no_autocast(device: torch.device):
    """A context in which autocast is off for ``device``'s type."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know: nothing to turn off
        return contextlib.nullcontext()


def project_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x`` [..., n] (any float dtype) times ``w`` [n, k] float32, as float32 [..., k].

    A float32 ``x`` is multiplied directly; a lower-precision one in slices of at most
    :data:`UPCAST_BYTES` of float32.
    """
    n, k = w.shape
    rows = x.reshape(-1, n)
    with no_autocast(x.device):
        if rows.dtype == torch.float32:
            out = rows @ w
        else:
            step = max(1, UPCAST_BYTES // (4 * n))
            if rows.shape[0] <= step:
                out = rows.float() @ w
            else:
                out = torch.empty(rows.shape[0], k, dtype=torch.float32, device=x.device)
                for start in range(0, rows.shape[0], step):
                    torch.mm(rows[start:start + step].float(), w, out=out[start:start + step])
    return out.reshape(*x.shape[:-1], k)
