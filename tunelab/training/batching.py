"""Which examples make each optimizer step, and how a step's examples become micro-batches.

Data order is a pure function of (seed, epoch), so a resumed run sees exactly the same steps. The
loss is normalised by the loss-token count of the whole step, so how a step's examples are laid out
in micro-batches (padded, sorted by length, or packed several to a row) does not change the
gradient, only the speed.
"""

from __future__ import annotations

import torch

from ..data.collate import pack_rows, packed_batch, pad_batch, varlen_batch
from ..errors import ConfigError

MEGABATCH = 50  # group_by_length: steps whose examples are sorted together (as in HF's length sampler)


def epoch_windows(lengths: list[int], cfg, epoch: int, world: int = 1) -> list[list[int]]:
    """This epoch's optimizer steps, each a list of example indices (batch_size x grad_accum x processes)."""
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    step = cfg.train.batch_size * cfg.train.grad_accum * world
    if cfg.train.group_by_length and not cfg.train.packing:
        span = step * MEGABATCH
        order = [i for s in range(0, len(order), span) for i in sorted(order[s : s + span], key=lambda i: -lengths[i])]
        windows = [order[i : i + step] for i in range(0, len(order), step)]
        # the longest step first: an out-of-memory error shows up at once, not hours in
        perm = torch.randperm(len(windows), generator=g).tolist()
        return [windows[0]] + [windows[i] for i in perm if i != 0]
    return [order[i : i + step] for i in range(0, len(order), step)]


def packing_layout(model):
    """How a packed micro-batch is laid out for this model's attention backend:
    "varlen" (sdpa): one row, attention per example (tunelab.attention), no padding, no mask;
    a float dtype (eager): rows with an additive block-diagonal mask;
    "flash": one row, flash-attention's varlen kernel cuts at the boundaries itself."""
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if impl == "sdpa":
        return "varlen"
    if impl == "eager":
        return model.dtype if model.dtype.is_floating_point else torch.float32
    if impl.startswith("flash_attention"):
        return "flash"
    raise ConfigError(
        f"train.packing: attention implementation '{impl}' is not supported (sdpa, eager, flash_attention_*); "
        "set train.packing: false"
    )


def step_groups(examples: list[dict], batch_size: int, packing: bool, capacity: int) -> list[list[int]]:
    """Which of `examples` (by position) each micro-batch of step_batches holds, in the order their tokens
    appear in it (row by row)."""
    if packing:
        rows = pack_rows([len(e["input_ids"]) for e in examples], capacity)
        return [[i for row in rows[g : g + batch_size] for i in row] for g in range(0, len(rows), batch_size)]
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def step_batches(
    examples: list[dict], batch_size: int, pad_id: int, packing: bool, capacity: int, layout=None
) -> list[dict]:
    """Micro-batches for one step's examples, each at most batch_size x capacity tokens.

    Packed: examples go first-fit decreasing into rows of at most `capacity` tokens; batch_size rows
    make a micro-batch (one unpadded row for "varlen"/"flash", padded rows with a block-diagonal mask
    otherwise). Padded: sorted by length first, so each micro-batch pads to a similar length."""
    if packing:
        rows = pack_rows([len(e["input_ids"]) for e in examples], capacity)
        groups = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        if layout in ("varlen", "flash"):
            return [varlen_batch([examples[i] for row in group for i in row]) for group in groups]
        return [packed_batch(examples, group, pad_id, layout) for group in groups]
    return [
        pad_batch([examples[i] for i in group], pad_id) for group in step_groups(examples, batch_size, False, capacity)
    ]
