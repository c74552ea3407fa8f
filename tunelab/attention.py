"""Per-example attention for packed rows on sdpa ("varlen" attention without flash-attn).

A packed micro-batch is one row holding several examples back to back. Under this attention function
each layer cuts queries, keys and values at the example boundaries (`cu_seq_lens_q`, as for
flash-attention's varlen kernels) and runs causal sdpa on each example alone: exactly what the
examples compute unpacked, with no padding and no (tokens x tokens) mask. On CPU, rows up to
MASKED_MAX_TOKENS run as one sdpa call with a block-diagonal causal mask instead on a CPU with AMX
(measured faster there, slower on AVX2 and on AVX512-BF16 alone; the same attention: masked positions weigh
exactly zero). It is switched on only around a packed training step's forward and backward
(`varlen_attention`); evaluation and generation keep the model's own attention.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .device import cpu_has_amx

NAME = "tunelab_varlen"
_registered = False


# Which is faster depends on the CPU (scripts/attention_bench.py: a bench-like row of 8 examples / 1,267
# tokens, forward + backward, CPU s). An Intel Xeon with AMX: one SDPA call over the whole row with a
# block-diagonal causal mask beat per-example calls (fp32 0.22 vs 0.42, bf16 0.18 vs 0.27); an AVX2-only AMD
# EPYC: the reverse, by 3-4x (fp32 0.216 vs 0.065, bf16 1.15 vs 0.27); an AMD EPYC with AVX512-BF16 but no
# AMX: the reverse too (bf16 0.21 vs 0.098; a whole smollm2 LoRA step of that row, 16.4 vs 12.3 CPU s). So the
# masked call is used only with AMX, up to this many tokens per row (it computes the whole T x T score matrix);
# flex attention has no CPU backward in torch 2.13.
MASKED_MAX_TOKENS = 4096


def masked_rows_on_this_cpu() -> bool:
    """Whether packed rows on this CPU run as one masked SDPA call (faster with AMX) or per example."""
    return cpu_has_amx()


_mask_cache: tuple = ((), None)


def block_causal_mask(bounds: list[int], device) -> torch.Tensor:
    """(T, T) bool: query i sees key j when both are in the same example and j <= i (cached per layout)."""
    global _mask_cache
    key = (tuple(bounds), str(device))
    if _mask_cache[0] != key:
        lengths = torch.tensor(bounds[1:], device=device) - torch.tensor(bounds[:-1], device=device)
        doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
        pos = torch.arange(bounds[-1], device=device)
        _mask_cache = (key, (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :]))
    return _mask_cache[1]


# train.compile: left to eager (a graph break either way: the boundaries are read as Python ints); traced, dynamo
# recompiled it for every new layout of a packed row until its recompile limit
@torch.compiler.disable
def _varlen_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """query (1, heads, T, d), key/value (1, kv_heads, T, d) -> (1, T, heads, d)."""
    bounds = kwargs["cu_seq_lens_q"].tolist()
    groups = query.shape[1] // key.shape[1]
    if (
        query.device.type == "cpu"
        and 1 < len(bounds) - 1
        and bounds[-1] <= MASKED_MAX_TOKENS
        and masked_rows_on_this_cpu()
    ):
        mask = block_causal_mask(bounds, query.device)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=groups > 1
        )
        return out.transpose(1, 2).contiguous(), None
    if groups > 1:  # grouped-query attention: one key/value head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    # split, not slices: a slice's backward writes its gradient into a zero tensor the size of the whole row
    # (one per example, then summed: a profile showed fill_/copy_/add_ of those at a third of a step); a
    # split's backward is one cat
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    out = [
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
    ]
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


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
