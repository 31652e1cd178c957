"""The one guard every command runs before it writes: no output lands on anything the
command reads, whatever ``--overwrite`` says. Paths are compared resolved (so symbolic
links count) and files by device and inode (so hard links count)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import GhostprojError
from .manifest import MANIFEST


@dataclass(frozen=True)
class _Input:
    path: Path  # resolved
    inode: tuple[int, int] | None  # (device, inode) of an existing file or directory


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _inputs(paths) -> list[_Input]:
    """The existing ones of ``paths`` and their sources (a hub id names no local file)."""
    found = []
    for p in with_provenance(paths):
        resolved = Path(p).expanduser().resolve()
        if resolved.exists():
            found.append(_Input(resolved, _inode(resolved)))
    return found


def with_provenance(paths) -> list[str]:
    """``paths`` and, for each projection run among them, what it was made from: its data
    file, model directory, adapter and optimizer state. A command that reads a run reads
    its texts from the data file, and a run is worth only as much as its sources."""
    found = []
    for p in paths:
        if p is None:
            continue
        found.append(str(p))
        manifest_path = Path(p) / MANIFEST if Path(p).is_dir() else Path(p).parent / MANIFEST
        try:
            m = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(m, dict):
            continue
        model, data = m.get("model") or {}, m.get("data") or {}
        settings = m.get("settings") or {}
        state = settings.get("optimizer_state") if isinstance(settings, dict) else None
        for source in (data.get("path"), model.get("path"), model.get("adapter"),
                       state.get("path") if isinstance(state, dict) else None):
            if isinstance(source, str) and source and Path(source).exists():
                found.append(source)
    return found


def _lands_on(target: Path, inputs: list[_Input]) -> _Input | None:
    """The input an output at ``target`` would replace or land inside, if any."""
    inode = _inode(target)
    for inp in inputs:
        if target == inp.path or target.is_relative_to(inp.path):
            return inp
        if inode is not None and inode == inp.inode:
            return inp
    if inode is not None and os.stat(target).st_nlink > 1:  # a hard link to a file inside an input directory
        for inp in inputs:
            if inp.path.is_dir():
                for f in inp.path.rglob("*"):
                    if f.is_file() and _inode(f) == inode:
                        return inp
    return None


def _refuse(flag: str, path, inp: _Input) -> GhostprojError:
    target = Path(path).expanduser().resolve()
    if target == inp.path:
        what = "is one of the inputs"
    elif target.is_relative_to(inp.path):
        what = f"lies inside {inp.path}, which this command reads"
    elif inp.path.is_relative_to(target):
        what = f"holds {inp.path}, which this command reads"
    else:
        what = f"is the same file as {inp.path} (a link), which this command reads"
    return GhostprojError(f"{flag} {path} {what}; write the output elsewhere.")


def check_outputs(outputs: list[tuple[str | None, str]], inputs: list, overwrite: bool) -> None:
    """Refuse, before any work, an output file that would land on an input (or inside an
    input directory), inside a projection run directory, on another output, or (without
    ``overwrite``) on an existing file."""
    protected = _inputs(inputs)
    taken: dict[Path, str] = {}
    for path, flag in outputs:
        if path is None:
            continue
        target = Path(path).expanduser().resolve()
        if not target.parent.is_dir():
            raise GhostprojError(f"{flag} {path}: the directory {target.parent} does not exist.")
        if target.is_dir():
            raise GhostprojError(f"{flag} {path} is a directory; give a file name.")
        hit = _lands_on(target, protected)
        if hit is not None:
            raise _refuse(flag, path, hit)
        if (target.parent / MANIFEST).exists():
            raise GhostprojError(f"{flag} {path} is inside a projection run directory; write outputs elsewhere "
                                 "so the run stays as `project` wrote it.")
        if target in taken:
            raise GhostprojError(f"{flag} and {taken[target]} name the same file {path}.")
        taken[target] = flag
        if target.exists() and not overwrite:
            raise GhostprojError(f"{flag} {path} already exists; pass --overwrite to replace it.")


def check_output_dir(path, flag: str, inputs: list, replaced: bool = False) -> Path:
    """Refuse, before any work, an output directory that is an input, lies inside one, or
    (``replaced``: the command replaces the directory whole) holds one."""
    target = Path(path).expanduser().resolve()
    protected = _inputs(inputs)
    hit = _lands_on(target, protected)
    if hit is None:
        hit = next((inp for inp in protected if inp.path.is_relative_to(target)), None) if replaced else None
    if hit is not None:
        raise _refuse(flag, path, hit)
    run = next((d for d in target.parents if (d / MANIFEST).is_file()), None)
    if run is not None:
        raise GhostprojError(f"{flag} {path} lies inside the projection run {run}; write the output elsewhere so "
                             "the run stays as `project` wrote it.")
    return target
