"""One batch in flight: a batch's forward, backward and projection are queued on the device
before the previous batch's results are waited for and handed to the writer."""

from __future__ import annotations

import contextlib

import torch

from ..data.batching import Example, collate
from ..data.transfer import HostCopy
from ..distributed import fillers_after
from ..engines.losses import causal_lm_losses
from ..engines.projection import GradProjectionEngine
from ..inputs import LoadedInputs
from ..models import pad_token_id
from ..progress import RateProgress
from ..store.manifest import STORE_DTYPES
from ..store.writer import RunWriter


def deliver(launched: "LaunchedBatch", writer: RunWriter, bar: RateProgress, start: int | None = None) -> None:
    """Hand a batch's rows to the writer; ``start``: their place in the run's row stream."""
    vectors, index, losses, counts = launched.result()
    writer.add(vectors, index, losses, counts, start)
    bar.advance(len(index), int(counts.sum()))


class LaunchedBatch:
    """One batch whose forward and backward have been queued on the device and whose
    results are on their way to the host."""

    def __init__(self, examples: list[Example], live: list[int], dim: int, copy: HostCopy | None):
        self.examples = examples
        self.live = live  # rows that have a label position and were run
        self.dim = dim
        self.copy = copy

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(vectors [B, D] float32, index [B], losses [B], label counts [B]) on the host;
        examples with no label position were not run and get zero vectors."""
        b = len(self.examples)
        index = torch.tensor([e.index for e in self.examples], dtype=torch.long)
        counts = torch.tensor([e.n_label_positions for e in self.examples], dtype=torch.int32)
        losses = torch.zeros(b, dtype=torch.float32)
        if self.copy is None:
            return torch.zeros(b, self.dim, dtype=torch.float32), index, losses, counts
        vectors_live, losses_live = self.copy.result()
        if len(self.live) == b:  # every example had a label position: nothing to scatter
            return vectors_live, index, losses_live.float(), counts
        vectors = torch.zeros(b, self.dim, dtype=vectors_live.dtype)
        rows = torch.tensor(self.live)
        vectors[rows] = vectors_live
        losses[rows] = losses_live.float()
        return vectors, index, losses, counts


def launch_batch(model, engine: GradProjectionEngine, examples: list[Example], loss_reduction: str, pad_id: int,
                 device: torch.device, store_dtype: torch.dtype = torch.float32) -> LaunchedBatch:
    """Queue one batch's forward, backward and projection; nothing here waits for the device."""
    live = [r for r, e in enumerate(examples) if e.n_label_positions > 0]
    if not live:
        return LaunchedBatch(examples, live, engine.dim, None)
    batch = collate([examples[r] for r in live], pad_id).to(device)
    engine.prepare(len(live), device)  # result buffers made outside any compiled region
    logits = model(**batch.model_inputs()).logits
    per_example, _ = causal_lm_losses(logits, batch.labels, loss_reduction)
    per_example.sum().backward()
    vectors = engine.collect()
    if device.type == "cuda" and store_dtype in (torch.bfloat16, torch.float32):
        # Converted on the device: half the bytes to copy and nothing left for the host to
        # convert (bf16 keeps float32's range, so no overflow check is lost).
        vectors = vectors.to(store_dtype)
    return LaunchedBatch(examples, live, engine.dim, HostCopy([vectors, per_example]))


class BatchRunner:
    """Runs batches of one run through the model and engine."""

    def __init__(self, opts, values: dict, inputs: LoadedInputs, engine: GradProjectionEngine):
        self.forward = torch.compile(inputs.model) if opts.compile else inputs.model
        self.engine, self.device = engine, inputs.device
        self.reduction, self.pad = values["loss_reduction"], pad_token_id(inputs.tokenizer)
        self.store_dtype = STORE_DTYPES[opts.store_dtype]
        # A sharded model (--fsdp) gathers each unit's weights with every rank in every
        # forward and backward, so no rank may skip one: a batch without label positions
        # runs a filler example, and a rank with fewer batches runs filler batches after its own.
        self.sharded = opts.fsdp
        self.filler = [next((e for e in inputs.data.examples if e.n_label_positions > 0), None)]

    def launch(self, batch: list[Example]):
        if self.sharded and not any(e.n_label_positions > 0 for e in batch):
            self.run_filler()
        return launch_batch(self.forward, self.engine, batch, self.reduction, self.pad, self.device, self.store_dtype)

    def run_filler(self) -> None:
        """One forward and backward whose vectors are dropped."""
        launch_batch(self.forward, self.engine, self.filler, self.reduction, self.pad, self.device).result()

    def pipeline(self, batches: list[tuple[int, list[Example]]], writer: RunWriter, bar: RateProgress) -> None:
        """One batch in flight: batch t+1 is queued on the device before batch t's results
        are waited for and handed to the writer with their place in the row stream."""
        fillers = fillers_after(len(batches)) if self.sharded else 0
        pending = None
        for start, batch in batches:
            launched = (start, self.launch(batch))
            if pending is not None:
                deliver(pending[1], writer, bar, pending[0])
            pending = launched
        if pending is not None:
            deliver(pending[1], writer, bar, pending[0])
        for _ in range(fillers):
            self.run_filler()


def dynamic_batch_sizes(compiling: bool):
    """Under torch.compile, let the engine's per-layer result buffers (attributes reached
    through the model's modules, which dynamo otherwise takes as fixed-size) follow the
    batch size, so --token-budget batches share one graph instead of one each."""
    if not compiling:
        return contextlib.nullcontext()
    import torch._dynamo

    return torch._dynamo.config.patch(force_nn_module_property_static_shapes=False)
