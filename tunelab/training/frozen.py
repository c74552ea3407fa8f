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

import weakref

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

    from .fused_lora import is_fused

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and not is_fused(m)]
    for layer in layers:
        layer.get_base_layer().register_forward_hook(_to_fp32)
    return len(layers)


class _SharedCast(torch.autograd.Function):
    """Hands a consumer the low-precision copy `low` of `x` made once for all of them; each consumer's gradient
    is cast back to x's dtype on its own, so x's gradient is still summed in fp32, as with one autocast cast per
    consumer: the same values, forward and backward, with one forward cast instead of one per matmul."""

    @staticmethod
    def forward(ctx, x, low):
        ctx.dtype = x.dtype
        return low.view_as(low)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None


class InputCasts:
    """A one-entry cache of the last input cast: a block's q/k/v projections (and gate/up) and their adapters'
    A matrices read one tensor in a row. Keyed by identity, version and dtype (an in-place change misses); the
    input is held weakly, and only the last low-precision copy is kept (the matmuls' backward saves it anyway)."""

    def __init__(self):
        self.key, self.low = None, None

    def get(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x in `dtype`, without autograd history (x itself when it already is)."""
        if x.dtype == dtype:
            return x
        key = self.key
        if key is None or key[0]() is not x or key[1] != x._version or key[2] != dtype:
            with torch.no_grad():
                self.low = x.to(dtype)
            self.key = (weakref.ref(x), x._version, dtype)
        return self.low

    def pre_hook(self, module, args):
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or not torch.is_autocast_enabled(x.device.type):
            return None
        low = self.get(x, torch.get_autocast_dtype(x.device.type))
        return (_SharedCast.apply(x, low), *args[1:])


def shared_input_casts(model: nn.Module) -> int:
    """Under autocast, cast a LoRA layer's fp32 input to the compute dtype once for its plain-linear base and its
    A matrices, and for the layers after it reading the same tensor (autocast casts it for every matmul: six
    times for q/k/v with adapters); returns how many modules read the shared casts."""
    from peft.tuners.lora import LoraLayer

    from .fused_lora import is_fused

    casts = InputCasts()
    hooked = 0
    for layer in [m for m in model.modules() if isinstance(m, LoraLayer) and not is_fused(m)]:
        base = layer.get_base_layer()
        readers = [base] if type(base) is nn.Linear else []  # not a 4-bit base: autocast does not cast for it
        readers += [a for a in layer.lora_A.values() if type(a) is nn.Linear]
        for module in readers:
            module.register_forward_pre_hook(casts.pre_hook)
        hooked += len(readers)
    return hooked
