"""Rotary position embedding as one autograd function per tensor, on halves instead of a rotated copy.

transformers' `apply_rotary_pos_emb` computes q * cos + rotate_half(q) * sin, where rotate_half slices q into
halves, negates one and concatenates them: five kernels on the whole tensor, and in backward each slice writes
its gradient into a zero-filled tensor of the whole size. `Rotary` writes each half of the output directly:

    out[:h] = q[:h] * cos[:h] - q[h:] * sin[:h],   out[h:] = q[h:] * cos[h:] + q[:h] * sin[h:]

(the same products and sums: equal to 1 ulp, a multiply-add may round once instead of twice), and its
backward is the transposed rotation, with cos and sin as the only saved tensors. A smollm2 LoRA step ran 6%
faster. It is swapped into the model's module only around a training step (`fused_rotary`), and only where
that module's `apply_rotary_pos_emb` and `rotate_half` are llama's code exactly.
"""

from __future__ import annotations

import contextlib
import sys

import torch

from .source_match import same_code

_APPLY = """
def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed
"""
_ROTATE_HALF = """
def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)
"""


class Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.dtype = x.dtype
        h = x.shape[-1] // 2
        shape, dtype = torch.broadcast_shapes(x.shape, cos.shape), torch.result_type(x, cos)
        out = torch.empty(shape, dtype=dtype, device=x.device)
        torch.mul(x[..., :h], cos[..., :h], out=out[..., :h]).addcmul_(x[..., h:], sin[..., :h], value=-1.0)
        torch.mul(x[..., h:], cos[..., h:], out=out[..., h:]).addcmul_(x[..., :h], sin[..., h:])
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        # d(out[:h])/d(x[h:]) = -sin[:h] and d(out[h:])/d(x[:h]) = sin[h:]: the rotation transposed
        h = grad.shape[-1] // 2
        grad_x = torch.empty_like(grad, dtype=ctx.dtype)
        torch.mul(grad[..., :h], cos[..., :h], out=grad_x[..., :h]).addcmul_(grad[..., h:], sin[..., h:])
        torch.mul(grad[..., h:], cos[..., h:], out=grad_x[..., h:]).addcmul_(grad[..., :h], sin[..., :h], value=-1.0)
        return grad_x, None, None


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """llama's apply_rotary_pos_emb, computed by `Rotary`."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)


def llama_rotary_modules(model) -> list:
    """The Python modules of `model`'s layers whose rotary embedding is llama's code (for `fused_rotary`)."""
    found = {}
    for layer in model.modules():
        module = sys.modules.get(type(layer).__module__)
        apply, rotate = getattr(module, "apply_rotary_pos_emb", None), getattr(module, "rotate_half", None)
        if module is None or module.__name__ in found or not (callable(apply) and callable(rotate)):
            continue
        if apply is apply_rotary_pos_emb or (same_code(apply, _APPLY) and same_code(rotate, _ROTATE_HALF)):
            found[module.__name__] = module
    return list(found.values())


@contextlib.contextmanager
def fused_rotary(modules: list):
    """Inside the block, the attention of these Python modules (`llama_rotary_modules`) applies rotary
    embeddings with `Rotary`."""
    saved = [(m, m.apply_rotary_pos_emb) for m in modules]
    try:
        for m in modules:
            m.apply_rotary_pos_emb = apply_rotary_pos_emb
        yield
    finally:
        for m, fn in saved:
            m.apply_rotary_pos_emb = fn
