"""One writer per run directory: a lock file holding pid and host, taken over when its
process is gone."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import GhostprojError
from .files import host_name, pid_alive, sweep_stale_temporaries


class RunLock:
    """One writer per run directory (per rank): a lock file holding pid and host. A lock
    whose process is gone (same host) is stale and taken over, so a crash never blocks a
    resume."""

    def __init__(self, run_dir: Path, rank: int | None = None, name: str = ".lock"):
        self.path = run_dir / (name if rank is None else f"{name}-r{rank:03d}")

    def acquire(self) -> "RunLock":
        me = f"{os.getpid()} {host_name()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.path.read_text(errors="replace").split() if self.path.exists() else []
                if len(holder) == 2 and holder[1] == host_name() and not pid_alive(int(holder[0])):
                    self.path.unlink(missing_ok=True)  # stale: its writer died
                    continue
                who = " ".join(holder) or "another process"
                raise GhostprojError(
                    f"{self.path.parent} is being written by process {who}; wait for it or remove {self.path} "
                    "if that process is gone."
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            sweep_stale_temporaries(self.path.parent)
            return self
        raise GhostprojError(f"Cannot take the lock {self.path}.")

    def release(self) -> None:
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
