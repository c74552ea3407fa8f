"""Per-step measurements shared by both phases: wall time, loss, useful tokens and batch slots.

A step's time runs from the end of the previous step to the end of this one, so whatever a trainer
does between steps (collating, logging) is charged to it; the first step is timed from its own start.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass, field

from ..log import log

FINAL_LOSS_STEPS = 3  # the "final loss" is the mean of the last few step losses


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

    def mark_train_start(self) -> None:
        from ..device import peak_memory, pick_device

        self.peak_before_train = peak_memory(pick_device())

    def begin(self) -> None:
        if self._last_end is None:
            self._last_end, self._last_cpu = time.perf_counter(), cpu_seconds()
        self._current = {"loss": 0.0, "useful_tokens": 0, "slots": 0, "packed": False}

    def add_micro(self, loss: float = 0.0, useful: int = 0, slots: int = 0, packed: bool = False) -> None:
        if self._current is None:
            self.begin()
        c = self._current
        c["loss"] += loss
        c["useful_tokens"] += useful
        c["slots"] += slots
        c["packed"] = c["packed"] or packed

    def end(self, **extra) -> None:
        now, cpu = time.perf_counter(), cpu_seconds()
        record = (self._current or {}) | extra | {"seconds": now - self._last_end, "cpu_seconds": cpu - self._last_cpu}
        self._last_end, self._last_cpu, self._current = now, cpu, None
        self.steps.append(record)
        rate = record["useful_tokens"] / record["seconds"] if record["seconds"] > 0 else 0.0
        log(
            f"[{self.phase}] step {len(self.steps)}/{self.total_steps}  loss {record['loss']:.4f}  "
            f"{record['seconds']:.2f} s  {rate:.0f} useful tok/s"
        )

    def summary(self, warmup_steps: int, threads: int) -> dict:
        """Throughput and step times over the steps after the warm-up; losses over all steps."""
        timed = self.steps[warmup_steps:] or self.steps
        seconds = [s["seconds"] for s in timed]
        useful_timed = sum(s["useful_tokens"] for s in timed)
        useful_all = sum(s["useful_tokens"] for s in self.steps)
        slots_all = sum(s["slots"] for s in self.steps)
        losses = [s["loss"] for s in self.steps]
        return {
            "steps": len(self.steps),
            "warmup_steps": len(self.steps) - len(timed),
            "timed_steps": len(timed),
            "timed_seconds": sum(seconds),
            "useful_tokens": useful_all,
            "useful_tokens_timed": useful_timed,
            "useful_tokens_per_s": useful_timed / sum(seconds) if sum(seconds) > 0 else 0.0,
            "step_time_s": {
                "mean": statistics.fmean(seconds),
                "median": statistics.median(seconds),
                "min": min(seconds),
                "max": max(seconds),
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
            "step_useful_tokens": [s["useful_tokens"] for s in self.steps],
        }


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def adapter_checksum(model) -> float:
    """A fingerprint of the LoRA weights (sum of |w|), to check both phases start from the same adapter."""
    return float(sum(p.detach().double().abs().sum() for n, p in model.named_parameters() if "lora_" in n))
