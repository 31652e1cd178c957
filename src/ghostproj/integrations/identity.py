"""What the training-loop integrations share: each training row found by its token ids,
and output directories that never replace anything."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..errors import GhostprojError
from ..store.outputs import check_output_dir


def fresh_dir(out: Path) -> Path:
    """An output directory to create, refused when it already holds anything: nothing
    written before is ever replaced."""
    check_output_dir(out, "out_dir", [])
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GhostprojError(f"{out} already holds files; give another out_dir (a Trainer resumed from a checkpoint "
                             "continues its epoch's run by itself).")
    out.mkdir(parents=True, exist_ok=True)
    return out


def token_key(ids) -> str:
    """The identity of an example: the sha256 of its token ids as int64."""
    return hashlib.sha256(torch.as_tensor(ids, dtype=torch.int64).cpu().numpy().tobytes()).hexdigest()


def dataset_keys(dataset) -> dict[str, int]:
    """{token key: row} of a tokenized dataset (rows with ``input_ids``); duplicates refused."""
    keys: dict[str, int] = {}
    for row in range(len(dataset)):
        item = dataset[row]
        if "input_ids" not in item:
            raise GhostprojError("GradientStoreCallback needs a tokenized training dataset (rows with input_ids).")
        key = token_key(item["input_ids"])
        if key in keys:
            raise GhostprojError(f"Training rows {keys[key]} and {row} have the same token ids, so the stored "
                                 "gradients could not tell them apart; drop the duplicates first.")
        keys[key] = row
    return keys


def batch_rows(keys: dict[str, int], ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The dataset row of each batch row, found by its unpadded token ids; a row that is not
    in the dataset (a packing or truncating collator) is refused."""
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    rows = [keys.get(token_key(ids[i][mask[i]])) for i in range(ids.shape[0])]
    if any(r is None for r in rows):
        raise GhostprojError("A training batch holds a row that is not in the train_dataset given (a packing or "
                             "truncating collator?); give the dataset exactly as the loop batches it.")
    return torch.tensor(rows)
