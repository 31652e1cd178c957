"""Reading examples, tokenizing them, and cutting them into right-padded batches."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .errors import GhostprojError
from .losses import IGNORE_INDEX
from .transfer import to_device


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
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Records:
    """Raw rows of a data file (dicts), in file order."""

    path: str
    rows: list[dict] = field(default_factory=list)


def read_records(path: str | os.PathLike) -> Records:
    """Read JSONL (one JSON object per line) or plain text (one example per line, field ``text``)."""
    p = Path(path)
    if not p.exists():
        raise GhostprojError(f"Data file {p} does not exist.")
    if p.is_dir():
        raise GhostprojError(f"Data path {p} is a directory, not a file.")
    if not os.access(p, os.R_OK):
        raise GhostprojError(f"Cannot read data file {p}: permission denied (fix its permissions).")
    rows: list[dict] = []
    jsonl = p.suffix.lower() in (".jsonl", ".json", ".ndjson")
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise GhostprojError(f"{p} line {lineno} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                     f"{exc.start + 1}); save the file as UTF-8.") from None
            if jsonl:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    cause = exc.msg.removesuffix(" at")
                    raise GhostprojError(f"{p} line {lineno} is not valid JSON ({cause} at column {exc.colno}).") from None
                if not isinstance(obj, dict):
                    raise GhostprojError(f"{p} line {lineno} is not a JSON object.")
                obj["_line"] = lineno
                rows.append(obj)
            else:
                text = line.rstrip("\n").rstrip("\r")
                if text.strip():
                    rows.append({"text": text, "_line": lineno})
    if not rows:
        raise GhostprojError(f"Data file {p} holds no examples.")
    return Records(str(p), rows)


def record_text(records: Records, i: int, text_field: str) -> str:
    row = records.rows[i]
    if text_field not in row:
        raise GhostprojError(f"{records.path} line {row['_line']} has no field '{text_field}' (use --text-field).")
    value = row[text_field]
    if not isinstance(value, str):
        raise GhostprojError(f"{records.path} line {row['_line']}: field '{text_field}' is not a string.")
    return value


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


def records_for_run(manifest: dict) -> tuple[Records | None, str]:
    """The data rows a run was projected from, if the file is still there unchanged, and
    the reason when it is not."""
    data = manifest.get("data", {})
    path = data.get("path")
    if data.get("format") not in (None, "jsonl", "text"):
        return None, f"texts are not shown for {data.get('format')} data"
    if not path or not Path(path).is_file():
        return None, f"the data file {path} is not at hand"
    if data.get("sha256") and file_sha256(path) != data["sha256"]:
        return None, f"the data file {path} changed since projection"
    try:
        return read_records(path), ""
    except GhostprojError as exc:
        return None, str(exc)


def record_field(records: Records, index: int, name: str):
    row = records.rows[index] if 0 <= index < len(records.rows) else {}
    return row.get(name)


def example_text(records: Records, index: int, data: dict) -> str:
    """How an example reads, for tables: its text, prompt + completion, or its messages."""
    row = records.rows[index] if 0 <= index < len(records.rows) else {}
    if data.get("messages_field"):
        msgs = row.get(data["messages_field"]) or []
        return " | ".join(f"{m.get('role')}: {m.get('content')}" for m in msgs if isinstance(m, dict))
    if data.get("prompt_field"):
        return f"{row.get(data['prompt_field'], '')}{row.get(data['completion_field'], '')}"
    return str(row.get(data.get("text_field", "text"), ""))
