"""Step time from the config's FLOPs and this machine's measured matmul speed at the run's precision.

FLOPs per token (forward): 2 x the blocks' linear weights, the attention scores (4 x hidden x the mean
attended length per block) and the LM head on the positions it runs on. Backward is one forward for
activation gradients plus 2 x the trainable weights (weight gradients; a full run: one more forward);
gradient checkpointing adds one forward. The achievable rate is `EFFICIENCY` x the best timed square
matmul (tunelab.bench.run.matmul_peak_flops, cached per machine): training runs smaller, thinner matmuls
than the probe, plus elementwise work. `--probe` measures real steps and reports the correction.
"""

from __future__ import annotations

from .cache import cached

EFFICIENCY = {"cpu": 0.45, "cuda": 0.5}  # model FLOP/s / matmul peak, typical of tunelab's loop (measured, README)


def matmul_rate(precision: str, device) -> float:
    from ..bench.run import matmul_peak_flops

    return cached(
        "matmul", f"{device.type}|{precision}", lambda: matmul_peak_flops(precision, device, 1024, 6), timing=True
    )


def step_flops(shape, counts, work, steps_tokens: int, full: bool, checkpointing: bool, head_positions: int) -> float:
    """FLOPs of one optimizer step that trains `steps_tokens` tokens (head_positions: LM-head rows per token)."""
    attn = 4 * shape.hidden * shape.layers * (work.seq_len / 2)  # causal: half the row on average
    forward = 2 * counts.block_linear + attn + 2 * shape.vocab * shape.hidden * head_positions
    backward = forward + (forward if full else 2 * counts.trainable)
    total = forward + backward + (forward if checkpointing else 0)
    return total * steps_tokens


def step_time(flops: float, precision: str, device) -> tuple[float, float]:
    """(seconds per step, the matmul rate used in FLOP/s)."""
    rate = matmul_rate(precision, device)
    return flops / (rate * EFFICIENCY.get(device.type, 0.5)), rate
