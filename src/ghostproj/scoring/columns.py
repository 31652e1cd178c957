"""The columns of a run that a score reads: the selected layers' blocks, streamed in
float32 chunks."""

from __future__ import annotations

import torch

from ..engines.layers import pattern_matches
from ..errors import GhostprojError
from ..store.manifest import LayerInfo
from ..store.reader import Run


def selected_layers(layers: list[LayerInfo], patterns: list[str] | None) -> list[LayerInfo]:
    if not patterns:
        return layers
    chosen = []
    for pattern in patterns:
        hits = [info for info in layers if pattern_matches(pattern, info.name)]
        if not hits:
            raise GhostprojError(
                f"Layer pattern '{pattern}' matches no projected layer; the run has: {', '.join(i.name for i in layers)}."
            )
        chosen += [h for h in hits if h not in chosen]
    return sorted(chosen, key=lambda i: i.offset)


def column_index(selected: list[LayerInfo], dim: int) -> torch.Tensor | None:
    """Column indices of the selected blocks, or None for all columns."""
    if sum(i.size for i in selected) == dim:
        return None
    return torch.cat([torch.arange(i.offset, i.offset + i.size) for i in selected])


def relative_blocks(selected: list[LayerInfo]) -> list[LayerInfo]:
    out, offset = [], 0
    for i in selected:
        out.append(LayerInfo(i.name, i.type, i.n_in, i.n_out, i.k_in, i.k_out, offset))
        offset += i.size
    return out


def chunks(run: Run, cols: torch.Tensor | None, chunk_rows: int):
    """float32 chunks of the selected columns; accumulation is float32 whatever the store dtype."""
    def convert(chunk: torch.Tensor) -> torch.Tensor:
        return chunk.float() if cols is None else chunk[:, cols].float()

    yield from run.iter_chunks(chunk_rows, convert=convert)
