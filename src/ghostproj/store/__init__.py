"""Projection run directories: manifest, shards, fingerprint, atomic writes, locking and
merging. A run directory holds ``manifest.json``, ``projector.safetensors`` and shards
``grads-rRRR-SSSSS.safetensors``. Run directories may come from someone else, so readers
validate names, sizes and dtypes against the manifest before reading any tensor data,
and nothing is ever unpickled."""

from .files import atomic_write  # noqa: F401
from .fingerprint import differing_part, fingerprint, fingerprint_parts, weights_hash  # noqa: F401
from .lock import RunLock  # noqa: F401
from .manifest import (  # noqa: F401
    FORMAT_VERSION,
    MANIFEST,
    PROJECTOR_FILE,
    SHARD_RE,
    STORE_DTYPES,
    LayerInfo,
    Manifest,
    ShardEntry,
    rank_manifest_name,
    read_manifest,
    write_manifest,
)
from .merge import merge_manifests, merge_runs  # noqa: F401
from .reader import Run, damaged_shards, open_run, verify_run  # noqa: F401
from .shards import encode_safetensors, encode_shard, read_rows, read_shard_header  # noqa: F401
from .writer import RunWriter  # noqa: F401
