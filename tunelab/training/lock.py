"""One trainer per run folder: an exclusive `flock` on RUN/.lock, held while a process trains there.

The kernel drops the lock when the process ends (kill -9 included), so a stale lock never blocks a
resume. Being locked is also how `tunelab runs` tells a running run from an interrupted one.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from ..errors import UserError

LOCK_FILE = ".lock"


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.file = None

    def acquire(self) -> RunLock:
        try:
            file = open(self.path, "a+", encoding="utf-8")
        except OSError as exc:
            raise UserError(f"{self.path}: cannot create the run's lock file: {exc.strerror or exc}") from None
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            file.close()
            raise UserError(
                f"{self.path.parent}: another tunelab process (pid {holder}) is training this run; "
                "wait for it to finish or stop it (SIGTERM checkpoints it) before resuming"
            ) from None
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        self.file = file
        return self

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the descriptor drops the flock
            self.file = None


def is_locked(run_dir: Path) -> bool:
    """True while some process holds the run's lock (it is training)."""
    path = Path(run_dir) / LOCK_FILE
    try:
        with open(path, "rb") as file:
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(file.fileno(), fcntl.LOCK_UN)
            return False
    except OSError:
        return False


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Temporary files and folders an interrupted atomic write left behind (checkpoints/.step-N.*,
    .adapter.*, .name.*.tmp). Only called under the run's lock, so no live writer owns them."""
    run_dir = Path(run_dir)
    found = [p for p in run_dir.glob(".*") if p.name != LOCK_FILE and (p.is_dir() or p.name.endswith(".tmp"))]
    found += list((run_dir / "checkpoints").glob(".step-*"))
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found
