"""The manifest of a run directory: its constants, the typed records it holds (the run,
its layers, its shards), complete validation on construction, and atomic writes."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import GhostprojError
from .files import atomic_write

FORMAT_VERSION = 1


MANIFEST = "manifest.json"


PROJECTOR_FILE = "projector.safetensors"


SHARD_RE = re.compile(r"^grads-r(\d{3})-(\d{5})\.safetensors$")


STORE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ManifestDamaged(GhostprojError):
    """A manifest that breaks the schema; ``what`` says where, in a clause."""

    def __init__(self, what: str):
        super().__init__(f"The manifest is damaged: {what}.")
        self.what = what


def _is_int(v, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _check_types(record: dict, required: dict, optional: dict, where: str) -> None:
    for key in required:
        if key not in record:
            raise ManifestDamaged(f"{where} lacks '{key}'")
    for key, kind in {**required, **optional}.items():
        value = record.get(key)
        if value is None and key not in required:
            continue
        ok = _is_int(value) if kind is int else isinstance(value, kind) and not (kind is not bool and
                                                                                isinstance(value, bool))
        if not ok:
            words = {bool: "a boolean", int: "a count", str: "text", dict: "an object", list: "a list"}[kind]
            raise ManifestDamaged(f"{where} has a bad '{key}' ({value!r} is not {words})")


@dataclass(frozen=True)
class LayerInfo:
    """One projected layer as recorded in the manifest."""

    name: str
    type: str
    n_in: int  # includes the constant-1 column when bias is projected
    n_out: int
    k_in: int
    k_out: int
    offset: int  # start of this layer's block in the per-example vector

    @property
    def size(self) -> int:
        return self.k_in * self.k_out

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d, where: str = "a layer entry") -> "LayerInfo":
        if not isinstance(d, dict):
            raise ManifestDamaged(f"{where} is not an object")
        _check_types(d, {f.name: f.type == "str" and str or int for f in dataclasses.fields(cls)}, {}, where)
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


@dataclass
class ShardEntry:
    """One shard file as the manifest lists it: what the reader checks the file against."""

    file: str
    rows: int
    rank: int | None = None
    sha256: str | None = None
    bytes: int | None = None
    index_min: int | None = None
    index_max: int | None = None
    index_digest: str | None = None

    def __post_init__(self):
        # a lone shard file may carry any name; what must never happen is a path out of its directory
        if not isinstance(self.file, str) or Path(self.file).name != self.file or self.file in ("", ".", ".."):
            raise ManifestDamaged(f"it names a shard '{self.file}' that is not a plain shard file name")
        if self.sha256 is not None and len(self.sha256) != 64:
            raise ManifestDamaged(f"shard {self.file} has a bad 'sha256'")

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, d, n: int) -> "ShardEntry":
        if not isinstance(d, dict):
            raise ManifestDamaged(f"shard entry {n} is not an object")
        if not isinstance(d.get("file"), str) or not SHARD_RE.match(d["file"]):
            raise ManifestDamaged(f"it names a shard '{d.get('file', '')}' that is not a plain shard file name")
        _check_types(d, {"rows": int}, {"rank": int, "sha256": str, "bytes": int, "index_min": int,
                                        "index_max": int, "index_digest": str}, f"shard {d['file']}")
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})


_RUN_FIELDS = {"fingerprint_parts": dict, "model": dict, "data": dict, "loss_reduction": str, "bias": bool,
               "projector": dict, "settings": dict, "created": str, "complete": bool, "summary": dict,
               "part": dict, "factors": dict, "steps": list, "coverage": dict}


@dataclass
class Manifest:
    """A run directory's record: what defines its vectors (fingerprint, layers, projector,
    loss convention), where they came from (model, data, settings), and which shards hold
    them. Construction checks every invariant a reader relies on; keys of a later version
    are kept in ``extra`` and written back unchanged."""

    fingerprint: str
    layers: list[LayerInfo]
    store_dtype: str
    shards: list[ShardEntry] = field(default_factory=list)
    fingerprint_parts: dict | None = None
    model: dict | None = None
    data: dict = field(default_factory=dict)
    loss_reduction: str | None = None
    bias: bool | None = None
    projector: dict | None = None
    settings: dict = field(default_factory=dict)
    created: str | None = None
    complete: bool = False
    summary: dict | None = None
    part: dict | None = None  # {"shard_id", "num_shards", "rows"} of a job-array part or a torchrun rank
    factors: dict | None = None  # the eigenbasis a run was projected in
    steps: list | None = None  # [step, rows stored before it] of a training-time window
    coverage: dict | None = None  # the share of the model the layers hold (engines.coverage)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.store_dtype not in STORE_DTYPES:
            raise ManifestDamaged(f"its store dtype '{self.store_dtype}' is none of {', '.join(STORE_DTYPES)}")
        if not self.layers:
            raise ManifestDamaged("it lists no layers")
        offset = 0
        for layer in self.layers:
            if layer.k_in < 1 or layer.k_out < 1:
                raise ManifestDamaged(f"layer '{layer.name}' has a rank below 1")
            if layer.offset != offset:
                raise ManifestDamaged(f"layer '{layer.name}' starts at column {layer.offset}, not {offset} where "
                                      "the previous layer ends")
            offset += layer.size
        names = [s.file for s in self.shards]
        twice = next((name for n, name in enumerate(names) if name in names[:n]), None)
        if twice is not None:
            raise ManifestDamaged(f"it lists shard {twice} twice")
        if self.projector is not None and ("kind" not in self.projector or "seed" not in self.projector):
            raise ManifestDamaged("its 'projector' lacks 'kind' or 'seed'")
        _check_nested(self)

    @property
    def dim(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes or 0 for s in self.shards)

    def replace(self, **changes) -> "Manifest":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        out = {"format": FORMAT_VERSION, "fingerprint": self.fingerprint}
        for key in ("fingerprint_parts", "model", "data", "loss_reduction", "bias", "projector"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.update(layers=[layer.to_json() for layer in self.layers], dim=self.dim, store_dtype=self.store_dtype)
        for key in ("settings", "created"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.update(shards=[s.to_json() for s in self.shards], complete=self.complete)
        for key in ("coverage", "summary", "part", "factors", "steps"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, d, path="manifest") -> "Manifest":
        """The manifest ``d`` (parsed JSON) holds, or a one-sentence refusal naming ``path``."""
        try:
            return cls._from_json(d)
        except ManifestDamaged as exc:
            raise GhostprojError(f"{path} is damaged: {exc.what}. Restore it, or project the run again into a "
                                 "new --out.") from None

    @classmethod
    def _from_json(cls, d) -> "Manifest":
        _check_types(d, {"fingerprint": str, "layers": list, "dim": int, "store_dtype": str, "shards": list},
                     _RUN_FIELDS, "it")
        layers = [LayerInfo.from_json(x, f"layer entry {n}") for n, x in enumerate(d["layers"])]
        shards = [ShardEntry.from_json(x, n) for n, x in enumerate(d["shards"])]
        known = {"format", "dim", "layers", "shards", *(f.name for f in dataclasses.fields(cls))}
        m = cls(layers=layers, shards=shards, fingerprint=d["fingerprint"], store_dtype=d["store_dtype"],
                extra={k: v for k, v in d.items() if k not in known},
                **{k: d[k] for k in _RUN_FIELDS if k in d and d[k] is not None})
        if m.dim != d["dim"]:
            raise ManifestDamaged(f"its layers add up to {m.dim} columns but 'dim' says {d['dim']}")
        return m

    def require(self, keys: tuple[str, ...], path, why: str) -> None:
        """Fields an older or hand-written manifest may lack but this use needs."""
        for key in keys:
            if getattr(self, key) is None:
                raise GhostprojError(f"{path} lacks '{key}', which {why} needs; it was not written by "
                                     "`ghostproj project`.")


def _pair(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_is_int(x) for x in v)


def _check_nested(m: "Manifest") -> None:
    """The inner records readers index into: a job-array part, a training window's step
    boundaries, the coverage, an eigenbasis run's factors."""
    part = m.part
    if part is not None and not (_is_int(part.get("shard_id")) and _is_int(part.get("num_shards"), 1)
                                 and part["shard_id"] < part["num_shards"]
                                 and ("rows" not in part or _is_int(part["rows"]))):
        raise ManifestDamaged("its 'part' is not a shard_id below num_shards (with a row count)")
    if m.steps is not None and not all(_pair(b) for b in m.steps):
        raise ManifestDamaged("its 'steps' are not [step, rows] pairs")
    cov = m.coverage
    if cov is not None and not (_pair(cov.get("parameters")) and _pair(cov.get("matrices"))
                                and isinstance(cov.get("by_kind"), dict)
                                and all(isinstance(k, str) and _pair(v) for k, v in cov["by_kind"].items())):
        raise ManifestDamaged("its 'coverage' is not [covered, total] counts")
    if m.factors is not None and not isinstance(m.factors.get("lambda_base"), dict):
        raise ManifestDamaged("its 'factors' lack the per-layer 'lambda_base'")


