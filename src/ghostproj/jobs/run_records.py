"""What a projection run's manifest records of its model, data, settings and factors: pure
functions of what defines the run, so that a resumed run can be compared with the one it
continues."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.records import file_sha256
from ..distributed import whole_weights
from ..engines.projection import GradProjectionEngine
from ..inputs import LoadedInputs
from ..models import config_hash
from ..store.factors_file import FactorTotals, factors_fingerprint
from ..store.fingerprint import fingerprint, sampled_weights_hash, weights_hash
from ..store.manifest import PROJECTOR_FILE, Manifest


def weights_sha(model: torch.nn.Module, engine: GradProjectionEngine, adapter: str | None) -> str:
    """The fingerprint's model part: the projected layers' weights (and biases with --bias)."""
    def read(name):
        module = engine.modules[name]
        return [(name + ".weight", engine.kinds[name].part_weight(module, name))] + (
            [(name + ".bias", module.bias)] if engine.bias else [])

    sha = weights_hash(whole_weights(model, [info.name for info in engine.layers], read))
    if adapter:
        # the adapter's matrices alone do not say which base they sit on: runs over
        # different bases must not compare as equal
        base = [(n, p) for n, p in model.named_parameters() if ".lora_" not in n]
        sha = fingerprint({"adapter": sha, "base": sampled_weights_hash(base)})
    return sha


def model_record(model: torch.nn.Module, opts, parts: dict) -> dict:
    return {"path": opts.model, "class": type(model).__name__, "config_hash": config_hash(model),
            "weights_hash": parts["model_weights"], "dtype": opts.dtype,
            "adapter": str(Path(opts.adapter).resolve()) if opts.adapter else None}


def data_record(inputs: LoadedInputs) -> dict:
    return {**inputs.spec.describe(), "sha256": inputs.data.sha256, "fields": inputs.data.fields,
            "max_length": inputs.max_length, "count": len(inputs.data.examples)}


def run_settings(opts, inputs: LoadedInputs) -> dict:
    """What a resumed run must share with the run it continues, beyond the fingerprint."""
    settings = {"max_length": inputs.max_length, "data_spec": inputs.spec.describe(), "store_dtype": opts.store_dtype,
                "shard_size": opts.shard_size, "batch_size": opts.batch_size, "token_budget": opts.token_budget,
                "dtype": opts.dtype}
    if opts.optimizer_state:  # the vectors are Adam directions under these moments
        settings["optimizer_state"] = {"path": str(Path(opts.optimizer_state).resolve()),
                                       "sha256": file_sha256(opts.optimizer_state)}
    return settings


def build_manifest(*, parts: dict, model: dict, data: dict, loss_reduction: str, bias: bool,
                   projector: tuple[str, int], layers: list, store_dtype: str, settings: dict,
                   created: str) -> Manifest:
    """The manifest of a new run, before any shard: a pure function of what defines the run."""
    return Manifest(fingerprint=fingerprint(parts), fingerprint_parts=parts, model=model, data=data,
                    loss_reduction=loss_reduction, bias=bias,
                    projector={"kind": projector[0], "seed": projector[1], "file": PROJECTOR_FILE},
                    layers=list(layers), store_dtype=store_dtype, settings=settings, created=created)


def factors_record(path: str, factors: FactorTotals, record: dict) -> dict:
    """What scoring an eigenbasis run needs of its factors, kept in its manifest: EK-FAC's
    damping scale per layer (the mean eigenvalue correction over the layer's whole space)."""
    return {"path": str(Path(path).resolve()), "sha256": file_sha256(path), "fingerprint": factors_fingerprint(record),
            "examples": factors.examples,
            "lambda_base": {n: f.lambda_base(factors.examples) for n, f in factors.layers.items()}}


def capped_rank_notes(engine, rank: int | None, rank_in: int | None, rank_out: int | None) -> list[str]:
    """Say so when --rank asks for more than some layers have: they are projected at their
    full size, and the run is smaller than the user may think."""
    if rank_in is not None or rank_out is not None:
        notes = []
        for flag, asked, k, n in (("--rank-in", rank_in, "k_in", "n_in"), ("--rank-out", rank_out, "k_out", "n_out")):
            capped = [i for i in engine.layers if asked is not None and getattr(i, k) < asked]
            if capped:
                first = capped[0]
                notes.append(f"{flag} {asked} exceeds the width of {len(capped)} layer(s) (e.g. {first.name}: "
                             f"{getattr(first, n)}); they use their full width.")
        return notes
    if rank is None:
        return []
    capped = [i for i in engine.layers if i.k_in == i.n_in and i.k_out == i.n_out and i.size < rank]
    if not capped:
        return []
    first = capped[0]
    return [f"--rank {rank} exceeds the full size of {len(capped)} layer(s) (e.g. {first.name}: {first.n_in} x "
            f"{first.n_out} = {first.size}); they are projected at that full size."]
