"""Per-step measurements shared by both phases: wall time, loss, useful tokens and batch slots, and where
the time went (forward, backward, optimizer; the rest is data: collating, moving, logging).

A step's time runs from the end of the previous step to the end of this one, so whatever a trainer
does between steps (collating, logging) is charged to it; the first step is timed from its own start.
With a profile path, one step (the last) runs under torch.profiler and its table is written there; that
step is left out of the timing (the profiler slows it).
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import time
from dataclasses import dataclass, field

import torch

from ..io import atomic_write_text
from ..log import log
from .turns import Turns

FINAL_LOSS_STEPS = 3  # the "final loss" is the mean of the last few step losses
SECTIONS = ("forward", "backward", "optimizer")  # timed inside a step; "data" is the rest of it
PROFILE_ROWS = 40


@dataclass
class StepLog:
    phase: str
    total_steps: int
    steps: list = field(default_factory=list)
    notes: dict = field(default_factory=dict)
    init_checksum: float | None = None
    peak_before_train: tuple | None = None
    _last_end: float | None = None
    _last_cpu: float = 0.0
    _current: dict | None = None
    profile_path: str | None = None  # write a torch.profiler table of the last step here
    turns: Turns | None = None  # hand the turn to the other phase after each step
    _profiler: object = None
    micro_end: float = (
        0.0  # when the last micro-batch of the current step finished (the baseline times its optimizer from here)
    )

    def add_time(self, name: str, seconds: float) -> None:
        if self._current is None:
            self.begin()
        times = self._current["times"]
        times[name] = times.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def section(self, name: str):
        """Time a part of the current step (forward, backward, optimizer); parts of micro-batches add up."""
        if self._current is None:
            self.begin()
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.add_time(name, time.perf_counter() - t0)

    def mark_train_start(self) -> None:
        from ..device import peak_memory, pick_device

        self.peak_before_train = peak_memory(pick_device())

    def begin(self) -> None:
        if self._last_end is None:
            self._last_end, self._last_cpu = time.perf_counter(), cpu_seconds()
        self._current = {"loss": 0.0, "useful_tokens": 0, "slots": 0, "packed": False, "times": {}}
        if self.profile_path and len(self.steps) == self.total_steps - 1:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._profiler = profile(activities=activities)
            self._profiler.__enter__()

    def add_micro(self, loss: float = 0.0, useful: int = 0, slots: int = 0, packed: bool = False) -> None:
        if self._current is None:
            self.begin()
        c = self._current
        c["loss"] += loss
        c["useful_tokens"] += useful
        c["slots"] += slots
        c["packed"] = c["packed"] or packed

    def end(self, **extra) -> None:
        if torch.cuda.is_available():  # the step's kernels done before its time is taken (and its turn given)
            torch.cuda.synchronize()
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            table = self._profiler.key_averages().table(sort_by=sort, row_limit=PROFILE_ROWS)
            atomic_write_text(self.profile_path, f"{self.phase} phase, step {len(self.steps) + 1}\n{table}\n")
            self._profiler, extra = None, extra | {"profiled": True}
        now, cpu = time.perf_counter(), cpu_seconds()
        record = (self._current or {}) | extra
        # span: perf_counter is CLOCK_MONOTONIC on Linux, so the phases' spans compare across processes
        record |= {"seconds": now - self._last_end, "cpu_seconds": cpu - self._last_cpu, "span": (self._last_end, now)}
        times = record.setdefault("times", {})
        times["data"] = max(0.0, record["seconds"] - sum(times.get(k, 0.0) for k in SECTIONS))
        self._last_end, self._last_cpu, self._current = now, cpu, None
        self.steps.append(record)
        rate = record["useful_tokens"] / record["seconds"] if record["seconds"] > 0 else 0.0
        log(
            f"[{self.phase}] step {len(self.steps)}/{self.total_steps}  loss {record['loss']:.4f}  "
            f"{record['seconds']:.2f} s  {rate:.0f} useful tok/s"
        )
        if self.turns is not None:  # the other phase's step; this one's next step is timed from its turn
            self.turns.pass_turn()
            self._last_end, self._last_cpu = time.perf_counter(), cpu_seconds()

    def summary(self, warmup_steps: int, threads: int) -> dict:
        """Throughput and step times over the steps after the warm-up (and not profiled); losses over all steps."""
        timed = [s for s in self.steps[warmup_steps:] if not s.get("profiled")] or self.steps
        seconds = [s["seconds"] for s in timed]
        useful_timed = sum(s["useful_tokens"] for s in timed)
        useful_all = sum(s["useful_tokens"] for s in self.steps)
        slots_all = sum(s["slots"] for s in self.steps)
        losses = [s["loss"] for s in self.steps]
        return {
            "steps": len(self.steps),
            "warmup_steps": min(warmup_steps, len(self.steps)),
            "profiled_steps": sum(1 for s in self.steps if s.get("profiled")),
            "timed_steps": len(timed),
            "timed_seconds": sum(seconds),
            "useful_tokens": useful_all,
            "useful_tokens_timed": useful_timed,
            "useful_tokens_per_s": useful_timed / sum(seconds) if sum(seconds) > 0 else 0.0,
            # per CPU second this process got: steadier than wall time when other processes share the cores
            "useful_tokens_per_cpu_s": useful_timed / cpu_timed
            if (cpu_timed := sum(s["cpu_seconds"] for s in timed)) > 0
            else 0.0,
            # the warm-up steps hold one-off costs (first calls; with train.compile, the compile time): reported
            # apart, and the throughput over every unprofiled step including them, for a run this long
            "warmup_seconds": sum(s["seconds"] for s in self.steps[:warmup_steps]),
            "useful_tokens_per_s_incl_warmup": _rate([s for s in self.steps if not s.get("profiled")]),
            "step_time_s": {
                "mean": statistics.fmean(seconds),
                "median": statistics.median(seconds),
                "min": min(seconds),
                "max": max(seconds),
            },
            # mean seconds per timed step in each part; data = the rest of the step (collation, host work)
            "step_breakdown_s": {
                k: statistics.fmean(s["times"].get(k, 0.0) for s in timed) for k in (*SECTIONS, "data")
            },
            # CPU time this process got per wall second and thread: well below the idle value means
            # other processes took the cores, and the step times are not this trainer's alone
            "cpu_utilisation": sum(s["cpu_seconds"] for s in timed) / (sum(seconds) * threads)
            if sum(seconds) > 0
            else None,
            # token positions the model ran on (rows x width): useful + padding
            "batch_slots": slots_all,
            "padding_fraction": 1.0 - useful_all / slots_all if slots_all else None,
            "packed_batches": any(s.get("packed") for s in self.steps),
            "step_losses": losses,
            "final_train_loss": statistics.fmean(losses[-FINAL_LOSS_STEPS:]),
            "step_seconds": [s["seconds"] for s in self.steps],
            "step_spans": [s["span"] for s in self.steps],
            "step_useful_tokens": [s["useful_tokens"] for s in self.steps],
        }


def _rate(steps: list[dict]) -> float:
    seconds = sum(s["seconds"] for s in steps)
    return sum(s["useful_tokens"] for s in steps) / seconds if seconds > 0 else 0.0


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def adapter_checksum(model) -> float:
    """A fingerprint of the LoRA weights (sum of |w|), to check both phases start from the same adapter."""
    return float(sum(p.detach().double().abs().sum() for n, p in model.named_parameters() if "lora_" in n))
