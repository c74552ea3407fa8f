"""`train.compile`: torch.compile on each decoder block (regional compilation).

Compiling the blocks rather than the whole model keeps the compile time to one block's (the blocks share
their code, so dynamo compiles it once and reuses it), and leaves the parts that change shape or run
Python per batch (the packed-row attention cuts rows at example boundaries, the chunked loss) eager:
they break the graph either way. Shapes are dynamic (every packed batch has its own length).
"""

from __future__ import annotations

import torch
from torch import nn

from ..log import log


def resolve_compile(setting, device: torch.device) -> bool:
    """auto: on CUDA only (on a 2-core AMX CPU, compiling smollm2's blocks took about 40 s and gained nothing
    measurable in the bench's steps: README, issue #13)."""
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


def decoder_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The model's list of decoder blocks (a peft model's base's), or None."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    blocks = getattr(decoder, "layers", None)
    return blocks if isinstance(blocks, nn.ModuleList) and len(blocks) else None


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """Compile every decoder block in place; returns how many (0: no block list found, nothing compiled)."""
    blocks = decoder_blocks(model)
    if blocks is None:
        log("note: train.compile: no decoder block list found in this model; it runs uncompiled")
        return 0
    for block in blocks:
        block.compile(backend=backend, dynamic=True)
    return len(blocks)
