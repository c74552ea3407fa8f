"""The two shallow copies' step times, taken in one process by turns: a step of one copy, then the same data
window on the other (the order flipped each pair), by the run's own Trainer (a preference run's for answer pairs).

Why in turns: on a shared 2-core machine the second core's speed moves by tens of percent for seconds at a
time (seen: a 2-thread step of smollm2 LoRA at 2 x 64 read 0.49 s for 5 steps, then 0.30 s for 30; one thread
held 0.44 s +-4%). Copies timed one after the other, each in its own process, met different phases, and the
estimate multiplies their difference by (layers - lo) / (hi - lo): one cell read -47% in one calibration and
+33% in the next. A pair of steps taken back to back meets one phase, so their difference keeps only the
blocks' cost. Timed until both copies' steps add up to MIN_SECONDS (MIN_PAIRS to MAX_PAIRS pairs), so a
fast step is timed over more than one phase too.

A turn of a short step is a burst of several steps of one copy on the same windows as the other copy's turn,
and its first step is not timed: a copy small enough to live in the CPU's caches finds them filled by the
other copy's step (tiny-llama at 2 x 64 read 7-9% slower stepped by turns than alone, where the real run
steps one model only).

    python -m tunelab.estimate.paired LO.yaml HI.yaml   # prints {"lo": [...], "hi": [...]} (seconds per step)
"""

from __future__ import annotations

import itertools
import json
import sys

# pairs before timing: the kernels' first calls, the allocator's growth. A full fine-tuning of smollm2's 16-block
# copy at 4 x 256 took its 3rd and 4th steps 10-20% slower than its later ones (the extrapolated step +22-39%)
WARMUP = 3
MIN_PAIRS, MAX_PAIRS = 8, 48
MIN_SECONDS = 8.0  # both copies' steps together
BURST_SECONDS = 0.25  # a turn of short steps: as many steps as fill this (its first one warms the caches)
MAX_BURST = 16


def run_windows(trainer):
    """The run's step windows in its own order, epoch after epoch (as Trainer.run takes them)."""
    from ..training.batching import epoch_windows

    for epoch in itertools.count():
        yield from epoch_windows(trainer.lengths, trainer.cfg, epoch, trainer.dist.world)


def _timed_step(trainer, window) -> float:
    """One step as Trainer.run takes it: timed, counted, and its record written every log_every steps (the
    trackers' writes, TensorBoard's writer thread among them, overlap the next step there as here)."""
    loss, grad_norm, tokens, seconds = trainer.timed_step(window)
    trainer.state["step"] += 1  # what a method's per-step schedule reads (AdaLoRA's budget)
    trainer.state["tokens"] += tokens
    if trainer.metrics is not None and trainer.state["step"] % trainer.cfg.train.log_every == 0:
        trainer.metrics.write(trainer.step_record(loss, grad_norm, tokens, seconds))
    return seconds


def burst_length(step_s: float) -> int:
    """Steps in a turn, for steps of `step_s` seconds: 1 where fewer than 3 fill BURST_SECONDS (a step that long
    outlasts refilling the caches many times over), else as many as fill it, up to MAX_BURST."""
    fill = BURST_SECONDS / max(step_s, 1e-9)
    return 1 if fill < 3 else min(MAX_BURST, int(fill))


def _turn(trainer, windows) -> tuple[float, float]:
    """(seconds per step, seconds spent): one step, or a burst's mean step after its first."""
    seconds = [_timed_step(trainer, window) for window in windows]
    timed = seconds[1:] or seconds
    return sum(timed) / len(timed), sum(seconds)


def paired_steps(lo_path: str, hi_path: str) -> dict:
    """{'lo': [...], 'hi': [...]}: the seconds per step of each timed pair of turns, both on the same data windows."""
    from ..config import load_config
    from ..device import return_freed_memory
    from ..training.loop import trainer_for

    configs = [load_config(path) for path in (lo_path, hi_path)]
    trainers = [trainer_for(cfg)(cfg, progress=False) for cfg in configs]
    return_freed_memory()
    trainers[0].keep_step_memory()  # as Trainer.run does: the copies' steps keep their freed memory where the run's do
    try:
        windows = run_windows(trainers[0])
        times: dict[str, list[float]] = {"lo": [], "hi": []}
        burst, spent = 1, 0.0
        for pair in range(WARMUP + MAX_PAIRS):
            turn = [next(windows) for _ in range(burst)]
            order = (0, 1) if pair % 2 == 0 else (1, 0)  # neither copy always runs second
            seconds = {i: _turn(trainers[i], turn) for i in order}
            if pair < WARMUP:
                burst = burst_length(seconds[0][0]) if pair == WARMUP - 1 else 1
                continue
            times["lo"].append(seconds[0][0])
            times["hi"].append(seconds[1][0])
            spent += seconds[0][1] + seconds[1][1]
            if len(times["lo"]) >= MIN_PAIRS and spent >= MIN_SECONDS:
                break
        return times
    finally:
        for trainer in trainers:
            trainer.close("FINISHED")


if __name__ == "__main__":
    print(json.dumps(paired_steps(sys.argv[1], sys.argv[2])))
