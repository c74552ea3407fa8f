"""`tunelab serve-bench`: a bounded loopback load check of `tunelab serve`; JSON.

Four random LoRA adapters (rank 16 on q/v, made in a temporary folder) are served on the model, and
the same stream of requests (greedy, `ignore_eos` so every request decodes exactly `max_tokens`) is
sent for: the base alone, one adapter, the four adapters mixed in one stream (mixed-adapter batching),
and the four mixed with one adapter per batch (what a server without mixed batching does). Each
scenario (its best of `rounds` interleaved rounds): requests/s, p50/p95 latency, generated tokens/s. Only 127.0.0.1 is contacted; every count
and wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import tempfile
import time
from pathlib import Path

import torch

from ..io import atomic_write_json

TOPICS = ["the sea", "a red kite", "mountains", "rain", "a quiet library", "the moon", "bread", "a long train ride"]
MIN_MIXED_RATIO = 0.8  # the bar: 4 adapters mixed keep >= 80% of one adapter's throughput


def make_random_adapters(model_name: str, folder: Path, count: int = 4, rank: int = 16) -> dict[str, str]:
    """`count` LoRA adapters with random (non-zero) weights for `model_name`, saved in the peft layout."""
    from peft import LoraConfig, get_peft_model

    from ..models import load_causal_lm

    base = load_causal_lm(model_name)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"]))
    paths = {}
    for i in range(count):
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        paths[f"adapter-{i}"] = str(folder / f"adapter-{i}")
        model.save_pretrained(paths[f"adapter-{i}"], safe_serialization=True)
    return paths


async def _scenario(url: str, key: str, models: list[str], requests: int, concurrency: int, max_tokens: int) -> dict:
    import httpx

    from ..eval.metrics import latency_stats

    limit = asyncio.Semaphore(concurrency)
    latencies, tokens = [], []

    async def one(client, i: int) -> None:
        body = {
            "model": models[i % len(models)],
            "messages": [{"role": "user", "content": f"Write one sentence about {TOPICS[i % len(TOPICS)]}."}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        async with limit:
            start = time.perf_counter()
            response = await client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)
            tokens.append(response.json()["usage"]["completion_tokens"])

    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:
        await asyncio.gather(*(one(client, i) for i in range(min(concurrency, len(models) * 2))))  # warm-up
        latencies.clear(), tokens.clear()
        start = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(requests)))
        wall = time.perf_counter() - start
    stats = latency_stats(latencies)
    return {
        "models": models,
        "requests": requests,
        "requests_per_s": round(requests / wall, 3),
        "p50_latency_ms": round(stats["p50_ms"], 1),
        "p95_latency_ms": round(stats["p95_ms"], 1),
        "tokens_per_s": round(sum(tokens) / wall, 1),
        "completion_tokens": sum(tokens),
        "seconds": round(wall, 2),
    }


def run_serve_bench(
    model: str, requests: int = 32, concurrency: int = 8, max_tokens: int = 16, rounds: int = 2, out: str | None = None
) -> dict:
    """Each scenario runs `rounds` times, interleaved with the others, and keeps its best round: on a shared
    machine other processes only ever slow a round down."""
    from ..errors import UserError
    from .server import ServeOptions, ServerThread, Serving, log

    if min(requests, concurrency, max_tokens, rounds) < 1:
        raise UserError("--requests, --concurrency, --max-tokens and --rounds must be >= 1")
    key = secrets.token_urlsafe(24)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="tunelab-serve-bench-") as tmp:
        log(f"serve-bench: making 4 random LoRA adapters for {model} ...")
        adapters = make_random_adapters(model, Path(tmp))
        serving = Serving(
            ServeOptions(base=model, adapters=adapters, api_key=key, max_batch_size=concurrency),
            log=lambda message: None,
        )
        # the same adapters again, served one adapter per batch: the comparison without mixed batching
        serving.registry.mixed_batching = False
        unmixed = {f"solo-{name}": path for name, path in adapters.items()}
        for name, path in unmixed.items():
            serving.registry.load(name, path)
        names = list(adapters)
        scenarios = {
            "base": [model],
            "one_adapter": names[:1],
            "four_adapters_mixed": names,
            "four_adapters_one_per_batch": list(unmixed),
        }
        results = {}
        with ServerThread(serving) as url:
            for round_ in range(1, rounds + 1):
                for label, models in scenarios.items():
                    log(
                        f"serve-bench: round {round_}/{rounds}: {label} ({requests} requests, {concurrency} at a time, "
                        f"{max_tokens} tokens each)"
                    )
                    result = asyncio.run(_scenario(url, key, models, requests, concurrency, max_tokens))
                    if label not in results or result["tokens_per_s"] > results[label]["tokens_per_s"]:
                        results[label] = result
    one = results["one_adapter"]["tokens_per_s"]
    report = {
        "model": model,
        "device": str(next(serving.registry.base.model.parameters()).device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # other processes competing for the CPU make every number below smaller and noisier
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "max_batch_size": concurrency,
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "scenarios": results,
        "mixed_vs_one_adapter": round(results["four_adapters_mixed"]["tokens_per_s"] / one, 3),
        "one_per_batch_vs_one_adapter": round(results["four_adapters_one_per_batch"]["tokens_per_s"] / one, 3),
        "target_mixed_vs_one_adapter_min": MIN_MIXED_RATIO,
    }
    report["meets_target"] = report["mixed_vs_one_adapter"] >= MIN_MIXED_RATIO
    if out:
        atomic_write_json(out, report)
    return report
