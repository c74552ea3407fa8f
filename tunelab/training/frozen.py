"""The frozen base stored at the compute precision, the trainable weights as fp32 masters.

Under bf16 autocast every matmul casts its fp32 weight to bf16, and autocast caches only the casts of
weights that require grad: a frozen fp32 base is cast again on every forward (and held twice while a
step's activations live). Storing the frozen linear weights in bf16 once gives the same matmuls (autocast
would round them to the same bf16 values) without the casts and at half the bytes. Embeddings (a tied one
is also the LM head: the fused loss keeps one bf16 copy of it) and norm weights stay fp32, so the residual
stream and the normalisations stay fp32 as before: the forward is the autocast forward, value for value.
"""

from __future__ import annotations

import torch
from torch import nn


def store_frozen_at(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast the frozen floating weights of the model's linear layers to `dtype`, in place; returns how
    many elements were cast. Quantized (integer) weights, trainable ones and embedding-tied ones stay."""
    tied = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    cast = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        for p in module.parameters(recurse=False):
            if p.requires_grad or not p.is_floating_point() or p.dtype == dtype or id(p) in tied:
                continue
            p.data = p.data.to(dtype)
            cast += p.numel()
    return cast
