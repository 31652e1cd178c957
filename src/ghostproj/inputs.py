"""One loader of a model and the data it runs over, for every command that runs a model:
the data's format and layout are checked before the (slow) model load, examples are cut
to the model's position limit, and the notes of both go back to the caller."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data.batching import Example
from .data.readers import DataSpec, LayoutFields, LoadedData, load_examples
from .data.records import read_records
from .distributed import device_for_this_process
from .errors import GhostprojError
from .models import load_model, position_limit, resolve_device


@dataclass
class InputFields(LayoutFields):
    """Where a job's model and examples come from (what :func:`load_inputs` reads): the
    same fields for every job that runs a model over data."""

    model: str | None = None
    data: str | None = None
    max_length: int = 512
    device: str = "auto"
    dtype: str = "float32"
    format: str = "auto"
    token_dtype: str | None = None
    split: str = "train"
    revision: str | None = None
    adapter: str | None = None


@dataclass
class CheckSource(LayoutFields):
    """The model and data a check runs on, and the data's layout."""

    model: str | None = None
    data: str | None = None


@dataclass
class LoadedInputs:
    """A loaded model and its data sets (one per spec, in order)."""

    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    specs: list[DataSpec]
    sets: list[LoadedData]
    max_length: int  # --max-length, capped to the model's position limit
    notes: list[str] = field(default_factory=list)

    @property
    def spec(self) -> DataSpec:
        return self.specs[0]

    @property
    def data(self) -> LoadedData:
        return self.sets[0]


def load_model_and_examples(model: str, specs: list[DataSpec], *, max_length: int, dtype: str = "float32",
                            device: str = "auto", revision: str | None = None, adapter: str | None = None,
                            read_first: bool = False, meta: bool = False) -> LoadedInputs:
    """The model and every data set of ``specs``. ``read_first``: parse JSONL and text files
    once before the model load, so a malformed file is reported at once (the checks' small
    data; `project` leaves it to the one read that follows). ``meta``: the model's shapes
    alone, on the meta device."""
    for spec in specs:
        fmt = spec.resolved_format()  # an unknown format is refused before the model load
        if fmt != "hf" and not Path(spec.path).is_file():
            raise GhostprojError(f"Data file {spec.path} does not exist.")
        if read_first and fmt in ("jsonl", "text"):
            read_records(spec.path)
    loaded, tokenizer = load_model(model, dtype, device_for_this_process(device), revision, adapter, meta)
    notes = []
    limit = position_limit(loaded)
    if limit is not None and max_length > limit:
        notes.append(f"--max-length {max_length} exceeds the model's position limit; capped to {limit}.")
        max_length = limit
    vocab = getattr(loaded.config, "vocab_size", None)
    sets = [load_examples(spec, tokenizer, max_length, vocab) for spec in specs]
    for data in sets:
        notes += data.notes
    # a model built on the meta device runs where --device says, once its weights are in
    device_used = resolve_device(device_for_this_process(device)) if meta else next(loaded.parameters()).device
    return LoadedInputs(loaded, tokenizer, device_used, specs, sets, max_length, notes)


def load_inputs(opts: InputFields, summary, meta: bool = False) -> LoadedInputs:
    """The model (on the meta device with ``meta``) and examples of ``opts``; the notes go
    to ``summary.notes``."""
    spec = DataSpec(opts.data, opts.format, token_dtype=opts.token_dtype, split=opts.split, **opts.fields)
    inputs = load_model_and_examples(opts.model, [spec], max_length=opts.max_length, dtype=opts.dtype,
                                     device=opts.device, revision=opts.revision, adapter=opts.adapter, meta=meta)
    summary.notes += inputs.notes
    return inputs


def load_model_and_data(model_path: str, data_path: str, dtype: str, device: str, max_length: int,
                        adapter: str | None = None, **fields):
    """(model, tokenizer, LoadedData) for the checks, read as `project` reads them; a
    malformed data file is reported before the (slow) model load."""
    inputs = load_model_and_examples(model_path, [DataSpec(data_path, **fields)], max_length=max_length, dtype=dtype,
                                     device=device, adapter=adapter, read_first=True)
    return inputs.model, inputs.tokenizer, inputs.data


def pick_mixed_lengths(examples: list[Example], samples: int) -> list[Example]:
    """Examples spread evenly over the length range, so a batch of them is padded and mixed."""
    if samples < 1:
        raise GhostprojError(f"--samples must be at least 1, got {samples}.")
    live = sorted((e for e in examples if e.n_label_positions > 0), key=lambda e: len(e.input_ids))
    if not live:
        raise GhostprojError("No example in the data has a label position to check.")
    if len(live) <= samples:
        chosen = live
    else:
        step = (len(live) - 1) / (samples - 1) if samples > 1 else 0
        chosen = [live[round(i * step)] for i in range(samples)]
    return sorted(chosen, key=lambda e: e.index)  # mixed order: not sorted by length in the batch
