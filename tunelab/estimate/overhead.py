"""The per-step time that FLOPs do not explain: the Python and kernel-launch cost of every module call in the
forward and the backward, the loss, gradient clipping and the optimizer's per-tensor work. On small models
it is most of a step (tiny-llama: FLOPs alone predicted ~10x too little).

Measured once per machine (cached like the matmul speed), per architecture type, method and precision:
real training steps (tunelab's loss, backward, clipping, AdamW) of the run's own architecture shrunk to
width 32 and a 256-token vocabulary, at 1 and 3 blocks, one 8-token row, so that their FLOPs are negligible.
The fit: seconds per micro-batch = fixed + per_block x blocks.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import time

from .cache import cached

WIDTH, VOCAB, TOKENS, DEPTHS = 32, 256, 8, (1, 3)
WARMUP, TIMED = 2, 5


def shrunk(config, blocks: int):
    """A copy of a transformers config at width WIDTH, VOCAB tokens and `blocks` blocks."""
    small = config.__class__.from_dict(config.to_dict())
    text = small.get_text_config() if hasattr(small, "get_text_config") else small
    sizes = {
        "hidden_size": WIDTH,
        "intermediate_size": 2 * WIDTH,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": WIDTH // 2,
        "vocab_size": VOCAB,
        "num_hidden_layers": blocks,
    }
    for key, value in sizes.items():
        if getattr(text, key, None) is not None:
            setattr(text, key, value)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(text, key, None), int) and getattr(text, key) >= VOCAB:
            setattr(text, key, 0)
    return small


def _step_seconds(cfg, method, config, blocks: int, precision: str) -> float:
    """Median seconds of one training step (one micro-batch) of the shrunk model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from ..device import autocast_dtype
    from ..losses import loss_sum

    small = shrunk(config, blocks)
    torch.manual_seed(0)
    with contextlib.redirect_stderr(io.StringIO()):
        if cfg.task == "classification":
            small.num_labels = len(cfg.data.labels or ["a", "b"])
            model = AutoModelForSequenceClassification.from_config(small)
        else:
            model = AutoModelForCausalLM.from_config(small, dtype=torch.float32)
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = method.apply(model, cfg, 1000)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    ids = torch.randint(3, VOCAB, (1, TOKENS))
    labels = torch.zeros(1, dtype=torch.long) if cfg.task == "classification" else ids.clone()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    dtype = autocast_dtype(precision)
    autocast = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype else contextlib.nullcontext
    times = []
    for i in range(WARMUP + TIMED):
        t0 = time.perf_counter()
        with autocast():
            loss = loss_sum(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_overhead(cfg, method, get_config, model_type: str, precision: str, device) -> dict:
    """{'fixed_s', 'per_block_s'}: the per-micro-batch overhead of this architecture and method, measured on
    this machine once (cached; `get_config()` gives the architecture's config when it is measured). Only on a
    CPU: on a GPU launches overlap the kernels (0 there)."""
    if device.type != "cpu":
        return {"fixed_s": 0.0, "per_block_s": 0.0}
    name = "lora" if cfg.method == "qlora" else cfg.method  # the shrunk model is not quantized
    key = f"{model_type}|{name}|{precision}|{cfg.task}|ckpt{int(cfg.train.gradient_checkpointing)}"

    def measure():
        from ..methods import METHODS

        config = get_config()
        lo, hi = (_step_seconds(cfg, METHODS[name], config, d, precision) for d in DEPTHS)
        per_block = max(0.0, (hi - lo) / (DEPTHS[1] - DEPTHS[0]))
        return {"fixed_s": max(0.0, lo - per_block * DEPTHS[0]), "per_block_s": per_block}

    return cached("overhead", key, measure, timing=True)
