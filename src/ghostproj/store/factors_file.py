"""The factors file of `ghostproj factors`: per layer the float64 sums A = sum x x^T and
G = sum g g^T with their position count and sum of squared gradient norms, and a record
of what they were taken over (model weights, layers, data, loss, part). Sums, so parts
add up exactly."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import GhostprojError
from .files import atomic_write
from .fingerprint import fingerprint, sha256_hex, weights_hash
from .shards import encode_safetensors, safetensors_header, tensor_buffer

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


def factors_identity(weights: Iterable[tuple[str, torch.Tensor]], names: list[str],
                     dims: dict[str, tuple[int, int]]) -> dict:
    """What ties factors to the runs they may serve: the layers' weights (``<name>.weight``
    and the tensor, in the order of ``names``) and shapes."""
    return {"model_weights": weights_hash(weights), "layers": [[n, *dims[n]] for n in names]}


def factors_fingerprint(record: dict) -> str:
    parts = {"identity": str(record["identity"]), "loss_reduction": record["loss_reduction"],
             "data": record["data"].get("sha256", "")}
    if "fisher_labels" in record:
        parts["fisher_labels"] = str(record["fisher_labels"])
    return fingerprint(parts)


def _metadata(record: dict, examples: int, layers: list[tuple[str, int, int]]) -> dict[str, str]:
    record = dict(record, format=FACTORS_FORMAT, examples=examples,
                  layers=[{"name": n, "n_in": n_in, "n_out": n_out} for n, n_in, n_out in layers])
    return {"ghostproj": "factors", "record": json.dumps(record, sort_keys=True)}


def save_factors(path, totals: FactorTotals, record: dict) -> str:
    """Write the file atomically; returns its sha256."""
    tensors = {}
    for name, f in totals.layers.items():
        tensors[f"{name}.A"] = f.a
        tensors[f"{name}.G"] = f.g
        tensors[f"{name}.stats"] = torch.tensor([float(f.positions), f.sq_norms], dtype=torch.float64)
        if f.a_vecs is not None and f.g_vecs is not None:
            tensors[f"{name}.A_vecs"], tensors[f"{name}.G_vecs"] = f.a_vecs, f.g_vecs
    layers = [(n, f.n_in, f.n_out) for n, f in totals.layers.items()]
    data = encode_safetensors(tensors, _metadata(record, totals.examples, layers))
    atomic_write(Path(path), data)
    return sha256_hex(data)


def join_factors(path, groups: list, record: dict) -> None:
    """One factors file from the files of layer groups (each written by :func:`save_factors`),
    exactly as if all layers had been saved at once, holding one tensor in memory at a time:
    how the factors of layers too large to sum together are streamed to disk."""
    from safetensors import safe_open

    sources, specs, layers, examples = {}, {}, [], None
    for file in groups:
        rec = read_factors_record(file)
        examples = rec["examples"] if examples is None else examples
        layers += [(x["name"], x["n_in"], x["n_out"]) for x in rec["layers"]]
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                specs[key] = (_DTYPES[piece.get_dtype()], tuple(piece.get_shape()))
                sources[key] = file

    def buffers():
        yield safetensors_header(specs, _metadata(record, examples, layers))
        for key in sorted(specs):
            with safe_open(str(sources[key]), framework="pt") as f:
                yield tensor_buffer(f.get_tensor(key))

    atomic_write(Path(path), buffers())


_DTYPES = {"F64": torch.float64, "F32": torch.float32}


def load_factors(path, checkpoint: bool = False, sums: bool = True) -> tuple[FactorTotals, dict]:
    """(the factors, their record) of a factors file, refused in one sentence when it is
    not one or is damaged, or (unless ``checkpoint``) is an unfinished run's checkpoint.
    ``sums=False`` leaves A and G unread where the eigenvectors are there (what a
    projection needs), so their memory is not taken."""
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
            keys = set(f.keys())
            for layer in record["layers"]:
                totals.layers[layer["name"]] = _read_layer(f, keys, layer, path, sums)
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
        held = [t for t in (f.a, f.g, f.a_vecs, f.g_vecs) if t is not None]
        if not all(torch.isfinite(t).all() for t in held):
            raise GhostprojError(f"{path} is damaged: the factors of '{name}' are not finite.")
    return totals, record


def _read_layer(f, keys: set, layer: dict, path, sums: bool) -> LayerFactors:
    name, n_in, n_out = layer["name"], layer["n_in"], layer["n_out"]
    square = {"A": (n_in, n_in), "G": (n_out, n_out), "A_vecs": (n_in, n_in), "G_vecs": (n_out, n_out)}
    vecs = f"{name}.A_vecs" in keys
    for part, shape in square.items():
        if (part in ("A", "G") or vecs) and tuple(f.get_slice(f"{name}.{part}").get_shape()) != shape:
            raise GhostprojError(f"{path} is damaged: the factors of '{name}' do not fit its dimensions.")
    stats = f.get_tensor(f"{name}.stats")
    read_sums = sums or not vecs
    out = LayerFactors(n_in, n_out, f.get_tensor(f"{name}.A") if read_sums else None,
                       f.get_tensor(f"{name}.G") if read_sums else None, int(stats[0]), float(stats[1]))
    if vecs:
        out.a_vecs, out.g_vecs = f.get_tensor(f"{name}.A_vecs"), f.get_tensor(f"{name}.G_vecs")
    return out


def read_factors_record(path) -> dict:
    """The record of a factors file (or checkpoint) without reading its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {})["record"])
