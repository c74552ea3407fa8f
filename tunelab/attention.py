"""Per-example attention for packed rows on sdpa ("varlen" attention without flash-attn).

A packed micro-batch is one row holding several examples back to back. Under this attention function
each layer cuts queries, keys and values at the example boundaries (`cu_seq_lens_q`, as for
flash-attention's varlen kernels) and runs causal sdpa on each example alone: exactly what the
examples compute unpacked, with no padding and no (tokens x tokens) mask. It is switched on only around a
packed training step's forward and backward (`varlen_attention`); evaluation and generation keep the
model's own attention.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

NAME = "tunelab_varlen"
_registered = False


# Measured on CPU (scripts/attention_bench.py: forward + backward of a bench-like row of 8 examples / 1,267
# tokens, smollm2's 9/3 heads, idle 2-core machines): per-example SDPA beat one SDPA call over the row with a
# block-diagonal causal mask on an AVX2-only EPYC (3-4x), an AVX512-BF16 EPYC (2x) and an AMX Xeon (bf16 0.067
# vs 0.113 s wall, fp32 0.046 vs 0.130), and beat the examples right-padded into one batched call (0.126 bf16).
# torch's CPU flash kernel is slower in bf16 than in fp32 (on the Xeon: 0.056 s against 0.027 for the same
# shapes), so bf16/fp16 rows run it in fp32: cast in and back out, 0.031-0.036 s, and ten times closer to an
# fp64 reference (8e-4 against 8e-3 relative). Flex attention has no CPU backward in torch 2.13.
def _cpu_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


# train.compile: left to eager (a graph break either way: the boundaries are read as Python ints); traced, dynamo
# recompiled it for every new layout of a packed row until its recompile limit
@torch.compiler.disable
def _varlen_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """query (1, heads, T, d), key/value (1, kv_heads, T, d) -> (1, T, heads, d)."""
    bounds = kwargs["cu_seq_lens_q"].tolist()
    groups = query.shape[1] // key.shape[1]
    dtype = query.dtype
    on_cpu, gqa = query.device.type == "cpu", False
    if on_cpu:  # fp32 SDPA (see above), outside autocast, which would cast its inputs back to bf16
        compute = _cpu_compute_dtype(dtype)
        query, key, value = query.to(compute), key.to(compute), value.to(compute)
        gqa = groups > 1  # one key/value head serves `groups` query heads inside SDPA: no repeated copies
    elif groups > 1:  # CUDA: repeated key/value heads, as transformers' sdpa attention does
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    # split, not slices: a slice's backward writes its gradient into a zero tensor the size of the whole row
    # (one per example, then summed: a profile showed fill_/copy_/add_ of those at a third of a step); a
    # split's backward is one cat
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    with torch.autocast("cpu", enabled=False) if on_cpu else contextlib.nullcontext():
        out = [
            F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
            for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
        ]
    # one copy: to (1, T, heads, d), and back to the layer's dtype (shared by o_proj and its adapter, which
    # autocast would cast apart); `to` returns a view unchanged when the dtype already matches
    out = torch.cat(out, dim=2).transpose(1, 2)
    return (out.contiguous() if out.dtype == dtype else out.to(dtype, memory_format=torch.contiguous_format)), None


def register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, _varlen_sdpa)  # no mask function: transformers builds no mask for it
        _registered = True


@contextlib.contextmanager
def varlen_attention(model, active: bool = True):
    """Run `model`'s attention per example (packed batches carrying `cu_seq_lens_q`) inside the block."""
    if not active:
        yield
        return
    register()
    configs = {
        id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")
    }
    saved = [(c, c._attn_implementation) for c in configs.values()]
    try:
        for c, _ in saved:
            c._attn_implementation = NAME
        yield
    finally:
        for c, impl in saved:
            c._attn_implementation = impl
