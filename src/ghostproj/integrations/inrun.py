"""In-run data valuation inside ``transformers.Trainer``: :class:`InRunValuationTrainer`."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Trainer

from ..data.batching import IGNORE_INDEX
from ..engines.dotprod import GradDotProdEngine
from ..engines.losses import causal_lm_losses
from ..errors import GhostprojError
from ..store.files import atomic_write
from ..store.shards import encode_safetensors
from .identity import batch_rows, dataset_keys, fresh_dir


class InRunValuationTrainer(Trainer):
    """A ``transformers.Trainer`` that carries a fixed validation batch in every training
    step (in-run data valuation, as ``ghostproj inrun``): after training,
    ``in_run_values[i]`` is sum over the steps that drew training row i of
    -lr_t <grad l_i, sum_j grad l_val_j>, with each l the example's mean token loss, and
    ``in_run_counts[i]`` how many steps drew it.

    The optimizer sees exactly the gradient of the Trainer's own loss on the training rows
    (the token mean over the step's label tokens), never the validation rows': the loss
    back-propagated weighs each training row's token sum by B / N (N the step's label
    tokens, ``num_items_in_batch``), so the engine's training gradient, the mean over the B
    rows of their gradients, is that gradient; each dot product is rescaled by the same
    weight. Rows are identified by their token ids, as :class:`GradientStoreCallback` does."""

    def __init__(self, *args, validation_dataset, **kwargs):
        super().__init__(*args, **kwargs)
        if self.train_dataset is None or len(validation_dataset) < 1:
            raise GhostprojError("InRunValuationTrainer needs a train_dataset and a non-empty validation_dataset.")
        self.loss_is_scaled_for_ga = True  # compute_loss divides by the step's label tokens itself
        self.keys = dataset_keys(self.train_dataset)
        self.validation = [validation_dataset[i] for i in range(len(validation_dataset))]
        self.in_run_values = torch.zeros(len(self.train_dataset), dtype=torch.float64)
        self.in_run_counts = torch.zeros(len(self.train_dataset), dtype=torch.int64)
        self._log: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (step, rows, dots) per micro-batch
        self._engine: GradDotProdEngine | None = None
        self._pending = None

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            if self._engine is not None:
                self._engine.detach()
                self._engine = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._engine is None:
            self._engine = GradDotProdEngine(self.model, val_batch_size=len(self.validation),
                                             loss_reduction="sum").attach()
        ids, mask, labels, b = self._with_validation(inputs)
        rows = self._rows(ids[:b], mask[:b])
        logits = model(input_ids=ids, attention_mask=mask).logits
        sums, counts = causal_lm_losses(logits, labels, "sum")
        tokens = float(num_items_in_batch) if num_items_in_batch is not None else \
            float(counts[:b].sum()) * self.current_gradient_accumulation_steps
        weight = b / max(tokens, 1.0)
        loss = (sums[:b] * weight).sum() + (sums[b:] / counts[b:].clamp(min=1)).sum()
        self._pending = (rows, counts[:b].cpu(), weight, self.lr_scheduler.get_last_lr()[0])
        return (loss, {"logits": logits}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        result = self._engine.collect()  # the training rows' gradient goes into .grad, added per micro-batch
        rows, counts, weight, lr = self._pending
        scale = weight * counts.double()
        dots = torch.where(scale > 0, result.total.detach().double().cpu() / scale.clamp(min=1e-300), 0.0)
        self.in_run_values.index_add_(0, rows, -lr * dots)
        self.in_run_counts.index_add_(0, rows, torch.ones_like(rows))
        self._log.append((self.state.global_step, rows, dots.float()))
        return loss

    def save_in_run_values(self, out_dir: str) -> Path:
        """``dots.safetensors`` (step, index, dot per row drawn) and ``values.safetensors``
        (index, value, count per training row) in ``out_dir``, as ``ghostproj inrun`` writes them."""
        out = fresh_dir(Path(out_dir))
        meta = {"val_count": str(len(self.validation)), "source": "InRunValuationTrainer"}
        steps = [torch.full((len(r),), s, dtype=torch.int64) for s, r, _ in self._log]
        log = {"step": torch.cat(steps) if steps else torch.empty(0, dtype=torch.int64),
               "index": torch.cat([r for _, r, _ in self._log]) if self._log else torch.empty(0, dtype=torch.int64),
               "dot": torch.cat([d for _, _, d in self._log]) if self._log else torch.empty(0)}
        atomic_write(out / "dots.safetensors", encode_safetensors(log, meta))
        atomic_write(out / "values.safetensors", encode_safetensors(
            {"index": torch.arange(len(self.in_run_values)), "value": self.in_run_values.float(),
             "count": self.in_run_counts}, meta))
        return out

    def _with_validation(self, inputs):
        """The step's rows followed by the validation rows, right-padded to one width."""
        val = self.data_collator(self.validation)
        parts = [(inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"]),
                 (val["input_ids"], val.get("attention_mask"), val["labels"])]
        width = max(p[0].shape[1] for p in parts)
        device = inputs["input_ids"].device
        ids, mask, labels = [], [], []
        for x, m, y in parts:
            m = torch.ones_like(x) if m is None else m
            pad = width - x.shape[1]
            ids.append(torch.nn.functional.pad(x.to(device), (0, pad), value=0))
            mask.append(torch.nn.functional.pad(m.to(device), (0, pad), value=0))
            labels.append(torch.nn.functional.pad(y.to(device), (0, pad), value=IGNORE_INDEX))
        return torch.cat(ids), torch.cat(mask), torch.cat(labels), parts[0][0].shape[0]

    def _rows(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return batch_rows(self.keys, ids, mask)
