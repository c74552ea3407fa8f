"""Graceful stop on SIGTERM/SIGINT: finish the current step, checkpoint, exit with a resume hint.

A second signal while stopping restores the default handler's behaviour (immediate stop).
"""

from __future__ import annotations

import contextlib
import signal
import threading

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


class Interrupted(Exception):
    """Training stopped on a signal after writing a checkpoint."""

    def __init__(self, signal_name: str, run_dir, step: int):
        super().__init__(
            f"stopped by {signal_name} after step {step}; checkpoint written. "
            f"Resume with: tunelab train --resume {run_dir}"
        )
        self.signal_name, self.run_dir, self.step = signal_name, run_dir, step
        self.exit_code = EXIT_CODES.get(signal_name, 1)


class StopFlag:
    def __init__(self):
        self.signal_name = None


@contextlib.contextmanager
def stop_on_signals():
    """Yields a StopFlag whose `signal_name` is set when SIGTERM/SIGINT arrives (main thread only)."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.signal_name is not None:  # second signal: stop now
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        flag.signal_name = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
