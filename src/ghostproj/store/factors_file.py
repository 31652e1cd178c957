"""The factors file of `ghostproj factors`: per layer the float64 sums A = sum x x^T and
G = sum g g^T with their position count and sum of squared gradient norms, and a record
of what they were taken over (model weights, layers, data, loss, part). Sums, so parts
add up exactly."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import GhostprojError
from .files import atomic_write
from .fingerprint import fingerprint, sha256_hex, weights_hash
from .shards import encode_safetensors

FACTORS_FORMAT = 1


@dataclass
class LayerFactors:
    """Sums over positions (A, G: float64) and over examples (squared gradient norms)."""

    n_in: int
    n_out: int
    a: torch.Tensor  # sum_t x_t x_t^T  [n_in, n_in]
    g: torch.Tensor  # sum_t g_t g_t^T  [n_out, n_out]
    positions: int = 0
    sq_norms: float = 0.0  # sum_n ||G_n||_F^2
    a_vecs: torch.Tensor | None = None  # A's eigenvectors as float32 rows, leading first (once decomposed)
    g_vecs: torch.Tensor | None = None

    def add(self, other: "LayerFactors") -> None:
        self.a_vecs = self.g_vecs = None  # the sums change: decompose again
        self.a += other.a
        self.g += other.g
        self.positions += other.positions
        self.sq_norms += other.sq_norms

    def lambda_base(self, examples: int) -> float:
        """The mean of the EK-FAC eigenvalue correction over the layer's whole space:
        rotations keep norms, so it is E_n ||G_n||^2 / (n_in n_out)."""
        return self.sq_norms / max(examples, 1) / (self.n_in * self.n_out)


@dataclass
class FactorTotals:
    """Factors of a whole run, or of a part of it, with what they were taken over."""

    layers: dict[str, LayerFactors] = field(default_factory=dict)
    examples: int = 0


def factors_identity(model: torch.nn.Module, names: list[str], dims: dict[str, tuple[int, int]]) -> dict:
    """What ties factors to the runs they may serve: the layers' weights and shapes."""
    modules = dict(model.named_modules())
    return {"model_weights": weights_hash([(n + ".weight", modules[n].weight) for n in names]),
            "layers": [[n, *dims[n]] for n in names]}


def factors_fingerprint(record: dict) -> str:
    parts = {"identity": str(record["identity"]), "loss_reduction": record["loss_reduction"],
             "data": record["data"].get("sha256", "")}
    if "fisher_labels" in record:
        parts["fisher_labels"] = str(record["fisher_labels"])
    return fingerprint(parts)


def save_factors(path, totals: FactorTotals, record: dict) -> str:
    """Write the file atomically; returns its sha256."""
    tensors = {}
    for name, f in totals.layers.items():
        tensors[f"{name}.A"] = f.a
        tensors[f"{name}.G"] = f.g
        tensors[f"{name}.stats"] = torch.tensor([float(f.positions), f.sq_norms], dtype=torch.float64)
        if f.a_vecs is not None and f.g_vecs is not None:
            tensors[f"{name}.A_vecs"], tensors[f"{name}.G_vecs"] = f.a_vecs, f.g_vecs
    record = dict(record, format=FACTORS_FORMAT, examples=totals.examples,
                  layers=[{"name": n, "n_in": f.n_in, "n_out": f.n_out} for n, f in totals.layers.items()])
    data = encode_safetensors(tensors, {"ghostproj": "factors", "record": json.dumps(record, sort_keys=True)})
    atomic_write(Path(path), data)
    return sha256_hex(data)


def load_factors(path, checkpoint: bool = False) -> tuple[FactorTotals, dict]:
    """(the factors, their record) of a factors file, refused in one sentence when it is
    not one or is damaged, or (unless ``checkpoint``) is an unfinished run's checkpoint."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise GhostprojError(f"Factors file {path} does not exist; compute it with `ghostproj factors`.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("ghostproj") != "factors":
                raise GhostprojError(f"{path} is not a factors file of `ghostproj factors`.")
            record = json.loads(meta["record"])
            totals = FactorTotals(examples=int(record["examples"]))
            for layer in record["layers"]:
                name = layer["name"]
                a, g, stats = (f.get_tensor(f"{name}.{k}") for k in ("A", "G", "stats"))
                if a.shape != (layer["n_in"], layer["n_in"]) or g.shape != (layer["n_out"], layer["n_out"]):
                    raise GhostprojError(f"{path} is damaged: the factors of '{name}' do not fit its dimensions.")
                totals.layers[name] = LayerFactors(layer["n_in"], layer["n_out"], a, g, int(stats[0]),
                                                   float(stats[1]))
                if f"{name}.A_vecs" in f.keys():
                    totals.layers[name].a_vecs = f.get_tensor(f"{name}.A_vecs")
                    totals.layers[name].g_vecs = f.get_tensor(f"{name}.G_vecs")
                    if totals.layers[name].a_vecs.shape != a.shape or totals.layers[name].g_vecs.shape != g.shape:
                        raise GhostprojError(f"{path} is damaged: the eigenvectors of '{name}' do not fit.")
    except GhostprojError:
        raise
    except Exception as exc:  # safetensors raises several types for damaged files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GhostprojError(f"{path} is not a factors file of `ghostproj factors`, or it is damaged ({first}).") \
            from None
    if record.get("format") != FACTORS_FORMAT:
        raise GhostprojError(f"{path} has factors format {record.get('format')}; this ghostproj reads "
                             f"{FACTORS_FORMAT}.")
    if "resume" in record and not checkpoint:
        raise GhostprojError(f"{path} is the checkpoint of an unfinished factors run; rerun that `ghostproj "
                             "factors` command to finish it.")
    for name, f in totals.layers.items():
        if not (torch.isfinite(f.a).all() and torch.isfinite(f.g).all()):
            raise GhostprojError(f"{path} is damaged: the factors of '{name}' are not finite.")
    return totals, record
