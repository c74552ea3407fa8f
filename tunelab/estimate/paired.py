"""The two shallow copies' step times, taken in one process by turns: a step of one copy, then the same data
window on the other (the order flipped each pair), by the run's own Trainer (a preference run's for answer pairs).

Why in turns: on a shared 2-core machine the second core's speed moves by tens of percent for seconds at a
time (seen: a 2-thread step of smollm2 LoRA at 2 x 64 read 0.49 s for 5 steps, then 0.30 s for 30; one thread
held 0.44 s +-4%). Copies timed one after the other, each in its own process, met different phases, and the
estimate multiplies their difference by (layers - lo) / (hi - lo): one cell read -47% in one calibration and
+33% in the next. A pair of steps taken back to back meets one phase, so their difference keeps only the
blocks' cost. Timed until both copies' steps add up to MIN_SECONDS (MIN_PAIRS to MAX_PAIRS pairs), so a
fast step is timed over more than one phase too.

    python -m tunelab.estimate.paired LO.yaml HI.yaml   # prints {"lo": [...], "hi": [...]} (seconds per step)
"""

from __future__ import annotations

import itertools
import json
import sys

WARMUP = 2  # steps of each copy before timing: the kernels' first calls, the allocator's growth
MIN_PAIRS, MAX_PAIRS = 4, 48
MIN_SECONDS = 8.0  # both copies' timed steps together


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


def paired_steps(lo_path: str, hi_path: str) -> dict:
    """{'lo': [...], 'hi': [...]}: the seconds of each timed step, pair i on the same data window."""
    from ..config import load_config
    from ..training.loop import trainer_for

    configs = [load_config(path) for path in (lo_path, hi_path)]
    trainers = [trainer_for(cfg)(cfg, progress=False) for cfg in configs]
    try:
        windows = run_windows(trainers[0])
        times: dict[str, list[float]] = {"lo": [], "hi": []}
        for pair in range(WARMUP + MAX_PAIRS):
            window = next(windows)
            order = (0, 1) if pair % 2 == 0 else (1, 0)  # neither copy always runs second
            seconds = {i: _timed_step(trainers[i], window) for i in order}
            if pair < WARMUP:
                continue
            times["lo"].append(seconds[0])
            times["hi"].append(seconds[1])
            if len(times["lo"]) >= MIN_PAIRS and sum(times["lo"]) + sum(times["hi"]) >= MIN_SECONDS:
                break
        return times
    finally:
        for trainer in trainers:
            trainer.close("FINISHED")


if __name__ == "__main__":
    print(json.dumps(paired_steps(sys.argv[1], sys.argv[2])))
