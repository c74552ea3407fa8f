"""Parameter counts that are right for every method (tied weights counted once)."""

from __future__ import annotations


def _numel(param) -> int:
    n = param.numel()
    # bitsandbytes packs two 4-bit values per byte: the stored tensor holds half the logical count
    if param.__class__.__name__ == "Params4bit":
        n *= 2
    return n


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    seen = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = _numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
