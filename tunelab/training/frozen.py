"""The frozen base stored at the compute precision, the trainable weights as fp32 masters.

Under bf16 autocast every matmul casts its fp32 weight to bf16, and autocast caches only the casts of
weights that require grad: a frozen fp32 base is cast again on every forward (and held twice while a
step's activations live). Storing the frozen linear weights in bf16 once gives the same matmuls (autocast
would round them to the same bf16 values) without the casts and at half the bytes. Embeddings (a tied one
is also the LM head: the fused loss keeps one bf16 copy of it) and norm weights stay fp32, so the residual
stream and the normalisations stay fp32 as before: the forward is the autocast forward, value for value.

A LoRA layer's sum stays fp32 (`lora_sums_in_fp32`): peft adds the adapter's output to the base output and
casts the sum to the base output's dtype, bf16 under autocast, so the small update an adapter makes in its
first steps was rounded to the base output's bf16 step (2^-8 of it): a bf16 run's training loss drifted 6%
from fp32's within the bench's 5 steps. With the sum in fp32 it stays within 0.5% (README, issue #13).
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


def _to_fp32(module, args, output):
    return output.float()


def lora_sums_in_fp32(model: nn.Module) -> int:
    """Make the base layer of every peft LoRA layer return fp32 (a forward hook), so that peft adds the
    adapter's output to it and keeps the sum in fp32 (the layer's output is then fp32, as the residual stream
    is); returns how many layers. Also where the base is fp32 under autocast: its matmul output is bf16."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        layer.get_base_layer().register_forward_hook(_to_fp32)
    return len(layers)
