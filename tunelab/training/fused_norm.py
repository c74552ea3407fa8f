"""Llama-style RMSNorm as one autograd function (after Liger's RMSNorm).

transformers' RMSNorm runs as six autograd ops (cast, pow, mean, add, rsqrt, two multiplications), each with
its own backward, and when the weight trains (full fine-tuning) autograd keeps the normalised input besides the
input. `RMSNorm` computes the same forward, op for op, so the output is bit for bit the same, keeps the input
and the per-token 1/rms only, and takes the closed-form gradient:

    n = x * r,  r = 1 / sqrt(mean(x^2) + eps),  y = w * n
    dx = r * (dn - n * mean(dn * n)),  dn = dy * w,  dw = sum over tokens of dy * n

A smollm2 step has 61 of them. Alone, forward and backward at 867 x 576 took 0.75 ms against autograd's 1.05 ms;
in a bench step no change was measurable.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from .source_match import same_code


class RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        normed = x32 * rstd
        ctx.save_for_backward(x, rstd, weight)
        return weight * normed.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        normed = x.to(torch.float32) * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed).reshape(-1, normed.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_normed = (grad * weight).to(torch.float32)
            dot = (grad_normed * normed).mean(-1, keepdim=True)
            grad_x = grad_normed.sub_(normed.mul_(dot)).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


def _rms_norm_forward(self, hidden_states):
    return RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


_LLAMA_RMS_NORM = """
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)
"""


def fuse_rms_norms(model: nn.Module) -> int:
    """Give every llama-style RMSNorm the one-function forward; returns how many."""
    fused = 0
    for module in model.modules():
        if same_code(type(module).forward, _LLAMA_RMS_NORM) and isinstance(
            getattr(module, "weight", None), torch.Tensor
        ):
            module.forward = types.MethodType(_rms_norm_forward, module)
            fused += 1
    return fused
