"""``projector.safetensors``: the fixed matrices of a run, saved with it and read back
(by ``--like``) only after their dtypes and shapes are checked against the manifest."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import GhostprojError
from .files import atomic_write
from .shards import encode_safetensors


def encode_projectors(projectors: dict, metadata: dict[str, str]) -> bytes:
    """The bytes of a projector file: one and the same for the same matrices, so a damaged
    file is rebuilt exactly. ``projectors``: {layer: an object with ``p_in`` and ``p_out``}."""
    tensors = {}
    for name, p in projectors.items():
        tensors[f"{name}.in"] = p.p_in.detach().cpu().contiguous()
        tensors[f"{name}.out"] = p.p_out.detach().cpu().contiguous()
    return encode_safetensors(tensors, metadata)


def save_projectors(path, projectors: dict, metadata: dict[str, str]) -> None:
    atomic_write(Path(path), encode_projectors(projectors, metadata))


def load_projectors(path, layer_names: list[str],
                    shapes: dict[str, tuple[tuple[int, int], tuple[int, int]]] | None = None
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (P_in, P_out)} of ``layer_names`` from a projector file. ``shapes`` maps a layer to
    ((k_in, k_out), (n_in, n_out)) as its manifest records them; the file is refused when
    a matrix is not float32 of exactly that shape."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise GhostprojError(f"Projector file {path} is missing; the run cannot be reused without it.")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            out = {}
            for name in layer_names:
                if f"{name}.in" not in keys or f"{name}.out" not in keys:
                    raise GhostprojError(f"{path} holds no projector for layer '{name}'.")
                out[name] = (f.get_tensor(f"{name}.in"), f.get_tensor(f"{name}.out"))
    except GhostprojError:
        raise
    except Exception as exc:  # safetensors raises several types for damaged files
        raise GhostprojError(f"Cannot read projector file {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}.") from None
    for name, (p_in, p_out) in out.items():
        if p_in.dtype != torch.float32 or p_out.dtype != torch.float32:
            raise GhostprojError(f"{path} is damaged: the matrices of '{name}' are not float32.")
        if shapes is not None and name in shapes:
            (k_in, k_out), (n_in, n_out) = shapes[name]
            if tuple(p_in.shape) != (k_in, n_in) or tuple(p_out.shape) != (k_out, n_out):
                raise GhostprojError(
                    f"{path} does not match its manifest: layer '{name}' has matrices {tuple(p_in.shape)} and "
                    f"{tuple(p_out.shape)}, the manifest needs {(k_in, n_in)} and {(k_out, n_out)}.")
    return out
