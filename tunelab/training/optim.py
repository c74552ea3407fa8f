"""Optimizer parameter groups (weight decay, LoRA+ ratios, `train.lr_groups`) and LR schedules."""

from __future__ import annotations

import fnmatch

import torch

from ..errors import ConfigError


def _matches(name: str, pattern: str) -> bool:
    # a pattern with wildcards is a glob on the full parameter name; a plain word is a substring
    return fnmatch.fnmatchcase(name, pattern) if any(c in pattern for c in "*?[") else pattern in name


def _no_decay(name: str, param) -> bool:
    return param.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")


def param_groups(model, cfg, method) -> list[dict]:
    """AdamW parameter groups; each carries `lr`, `weight_decay`, and a readable `name`."""
    t = cfg.train
    groups: dict[tuple, dict] = {}
    used_patterns = set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        mult = method.lr_multiplier(name, cfg)
        label = "base"
        if mult != 1.0:
            label = f"method x{mult:g}"
        for pattern, factor in t.lr_groups.items():
            if _matches(name, pattern):
                mult *= factor
                label = pattern if label == "base" else f"{label}, {pattern}"
                used_patterns.add(pattern)
                break
        decay = 0.0 if _no_decay(name, param) else t.weight_decay
        key = (label, mult, decay)
        group = groups.setdefault(
            key, {"params": [], "lr": t.lr * mult, "weight_decay": decay, "name": label, "numel": 0}
        )
        group["params"].append(param)
        group["numel"] += param.numel()
    unused = set(t.lr_groups) - used_patterns
    if unused:
        raise ConfigError(f"train.lr_groups: pattern(s) {sorted(unused)} match no trainable parameter")
    if not groups:
        raise ConfigError(f"method '{cfg.method}' left no trainable parameters")
    return list(groups.values())


def build_optimizer(model, cfg, method) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg, method)
    for g in groups:
        g.pop("numel")
    # fused: one kernel over all parameters (CUDA, and CPU since torch 2.4) instead of a loop of small ops per
    # parameter: a smollm2 LoRA step has 420 adapter matrices
    params = [p for g in groups for p in g["params"]]
    fused_ok = all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.999), eps=1e-8, fused=fused_ok or None)


def build_scheduler(optimizer, cfg, total_steps: int):
    from transformers import get_scheduler

    warmup = int(round(cfg.train.warmup_ratio * total_steps))
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.train.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
