"""The fisher job: the training vectors' Fisher sums for influence scores, computed once
(or in parts by separate processes, then merged) and reused by every ``score --fisher``."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import defaults
from ..errors import GhostprojError
from ..models import resolve_device
from ..scoring.fisher import compute_fisher
from ..scoring.influence import FisherSums, merge_fisher
from ..store.outputs import check_outputs
from ..store.reader import open_run


@dataclass
class FisherOptions:
    """Options of ``ghostproj fisher``: one training run and the Fisher file to write, or
    with ``merge`` the output followed by the part files."""

    paths: list[str] = field(default_factory=list)
    out: str | None = None
    layers: list[str] | None = None
    normalize: str = defaults.NORMALIZE
    full: bool = False
    num_parts: int = 1
    part: int = 0
    merge: bool = False
    overwrite: bool = False
    chunk_rows: int | None = None
    device: str = "auto"

    def __post_init__(self):
        if self.merge and len(self.paths) < 2:
            raise GhostprojError("--merge needs OUT followed by the part files.")
        if not self.merge and (len(self.paths) != 1 or self.out is None):
            raise GhostprojError("fisher takes one training run and --out FILE (or --merge OUT PART...).")


def run_fisher(opts: FisherOptions) -> FisherSums:
    """The Fisher file of the run (or part), or the sum of the parts with ``merge``."""
    if opts.merge:
        return run_fisher_merge(opts.paths[0], opts.paths[1:], opts.overwrite)
    check_outputs([(opts.out, "--out")], [opts.paths[0]], opts.overwrite)
    result = compute_fisher(open_run(opts.paths[0]), layers=opts.layers, normalize=opts.normalize, full=opts.full,
                            part=(opts.part, opts.num_parts) if opts.num_parts > 1 else None,
                            chunk_rows=opts.chunk_rows, device=resolve_device(opts.device))
    result.save(opts.out)
    return result


def run_fisher_merge(out: str, parts: list[str], overwrite: bool) -> FisherSums:
    check_outputs([(out, "OUT")], parts, overwrite)
    merged = merge_fisher([FisherSums.load(p) for p in parts])
    merged.save(out)
    return merged
