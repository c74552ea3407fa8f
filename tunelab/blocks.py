"""Whole-block surgery on transformers models: a shallower copy that keeps some of the blocks."""

from __future__ import annotations

import copy

from .errors import ConfigError
from .methods.full import transformer_blocks


def keep_blocks(model, indices: list[int]):
    """A copy of `model` with only the blocks at `indices` (in that order), their weights copied; the input
    model is unchanged. `config.num_hidden_layers` (and a per-layer `layer_types`) follow, and every module
    of a kept block that carries a `layer_idx` (the attention) is renumbered, so the KV cache of generation
    stores block i at slot i."""
    _, blocks = transformer_blocks(model)
    n = len(blocks)
    if not indices:
        raise ConfigError("keep_blocks: keep at least one block")
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise ConfigError(f"keep_blocks: block(s) {bad} out of range (the model has {n} blocks)")
    if len(set(indices)) != len(indices):
        raise ConfigError(f"keep_blocks: block indices repeat: {indices}")
    kept_ids = {id(blocks[i]) for i in indices}
    # copy everything but the dropped blocks (a 30-block model pruned to 15 never holds 45 blocks)
    memo = {id(b): None for b in blocks if id(b) not in kept_ids}
    student = copy.deepcopy(model, memo)
    _, student_blocks = transformer_blocks(student)
    kept = [student_blocks[i] for i in indices]
    student_blocks._modules.clear()
    for new_index, block in enumerate(kept):
        student_blocks.add_module(str(new_index), block)
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    for config in {id(m.config): m.config for m in student.modules() if hasattr(m, "config")}.values():
        if getattr(config, "num_hidden_layers", None) == n:
            config.num_hidden_layers = len(indices)
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list) and len(layer_types) == n:
            config.layer_types = [layer_types[i] for i in indices]
    return student


def every_kth(n_blocks: int, k: int) -> list[int]:
    """Block indices 0, k, 2k, ... below n_blocks (k=2 of 30 blocks: 15 blocks)."""
    return list(range(0, n_blocks, k))
