"""What makes two runs comparable: the fingerprint and its named parts (model weights,
layers, k's, projector matrices, loss reduction, bias flag)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import torch

from .manifest import LayerInfo, Manifest

# Parts of the fingerprint, in the words `score` uses when two runs disagree.
# Layers come first: two runs of one model over different layers also hash different weights,
# and the layers are the difference to name.
FINGERPRINT_PARTS = {
    "layers": "layers",
    "model_weights": "model weights",
    "ranks": "k's (ranks)",
    "projector": "projector matrices",
    "loss_reduction": "loss reduction",
    "bias": "bias flag",
}


def sha256_hex(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def fingerprint(parts: dict[str, str]) -> str:
    return sha256_hex(json.dumps({k: parts[k] for k in sorted(parts)}, sort_keys=True).encode())


def hash_tensors(named_tensors, header: str = "{name}:{dtype}:{shape}", dtype: torch.dtype | None = None) -> str:
    """The one tensor hash: sha256 over each tensor's ``header`` (its name, dtype and shape
    formatted in) and bytes, in the order given; ``dtype``: converted first. Each caller's
    header is fixed, as hashes already recorded in runs and caches must stay valid."""
    h = hashlib.sha256()
    for name, t in named_tensors:
        t = t.detach() if dtype is None else t.detach().to(dtype)
        h.update(header.format(name=name, dtype=t.dtype, shape=tuple(t.shape)).encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def weights_hash(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    return hash_tensors(named_tensors)


def sampled_weights_hash(named_tensors: list[tuple[str, torch.Tensor]], per_tensor: int = 65536) -> str:
    """A cheap identity of many weights: names, dtypes, shapes and an evenly strided sample
    of at most ``per_tensor`` values of each. Two different checkpoints of a model differ
    in it (fine-tuning moves every weight); hashing all bytes of a multi-billion-parameter
    base would cost a full pass over it."""
    def samples():
        for name, t in named_tensors:
            flat = t.detach().reshape(-1)
            yield f"{name}:{t.dtype}:{tuple(t.shape)}", flat[::max(1, flat.numel() // per_tensor)][:per_tensor]
    return hash_tensors(samples(), header="{name}")


def fingerprint_parts(
    layers: list[LayerInfo], weights_sha: str, projector_sha: str, loss_reduction: str, bias: bool
) -> dict[str, str]:
    return {
        "model_weights": weights_sha,
        "layers": sha256_hex(json.dumps([[i.name, i.type, i.n_in, i.n_out] for i in layers]).encode()),
        "ranks": sha256_hex(json.dumps([[i.k_in, i.k_out] for i in layers]).encode()),
        "projector": projector_sha,
        "loss_reduction": loss_reduction,
        "bias": "true" if bias else "false",
    }


def differing_part(a: Manifest, b: Manifest) -> str | None:
    """The first fingerprint part (in words) on which two manifests disagree, or None."""
    pa, pb = a.fingerprint_parts or {}, b.fingerprint_parts or {}
    if not pa or not pb:  # a bare shard file carries only the fingerprint
        return None if a.fingerprint == b.fingerprint else "fingerprint"
    for key, words in FINGERPRINT_PARTS.items():
        if pa.get(key) != pb.get(key):
            return words
    if a.fingerprint != b.fingerprint:
        return "fingerprint"
    return None
