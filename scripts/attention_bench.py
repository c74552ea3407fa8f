"""Packed-row attention on this device: per-example SDPA (with repeated key/value heads, or grouped-query heads
inside SDPA as tunelab's CPU path does; for bf16 also computed in fp32 as on CPU) against one SDPA call with a
block-diagonal causal mask, the examples right-padded into one causal batch, and flex attention with a
document block mask.

    python scripts/attention_bench.py [--dtype bf16|fp32] [--repeats 5]

One packed row of examples with the bench's long-tailed lengths, smollm2-135m's attention shape (9 query
heads, 3 key/value heads, head dim 64). Each variant runs forward + backward; repeats are interleaved
(variant A, B, C, A, B, C, ...) so a change in the machine's load hits all alike, and the best time of each
is kept. Every variant's output and input gradients are checked against the per-example reference first.
Prints JSON (seconds per forward+backward, CPU seconds, max relative error, whether it is exact).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

LENGTHS = [61, 143, 88, 402, 47, 120, 75, 331]  # a bench-like row: mostly short, a long tail (1,267 tokens)
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def bounds_of(lengths):
    return [0, *torch.tensor(lengths).cumsum(0).tolist()]


def per_example(q, k, v, bounds):
    """tunelab.attention's path: causal SDPA on each example alone."""
    k, v = k.repeat_interleave(q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    parts = [
        F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True)
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(parts, dim=2)


def per_example_gqa(q, k, v, bounds):
    """The same with grouped-query heads inside SDPA (`enable_gqa`) instead of repeated key/value copies."""
    parts = [
        F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, enable_gqa=True)
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(parts, dim=2)


def per_example_fp32(q, k, v, bounds):
    """Per-example SDPA computed in fp32 from bf16 inputs (cast in, cast the output back)."""
    return per_example(q.float(), k.float(), v.float(), bounds).to(q.dtype)


def pad_index(bounds):
    """(examples * longest) row positions of a right-padded batch (padding points at row T, a zero row), and
    the positions of its real tokens in that batch, in row order."""
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    longest, total = max(lengths), bounds[-1]
    gather = torch.full((len(lengths), longest), total)
    for i, (s, n) in enumerate(zip(bounds[:-1], lengths)):
        gather[i, :n] = torch.arange(s, s + n)
    real = torch.cat([torch.arange(n) + i * longest for i, n in enumerate(lengths)])
    return gather.flatten(), real, len(lengths), longest


def padded_batch(q, k, v, index, gqa: bool):
    """The examples right-padded into one batch, one causal SDPA call: a real query never sees the padding
    after it, and padded queries are dropped (so they get no gradient)."""
    gather, real, n, longest = index

    def pad(t):  # (1, h, T, d) -> (n, h, longest, d)
        t = torch.cat([t, t.new_zeros(*t.shape[:2], 1, t.shape[-1])], dim=2)
        return t[0].index_select(1, gather).unflatten(1, (n, longest)).transpose(0, 1)

    q, k, v = pad(q), pad(k), pad(v)
    if not gqa:
        k, v = k.repeat_interleave(q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # (n, h, longest, d)
    return out.transpose(0, 1).flatten(1, 2).index_select(1, real).unsqueeze(0)


def doc_ids(bounds):
    return torch.cat([torch.full((e - s,), i) for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))])


def masked_sdpa(q, k, v, mask):
    """One SDPA call over the whole row with a (T, T) boolean block-diagonal causal mask."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    bounds = bounds_of(LENGTHS)
    total = bounds[-1]
    q0 = torch.randn(1, HEADS, total, HEAD_DIM, dtype=dtype)
    k0 = torch.randn(1, KV_HEADS, total, HEAD_DIM, dtype=dtype)
    v0 = torch.randn(1, KV_HEADS, total, HEAD_DIM, dtype=dtype)
    grad_out = torch.randn(1, HEADS, total, HEAD_DIM, dtype=dtype)
    doc = doc_ids(bounds)
    pos = torch.arange(total)
    mask = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])

    variants = {"per_example_sdpa": lambda q, k, v: per_example(q, k, v, bounds)}
    variants["per_example_sdpa_gqa"] = lambda q, k, v: per_example_gqa(q, k, v, bounds)
    variants["masked_sdpa"] = lambda q, k, v: masked_sdpa(q, k, v, mask)
    index = pad_index(bounds)
    variants["padded_batch_sdpa"] = lambda q, k, v: padded_batch(q, k, v, index, gqa=False)
    variants["padded_batch_sdpa_gqa"] = lambda q, k, v: padded_batch(q, k, v, index, gqa=True)
    if dtype == torch.bfloat16:
        variants["per_example_sdpa_in_fp32"] = lambda q, k, v: per_example_fp32(q, k, v, bounds)
    notes = {}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def doc_causal(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

        block_mask = create_block_mask(doc_causal, None, None, total, total, device="cpu")
        flex = torch.compile(flex_attention, dynamic=False)
        variants["flex_attention"] = lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=True)
        notes["flex_compile_s"] = None  # filled at its first call below
    except Exception as exc:  # noqa: BLE001 - a torch without flex attention on this device: measured without it
        notes["flex_attention"] = f"unavailable: {exc}"[:200]

    def run(fn):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        out = fn(q, k, v)
        out.backward(grad_out)
        return out.detach(), [t.grad for t in (q, k, v)]

    ref_out, ref_grads = run(variants["per_example_sdpa"])
    results = {}
    for name, fn in variants.items():
        t0 = time.perf_counter()
        try:
            out, grads = run(fn)
        except Exception as exc:  # noqa: BLE001 - e.g. no C++ compiler for flex attention's kernel
            notes[name] = f"failed: {exc}"[:200]
            continue
        if name == "flex_attention":
            notes["flex_compile_s"] = time.perf_counter() - t0
        err = max(
            float((a.float() - b.float()).abs().max() / b.float().abs().max())
            for a, b in zip([out, *grads], [ref_out, *ref_grads])
        )
        results[name] = {"max_rel_err": err, "seconds": [], "cpu_seconds": []}
    for _ in range(args.repeats):
        for name in results:
            c0, t0 = time.process_time(), time.perf_counter()
            run(variants[name])
            results[name]["seconds"].append(time.perf_counter() - t0)
            results[name]["cpu_seconds"].append(time.process_time() - c0)
    # exact: within the reference's own rounding (bf16 keeps 8 bits: 1e-2; fp32: 1e-5)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for r in results.values():
        r["best_s"], r["best_cpu_s"] = min(r.pop("seconds")), min(r.pop("cpu_seconds"))
        r["exact"] = r["max_rel_err"] <= tol
    best = min((r["best_s"], n) for n, r in results.items() if r["exact"])[1]
    report = {
        "dtype": args.dtype,
        "tokens": total,
        "examples": len(LENGTHS),
        "threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],
        "fastest_exact": best,
        "variants": results,
        "notes": notes,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
