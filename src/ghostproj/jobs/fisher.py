"""The fisher job: the training vectors' Fisher sums for influence scores, computed once
(or in parts by separate processes, then merged) and reused by every ``score --fisher``."""

from __future__ import annotations

from ..models import resolve_device
from ..scoring.fisher import compute_fisher
from ..scoring.influence import FisherSums, merge_fisher
from ..store.outputs import check_outputs
from ..store.reader import open_run


def run_fisher(train: str, out: str, *, layers: list[str] | None, normalize: str, full: bool, num_parts: int,
               part: int, chunk_rows: int | None, overwrite: bool, device: str = "auto") -> FisherSums:
    check_outputs([(out, "--out")], [train], overwrite)
    result = compute_fisher(open_run(train), layers=layers, normalize=normalize, full=full,
                            part=(part, num_parts) if num_parts > 1 else None, chunk_rows=chunk_rows,
                            device=resolve_device(device))
    result.save(out)
    return result


def run_fisher_merge(out: str, parts: list[str], overwrite: bool) -> FisherSums:
    check_outputs([(out, "OUT")], parts, overwrite)
    merged = merge_fisher([FisherSums.load(p) for p in parts])
    merged.save(out)
    return merged
