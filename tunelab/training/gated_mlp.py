"""A gated MLP's SiLU(gate) x up without saving SiLU's output (after Liger's fused SwiGLU).

Autograd keeps three (tokens x intermediate) tensors per llama-style MLP for backward: gate_proj's output (for
SiLU), SiLU's output and up_proj's output (for their product). SiLU's output is one elementwise op away from
the gate, so `SiLUMul` saves the gate and up only and recomputes it in backward: a third of those tensors, the
largest a block saves (fp32 under autocast when gate and up carry LoRA adapters: their sums are fp32). The same
ops as autograd's, so the same values forward and backward, bit for bit (tests/test_fast_paths.py).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from .source_match import same_code


class SiLUMul(torch.autograd.Function):
    """silu(gate) * up, saving gate and up: backward recomputes silu(gate) and takes SiLU's own backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:  # as MulBackward then SiluBackward: grad * up, through SiLU
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        if ctx.needs_input_grad[1]:  # autograd casts it to up's dtype, as MulBackward does
            grad_up = grad * F.silu(gate)
        return grad_gate, grad_up


def _silu_mul_forward(self, x):
    return self.down_proj(SiLUMul.apply(self.gate_proj(x), self.up_proj(x)))


def _is_silu(act) -> bool:
    from transformers.activations import SiLUActivation

    return type(act) in (nn.SiLU, SiLUActivation)


# llama's gated MLP forward, in the two forms transformers has written it
_GATED_FORWARDS = (
    """
def forward(self, x):
    return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
""",
    """
def forward(self, x):
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj
""",
)


def fuse_gated_mlps(model: nn.Module) -> int:
    """Give every gated MLP whose forward is llama's, with a SiLU activation (Llama, Qwen2, Mistral...), the
    forward down_proj(SiLUMul(gate_proj(x), up_proj(x))); returns how many. Only the module's own forward
    changes: its submodules (adapters, hooks, quantized layers) are called as before."""
    fused = 0
    for module in model.modules():
        if same_code(type(module).forward, *_GATED_FORWARDS) and _is_silu(getattr(module, "act_fn", None)):
            module.forward = types.MethodType(_silu_mul_forward, module)
            fused += 1
    return fused