def shard_file_name(rank: int, seq: int) -> str:
    """The file of a rank's (or job-array part's) shard number ``seq``: the names sort in
    the order a clean run writes them."""
    return f"grads-r{rank:03d}-{seq:05d}.safetensors"


def rank_manifest_name(rank: int) -> str:
    """Each torchrun rank's own progress manifest, merged into manifest.json at the end."""
    return f"manifest-r{rank:03d}.json"


def write_manifest(run_dir: Path, manifest: Manifest, name: str = MANIFEST) -> None:
    atomic_write(run_dir / name, (json.dumps(manifest.to_json(), indent=1) + "\n").encode())


def read_manifest(run_dir: str | os.PathLike, name: str = MANIFEST) -> Manifest:
    run_dir = Path(run_dir)
    path = run_dir / name
    if run_dir.is_file():
        raise GhostprojError(f"{run_dir} is a file; give the run directory that holds it.")
    if not run_dir.is_dir() or not path.is_file():
        raise GhostprojError(f"{run_dir} is not a ghostproj projection run (no {path.name}).")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise GhostprojError(f"{path} is damaged: it is not valid JSON (line {exc.lineno}: {exc.msg}).") from None
    except UnicodeDecodeError:
        raise GhostprojError(f"{path} is damaged: it is not UTF-8 text.") from None
    if not isinstance(d, dict) or "format" not in d:
        raise GhostprojError(f"{path} is not a ghostproj manifest.")
    if d["format"] != FORMAT_VERSION:
        raise GhostprojError(f"{path} has format {d['format']}, but this ghostproj reads format {FORMAT_VERSION}.")
    return Manifest.from_json(d, path)
