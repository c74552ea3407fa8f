"""One voice for progress and notes: lines on stderr, from rank 0 only in a multi-process run."""

import os
import sys


def is_rank0() -> bool:
    """True in a single process and on rank 0 of a launched group (read from the launcher's environment)."""
    return os.environ.get("RANK", "0") == "0"


def log(msg: str) -> None:
    if is_rank0():
        print(msg, file=sys.stderr, flush=True)


_warned: set[str] = set()


def warn(message: str) -> None:
    """One `warning:` line on stderr, once per process for the same message."""
    if message not in _warned and is_rank0():
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)
