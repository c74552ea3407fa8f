"""The two benchmark phases by turns: both processes live at once, and only one of them runs at a time.

A shared machine's speed drifts over tens of seconds (the 2-core VMs this was measured on: the same fast phase
at 158-216 useful tok/s in five runs of the same code). Run one phase after the other and a slow spell falls on
one of them only, moving the speedup by its whole size; by turns of one optimizer step each, both phases meet
the same spells. Each phase keeps its own process, so its peak memory is still its own.

The protocol, one pipe pair per phase: the phase writes a byte on `done` when it is ready (imports made) and at
the end of each step, then waits for a byte on `go`; the parent hands one turn at a time, baseline and fast in
alternation. A phase that exits closes `done` (end of file), and the other one then has every turn.
"""

from __future__ import annotations

import os
import subprocess

from ..log import log


class Turns:
    """A phase's side: wait for the turn, hand it back. Between `take` and `give` nothing else runs."""

    def __init__(self, fds: str):
        self.go, self.done = (int(fd) for fd in fds.split(","))

    def take(self) -> None:
        if not os.read(self.go, 1):  # the parent is gone: nothing will be measured against this phase
            raise SystemExit("bench: the benchmark stopped")

    def give(self) -> None:
        os.write(self.done, b".")

    def pass_turn(self) -> None:
        """Hand the turn back (or, at the start, say the phase is ready), then wait for the next one."""
        self.give()
        self.take()


class Phase:
    """The parent's handle on one phase process started with a pipe pair."""

    def __init__(self, name: str, cmd: list[str]):
        go_read, self.go = os.pipe()
        self.done, done_write = os.pipe()
        self.name = name
        self.proc = subprocess.Popen(
            [*cmd, "--turns", f"{go_read},{done_write}"], pass_fds=(go_read, done_write), stdout=2, stderr=2
        )
        os.close(go_read)
        os.close(done_write)
        self.turns = 0

    def wait_turn_end(self) -> bool:
        """Block until the phase hands the turn back; False when it exited instead."""
        return bool(os.read(self.done, 1))

    def give_turn(self) -> None:
        self.turns += 1
        os.write(self.go, b".")

    def close(self) -> int:
        for fd in (self.go, self.done):
            os.close(fd)
        return self.proc.wait()


def run_by_turns(commands: dict[str, list[str]]) -> None:
    """Run the phases' commands by turns, in the order given. A phase that fails stops the others at once."""
    phases = [Phase(name, cmd) for name, cmd in commands.items()]
    try:
        running = list(phases)
        for phase in phases:  # each one ready (its imports made) before any is timed
            if not phase.wait_turn_end():
                _exited(phase, running)
        while running:
            for phase in list(running):
                phase.give_turn()
                if not phase.wait_turn_end():
                    _exited(phase, running)
        log("bench: the phases ran by turns: " + ", ".join(f"{p.name} {p.turns}" for p in phases))
    except BaseException:
        for p in phases:
            p.proc.kill()
        raise
    finally:
        for p in phases:
            p.close()


def run_one_after_another(commands: dict[str, list[str]]) -> None:
    """Run the phases' commands one after the other, in the order given, with no turns."""
    for name, cmd in commands.items():
        log(f"bench: {name} phase ...")
        check_exit(name, subprocess.run(cmd, stdout=2, stderr=2).returncode)


def check_exit(name: str, code: int) -> None:
    if code != 0:
        raise RuntimeError(f"the {name} phase failed (exit {code}); see its output above")


def _exited(phase: Phase, running: list[Phase]) -> None:
    check_exit(phase.name, phase.proc.wait())
    running.remove(phase)
