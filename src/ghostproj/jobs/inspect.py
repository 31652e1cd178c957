"""The inspect job: verify a run (after joining job-array parts into it, with ``merge``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import GhostprojError
from ..store.merge import merge_runs
from ..store.reader import verify_run


@dataclass
class InspectOptions:
    """Options of ``ghostproj inspect``: a run directory, or with ``merge`` the output run
    followed by the part directories."""

    run_dirs: list[str] = field(default_factory=list)
    quick: bool = False
    merge: bool = False

    def __post_init__(self):
        if self.merge and len(self.run_dirs) < 2:
            raise GhostprojError("--merge needs OUT followed by the part directories.")
        if not self.merge and len(self.run_dirs) != 1:
            raise GhostprojError("inspect takes one run directory (or --merge OUT PART...).")


def run_inspect(opts: InspectOptions):
    """The verification report of the run (shards hashed unless ``quick``)."""
    if opts.merge:
        merge_runs(opts.run_dirs[0], opts.run_dirs[1:])
    return verify_run(opts.run_dirs[0], hash_shards=not opts.quick)
