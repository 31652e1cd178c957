"""Which examples a run holds, checked from its manifest alone: each shard entry records
its row count and an order-free digest of its dataset indices, so a reader can refuse a
run that holds an example twice or misses one without reading a single vector."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import GhostprojError
from .manifest import Manifest

_MASK = (1 << 64) - 1


def _mixed(index: np.ndarray) -> np.ndarray:
    """A 64-bit mix of each index (splitmix64's finalizer): nearby indices get unrelated
    values, so a sum of them tells one set of indices from another."""
    z = index.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def index_digest(index) -> str:
    """The digest of a multiset of dataset indices: the sum (mod 2^64) of their mixes, so
    the digests of disjoint parts add up to the digest of the whole."""
    values = np.asarray(index, dtype=np.int64).reshape(-1)
    with np.errstate(over="ignore"):
        total = int(_mixed(values).sum(dtype=np.uint64)) if values.size else 0
    return f"{total:016x}"


def add_digests(digests) -> str:
    return f"{sum(int(d, 16) for d in digests) & _MASK:016x}"


def expected_indices(manifest: Manifest) -> np.ndarray | None:
    """The dataset indices a complete run (or job-array part) holds, each exactly once:
    every row of its data, or every ``num_shards``-th from ``shard_id`` for a part. None
    for a lone shard file, whose manifest does not say."""
    count = manifest.data.get("count")
    if not isinstance(count, int) or isinstance(count, bool):
        return None
    part = manifest.part or {"shard_id": 0, "num_shards": 1}
    return np.arange(int(part["shard_id"]), count, int(part["num_shards"]), dtype=np.int64)


def check_exactly_once(manifest: Manifest, path, digest_of_shard) -> None:
    """Refuse a complete run whose shards do not hold each of its examples exactly once.
    ``digest_of_shard(entry)`` gives the digest of a shard whose entry records none (runs
    written before digests were recorded), from its index column."""
    expected = expected_indices(manifest)
    if expected is None or not manifest.complete:
        return
    rows = manifest.rows
    digest = add_digests(s.index_digest or digest_of_shard(s) for s in manifest.shards)
    if rows == len(expected) and digest == index_digest(expected):
        return
    what = "its part of the data" if manifest.part else "its data"
    if rows != len(expected):
        detail = f"its shards hold {rows} rows for the {len(expected)} examples of {what}"
    else:
        detail = f"its shards hold {rows} rows, but some example is there twice and another is missing"
    raise GhostprojError(f"{Path(path)} is inconsistent: {detail}. Rerun its project command: it "
                         "recomputes the shards that hold the wrong examples.")
