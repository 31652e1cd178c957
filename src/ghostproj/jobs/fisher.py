"""The fisher job: the training vectors' Fisher sums for influence scores, computed once
(or in parts by separate processes, then merged) and reused by every ``score --fisher``."""

from __future__ import annotations

from ..errors import GhostprojError
from ..scoring.columns import column_index, relative_blocks, selected_layers
from ..scoring.influence import FisherSums, check_full_size, fisher_sums, merge_fisher
from ..scoring.transform import NORMALIZATIONS, Transform
from ..store.reader import open_run
from .score import check_outputs


def run_fisher(train: str, out: str, *, layers: list[str] | None, normalize: str, full: bool, num_parts: int,
               part: int, chunk_rows: int, overwrite: bool) -> FisherSums:
    check_outputs([(out, "--out")], [train], overwrite)
    if normalize not in NORMALIZATIONS:
        raise GhostprojError(f"Unknown --normalize '{normalize}'; choose one of {', '.join(NORMALIZATIONS)}.")
    run = open_run(train)
    selected = selected_layers(run.layers, layers)
    blocks = relative_blocks(selected)
    if full:
        check_full_size(sum(b.size for b in blocks))
    piece = run.part(part, num_parts) if num_parts > 1 else run
    sums, count = fisher_sums(piece, column_index(selected, run.dim), Transform(blocks, normalize=normalize),
                              blocks, full, chunk_rows)
    result = FisherSums(sums, count, full, normalize, [b.name for b in blocks], run.manifest["fingerprint"],
                        (part, num_parts) if num_parts > 1 else None)
    result.save(out)
    return result


def run_fisher_merge(out: str, parts: list[str], overwrite: bool) -> FisherSums:
    check_outputs([(out, "OUT")], parts, overwrite)
    merged = merge_fisher([FisherSums.load(p) for p in parts])
    merged.save(out)
    return merged
