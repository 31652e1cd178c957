"""The files `score`, `merge-scores` and `index` write from a score result: the score
matrix (safetensors), the top-k matches and the per-example selection scores."""

from __future__ import annotations

import json
from pathlib import Path

from ..store.files import atomic_write
from ..store.shards import encode_safetensors
from .score import ScoreResult


def write_scores(path: str, result: ScoreResult) -> None:
    tensors = {"scores": result.scores, "train_index": result.train_index, "query_index": result.query_index}
    atomic_write(Path(path), encode_safetensors(tensors))


def write_topk(path: str, result: ScoreResult) -> None:
    lines = []
    for j in range(result.topk_train.shape[0]):
        found = result.topk_train[j] >= 0  # an approximate index may find fewer than k
        lines.append(json.dumps({
            "query": int(result.query_index[j]),
            "train": [int(i) for i in result.topk_train[j][found]],
            "scores": [float(v) for v in result.topk_scores[j][found]],
        }))
    atomic_write(Path(path), ("\n".join(lines) + "\n").encode())


def write_selection(path: str, result: ScoreResult) -> None:
    if path.endswith(".safetensors"):
        atomic_write(Path(path), encode_safetensors({"index": result.train_index, "score": result.selection}))
        return
    lines = [json.dumps({"index": int(i), "score": float(v)}) for i, v in zip(result.train_index, result.selection)]
    atomic_write(Path(path), ("\n".join(lines) + "\n").encode())
