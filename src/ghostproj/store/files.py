"""Atomic files: write to a temporary name, fsync, rename; sweep the temporaries of killed
writers on this host."""

from __future__ import annotations

import os
from pathlib import Path

TMP_MARK = ".tmp-"


def host_name() -> str:
    import socket

    return socket.gethostname()


def sweep_stale_temporaries(run_dir: Path) -> list[Path]:
    """Remove temporary files left by writers on this host that were killed mid-write.
    A temporary name carries its writer's host and pid, so a live writer's file (or one
    from another host sharing the filesystem) is never touched."""
    removed = []
    prefix = TMP_MARK + host_name() + "-"
    for path in run_dir.glob(".*" + TMP_MARK + "*"):
        cut = path.name.rfind(prefix)
        pid = path.name[cut + len(prefix):] if cut >= 0 else ""
        if pid.isdigit() and not pid_alive(int(pid)):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed


def atomic_write(path: Path, data: bytes | list) -> None:
    """Write to a temporary name, flush and fsync, then rename: a reader (or a resumed run)
    sees the old file or the new one, never a partial one. ``data`` may be an iterable of
    buffers, written one after the other (no joined copy of a large file; a generator
    keeps only one of them in memory at a time)."""
    tmp = path.with_name(f".{path.name}{TMP_MARK}{host_name()}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.writelines([data] if isinstance(data, (bytes, bytearray, memoryview)) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
