"""Out of memory during a step: recognise it on any device, and say what to change."""

from __future__ import annotations

import torch


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a RuntimeError) / MemoryError."""
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


def oom_advice(cfg, micro_batch: int) -> str:
    t = cfg.train
    if micro_batch > 1:
        half = micro_batch // 2
        fixes = [
            f"train.batch_size={half} train.grad_accum={-(-t.batch_size * t.grad_accum // half)} (same effective batch)"
        ]
    else:
        fixes = [f"a lower data.max_length (now {cfg.data.max_length})"]
    if not t.gradient_checkpointing:
        fixes.append("train.gradient_checkpointing=true")
    if cfg.method != "qlora":
        fixes.append("method=qlora (4-bit base)")
    if micro_batch > 1 and not t.auto_batch_size:
        fixes.append("train.auto_batch_size=true (halves the micro-batch on out-of-memory)")
    return (
        f"out of memory with a micro-batch of {micro_batch} (rows of up to {cfg.data.max_length} tokens); try "
        + ", or ".join(fixes)
    )
