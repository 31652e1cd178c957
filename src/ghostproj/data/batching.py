"""Tokenized examples and right-padded batches: fixed size, or length buckets within a
token budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from ..errors import GhostprojError
from .records import Records, record_text
from .transfer import to_device

IGNORE_INDEX = -100  # the label of a position that carries no loss (padding, masked prompts)


@dataclass
class Example:
    """One tokenized example. ``loss_mask[t]`` says whether token t carries loss (before the
    one-token shift, so position 0 never does)."""

    index: int  # row of the example in the input data
    input_ids: list[int]
    loss_mask: list[bool] | None = None  # None: every token after the first carries loss
    truncated: bool = False
    prompt_filled: bool = False  # the prompt alone filled max_length: skipped, no loss left

    @property
    def n_label_positions(self) -> int:
        if len(self.input_ids) < 2:
            return 0
        if self.loss_mask is None:
            return len(self.input_ids) - 1
        return sum(1 for m in self.loss_mask[1:] if m)


@dataclass
class Batch:
    index: torch.Tensor  # [B] int64 dataset rows
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], IGNORE_INDEX on padding and masked tokens

    def to(self, device) -> "Batch":
        device = torch.device(device)
        return Batch(*(to_device(t, device) for t in (self.index, self.input_ids, self.attention_mask,
                                                         self.position_ids, self.labels)))

    def model_inputs(self) -> dict:
        # one full-sequence pass, never generation: a KV cache would only hold memory (and a
        # checkpointed layer recomputed in the backward pass would append to it twice)
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids,
                "use_cache": False}


def tokenize_records(records: Records, tokenizer, max_length: int, text_field: str = "text") -> list[Example]:
    """Tokenize every row once (``add_special_tokens=True``, truncated to ``max_length``)."""
    texts = [record_text(records, i, text_field) for i in range(len(records.rows))]
    examples = []
    chunk = 1024  # bound the tokenizer's temporary memory on large corpora
    for start in range(0, len(texts), chunk):
        enc = tokenizer(texts[start : start + chunk], add_special_tokens=True, truncation=False)["input_ids"]
        for j, ids in enumerate(enc):
            truncated = len(ids) > max_length
            examples.append(Example(index=start + j, input_ids=list(ids[:max_length]), truncated=truncated))
    return examples


def collate(examples: list[Example], pad_id: int = 0) -> Batch:
    """Right-pad a list of examples; real tokens keep positions 0..len-1."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    t = max(1, max(len(e.input_ids) for e in examples))
    b = len(examples)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    attention = torch.zeros((b, t), dtype=torch.long)
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e.input_ids)
        if n == 0:
            continue
        ids = torch.tensor(e.input_ids, dtype=torch.long)
        input_ids[r, :n] = ids
        attention[r, :n] = 1
        lab = ids.clone()
        if e.loss_mask is not None:
            lab[~torch.tensor(e.loss_mask[:n], dtype=torch.bool)] = IGNORE_INDEX
        labels[r, :n] = lab
    position_ids = (attention.cumsum(dim=1) - 1).clamp(min=0)
    index = torch.tensor([e.index for e in examples], dtype=torch.long)
    return Batch(index, input_ids, attention, position_ids, labels)


def fixed_size_batches(examples: Iterable[Example], batch_size: int) -> Iterator[list[Example]]:
    if batch_size < 1:
        raise GhostprojError(f"--batch-size must be at least 1, got {batch_size}.")
    batch: list[Example] = []
    for e in examples:
        batch.append(e)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def token_budget_batches(examples: list[Example], budget: int) -> Iterator[list[Example]]:
    """Batches whose padded size (count x longest) stays within ``budget`` tokens, from
    examples sorted by length (longest first, ties by row), so each batch holds examples
    of similar length and padding is small. An example longer than the budget forms a
    batch of its own."""
    if budget < 1:
        raise GhostprojError(f"--token-budget must be at least 1, got {budget}.")
    order = sorted(examples, key=lambda e: (-len(e.input_ids), e.index))
    batch: list[Example] = []
    longest = 0
    for e in order:
        n = max(1, len(e.input_ids))
        if batch and max(longest, n) * (len(batch) + 1) > budget:
            yield batch
            batch, longest = [], 0
        batch.append(e)
        longest = max(longest, n)
    if batch:
        yield batch
