"""A plain LoRA linear layer as one autograd function: base + scale * B(A(x)), the sum in fp32.

peft runs a LoRA layer as separate modules (base, lora_A, lora_B, a multiplication by the scale and an add),
and under bf16 autocast every one of them casts: the input for the base and for A, A's and B's weights, the
output to fp32 for the sum (`frozen.lora_sums_in_fp32`). A profile of a smollm2 LoRA step held about 22 casts
per layer and step and as many elementwise kernels. `LoraLinear` does the layer's work in a few kernels:

    y = linear(x_c, W) -> fp32;  y += scale * (x_c A^T) B^T  (addmm in fp32: the adapter's product is r wide)

with x_c the input at the compute precision (cast once for all the layers reading x: `frozen.InputCasts`).
The base matmul runs in the compute dtype, as before; the adapter's B product and the sum run in fp32 (peft
rounds the B product to bf16 first), so an adapter's small early updates reach the output unrounded. Backward:
the base's input gradient in the compute dtype, the adapter's three small products in fp32 except A's weight
gradient, which reads the saved x_c. It saves x_c (shared) and the r-wide A output, as peft's layers do. With
LoRA dropout the adapter reads x_c times a boolean mask (the 1 / (1 - p) goes into the scale), and the mask and
the masked x_c are saved instead: 3 bytes a feature under bf16 where peft keeps 7 (fp32 dropout output, mask, cast).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from .frozen import InputCasts


class LoraLinear(torch.autograd.Function):
    """x (.., in) -> linear(x_c, weight, bias) + scale * (dropout(x_c) @ A^T) @ B^T, returned in the adapter's
    precision (fp32 under autocast). x_c is x at the compute dtype (the same tensor when x already is),
    weight/bias frozen. Dropout (training only) keeps a boolean mask and folds its 1 / (1 - p) into the scale."""

    @staticmethod
    def forward(ctx, x, x_c, weight, bias, lora_a, lora_b, scale: float, dropout: float):
        compute = x_c.dtype
        acc = torch.promote_types(x.dtype, lora_b.dtype)  # the sum's precision: fp32 for fp32 adapters
        w = weight if weight.dtype == compute else weight.to(compute)
        b = bias if bias is None or bias.dtype == compute else bias.to(compute)
        out = F.linear(x_c, w, b)
        out = out.to(acc) if out.dtype != acc else out
        flat_in = x_c.reshape(-1, x_c.shape[-1])
        mask = None
        if dropout > 0:
            mask = torch.empty(flat_in.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - dropout)
            flat_in = flat_in * mask  # exact: a multiplication by 0 or 1
            scale = scale / (1.0 - dropout)
        down = (flat_in @ lora_a.to(compute).t()).to(acc)  # (tokens, r)
        out.view(-1, out.shape[-1]).addmm_(down, lora_b.to(acc).t(), alpha=scale)
        ctx.save_for_backward(flat_in, down, w, lora_a, lora_b, mask)
        ctx.scale, ctx.x_shape, ctx.x_dtype = scale, x.shape, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        flat_in, down, w, lora_a, lora_b, mask = ctx.saved_tensors
        scale, compute = ctx.scale, flat_in.dtype
        g = grad.reshape(-1, grad.shape[-1])
        # (down^T g)^T: the same product as g^T down, twice as fast in this layout (tokens is the inner dimension)
        grad_b = (down.t() @ g).mul_(scale).t().to(lora_b.dtype) if ctx.needs_input_grad[5] else None
        grad_down = (g @ lora_b.to(g.dtype)).mul_(scale)  # (tokens, r), in the sum's precision
        grad_a = None
        if ctx.needs_input_grad[4]:
            grad_a = (grad_down.to(compute).t() @ flat_in).to(lora_a.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (g.to(compute) @ w).to(g.dtype)
            if mask is None:
                grad_x.addmm_(grad_down, lora_a.to(g.dtype))
            else:
                grad_x.add_((grad_down @ lora_a.to(g.dtype)).mul_(mask))
            grad_x = grad_x.to(ctx.x_dtype).view(ctx.x_shape)
        return grad_x, None, None, None, grad_a, grad_b, None, None


def _plain_adapter(layer) -> str | None:
    """The adapter's name where `layer` is a peft LoRA Linear whose forward is vanilla LoRA on a plain frozen
    linear: one adapter, plain dropout or none, no DoRA or other variant, no bias on B, not merged; else None."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    if type(layer) is not PeftLinear or layer.merged or layer.disable_adapters:
        return None
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(adapters) != 1:
        return None
    name = adapters[0]
    base, a, b = layer.get_base_layer(), layer.lora_A[name], layer.lora_B[name]
    plain = (
        type(base) is nn.Linear
        and not base.weight.requires_grad
        and (base.bias is None or not base.bias.requires_grad)
        and type(layer.lora_dropout[name]) in (nn.Identity, nn.Dropout)
        and name not in getattr(layer, "lora_variant", {})
        and not layer.use_dora.get(name, False)
        and type(a) is nn.Linear
        and type(b) is nn.Linear
        and a.bias is None
        and b.bias is None
    )
    return name if plain else None


def _fused_forward(self, x, *args, **kwargs):
    name = self._tunelab_adapter
    plain = not (args or kwargs or self.disable_adapters or self.merged) and self.active_adapters == [name]
    if not (plain and x.is_floating_point()):  # another adapter switched on since, or mixed batches: peft's own
        return self._tunelab_peft_forward(x, *args, **kwargs)
    base = self.get_base_layer()
    kind = x.device.type
    compute = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
    x_c = self._tunelab_casts.get(x, compute)
    with torch.autocast(kind, enabled=False):  # the function casts by itself
        return LoraLinear.apply(
            x,
            x_c,
            base.weight,
            base.bias,
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            float(self.scaling[name]),
            _dropout_p(self.lora_dropout[name]),
        )


def _dropout_p(module) -> float:
    return float(module.p) if isinstance(module, nn.Dropout) and module.training else 0.0


def fuse_lora_layers(model: nn.Module) -> int:
    """Give every plain peft LoRA Linear (see `_plain_adapter`) the one-function forward; returns how many. The
    layers keep their modules and state dict (saving, merging and peft's own loading are untouched); a call with
    extra arguments (mixed-adapter batches) takes peft's forward."""
    casts = InputCasts()
    fused = 0
    for layer in model.modules():
        name = _plain_adapter(layer)
        if name is None:
            continue
        layer._tunelab_adapter = name
        layer._tunelab_casts = casts
        layer._tunelab_peft_forward = layer.forward
        layer.forward = types.MethodType(_fused_forward, layer)
        fused += 1
    return fused


def is_fused(layer) -> bool:
    return hasattr(layer, "_tunelab_peft_forward")
