"""The manifest of a run directory: its constants, the layer record, complete validation on
read, and atomic writes."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import GhostprojError
from .files import atomic_write


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
        return {
            "name": self.name,
            "type": self.type,
            "n_in": self.n_in,
            "n_out": self.n_out,
            "k_in": self.k_in,
            "k_out": self.k_out,
            "offset": self.offset,
        }

    @classmethod
    def from_json(cls, d: dict) -> "LayerInfo":
        return cls(
            name=str(d["name"]),
            type=str(d["type"]),
            n_in=int(d["n_in"]),
            n_out=int(d["n_out"]),
            k_in=int(d["k_in"]),
            k_out=int(d["k_out"]),
            offset=int(d["offset"]),
        )


FORMAT_VERSION = 1


MANIFEST = "manifest.json"


PROJECTOR_FILE = "projector.safetensors"


SHARD_RE = re.compile(r"^grads-r(\d{3})-(\d{5})\.safetensors$")


def shard_file_name(rank: int, seq: int) -> str:
    """The file of a rank's (or job-array part's) shard number ``seq``: the names sort in
    the order a clean run writes them."""
    return f"grads-r{rank:03d}-{seq:05d}.safetensors"


STORE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def write_manifest(run_dir: Path, manifest: dict, name: str = MANIFEST) -> None:
    atomic_write(run_dir / name, (json.dumps(manifest, indent=1) + "\n").encode())


def rank_manifest_name(rank: int) -> str:
    """Each torchrun rank's own progress manifest, merged into manifest.json at the end."""
    return f"manifest-r{rank:03d}.json"


def read_manifest(run_dir: str | os.PathLike, name: str = MANIFEST) -> dict:
    run_dir = Path(run_dir)
    path = run_dir / name
    if run_dir.is_file():
        raise GhostprojError(f"{run_dir} is a file; give the run directory that holds it.")
    if not run_dir.is_dir() or not path.is_file():
        raise GhostprojError(f"{run_dir} is not a ghostproj projection run (no {path.name}).")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise GhostprojError(f"{path} is damaged: it is not valid JSON (line {exc.lineno}: {exc.msg}).") from None
    except UnicodeDecodeError:
        raise GhostprojError(f"{path} is damaged: it is not UTF-8 text.") from None
    if not isinstance(manifest, dict) or "format" not in manifest:
        raise GhostprojError(f"{path} is not a ghostproj manifest.")
    if manifest["format"] != FORMAT_VERSION:
        raise GhostprojError(
            f"{path} has format {manifest['format']}, but this ghostproj reads format {FORMAT_VERSION}."
        )
    validate_manifest(manifest, path)
    return manifest


def _is_int(v, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


_LAYER_KEYS = {"name": str, "type": str, "n_in": int, "n_out": int, "k_in": int, "k_out": int, "offset": int}


def validate_manifest(m: dict, path) -> None:
    """Every field a reader relies on, checked before anything is read: a damaged or
    hand-edited manifest is refused in one sentence rather than failing somewhere later."""
    def bad(what: str):
        return GhostprojError(f"{path} is damaged: {what}. Restore it, or project the run again into a new --out.")

    for key, kind in (("fingerprint", str), ("layers", list), ("dim", int), ("store_dtype", str), ("shards", list)):
        if key not in m:
            raise bad(f"it lacks '{key}'")
        if not isinstance(m[key], kind) or isinstance(m[key], bool):
            raise bad(f"'{key}' is not a {kind.__name__}")
    for key, kind in (("bias", bool), ("loss_reduction", str), ("projector", dict), ("model", dict),
                      ("data", dict), ("complete", bool), ("settings", dict)):
        if key in m and not isinstance(m[key], kind):
            raise bad(f"'{key}' is not a {'boolean' if kind is bool else kind.__name__}")
    if m["store_dtype"] not in STORE_DTYPES:
        raise bad(f"its store dtype '{m['store_dtype']}' is none of {', '.join(STORE_DTYPES)}")
    if not m["layers"]:
        raise bad("it lists no layers")
    offset = 0
    for n, layer in enumerate(m["layers"]):
        if not isinstance(layer, dict):
            raise bad(f"layer entry {n} is not an object")
        for key, kind in _LAYER_KEYS.items():
            if key not in layer:
                raise bad(f"layer entry {n} lacks '{key}'")
            ok = isinstance(layer[key], str) if kind is str else _is_int(layer[key])
            if not ok:
                raise bad(f"layer entry {n} has a bad '{key}' ({layer[key]!r})")
        if layer["k_in"] < 1 or layer["k_out"] < 1:
            raise bad(f"layer '{layer['name']}' has a rank below 1")
        if layer["offset"] != offset:
            raise bad(f"layer '{layer['name']}' starts at column {layer['offset']}, not {offset} where the "
                      "previous layer ends")
        offset += layer["k_in"] * layer["k_out"]
    if offset != m["dim"]:
        raise bad(f"its layers add up to {offset} columns but 'dim' says {m['dim']}")
    names = set()
    for n, shard in enumerate(m["shards"]):
        if not isinstance(shard, dict):
            raise bad(f"shard entry {n} is not an object")
        name = shard.get("file", "")
        if not isinstance(name, str) or not SHARD_RE.match(name):
            raise GhostprojError(f"{path} names a shard '{name}' that is not a plain shard file name; refusing it.")
        if name in names:
            raise bad(f"it lists shard {name} twice")
        names.add(name)
        if not _is_int(shard.get("rows")):
            raise bad(f"shard {name} has no valid row count")
        for key, ok in (("bytes", _is_int), ("sha256", lambda v: isinstance(v, str) and len(v) == 64),
                        ("rank", _is_int)):
            if key in shard and not ok(shard[key]):
                raise bad(f"shard {name} has a bad '{key}'")
    projector = m.get("projector")
    if projector is not None and ("kind" not in projector or "seed" not in projector):
        raise bad("its 'projector' lacks 'kind' or 'seed'")


def require_keys(m: dict, keys: tuple[str, ...], path, why: str) -> None:
    """Keys an older or hand-written manifest may lack but this use needs."""
    for key in keys:
        if key not in m:
            raise GhostprojError(f"{path} lacks '{key}', which {why} needs; it was not written by `ghostproj project`.")


def layers_from_manifest(manifest: dict) -> list[LayerInfo]:
    return [LayerInfo.from_json(d) for d in manifest["layers"]]
