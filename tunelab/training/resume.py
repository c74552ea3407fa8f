"""What `--resume RUN key=value` may change, how a change is applied, and where it is recorded.

A resumed run continues the same training, so only what leaves the steps already taken valid may
change; it applies from the next step. Everything else (model, method and its options, data, seed,
schedule shape, optimizer settings) is refused with the list of what may change: start a new run.
Applied changes are written to RUN/config.yaml and appended to RUN/resumes.jsonl.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import ConfigError

# key (or section prefix ending in ".") -> how the change applies
RESUMABLE = {
    "train.lr": "the new base LR from the next step; the schedule keeps its shape",
    "train.max_steps": "the schedule is recomputed over the new total",
    "train.epochs": "the schedule is recomputed over the new total",
    "train.batch_size": "the micro-batch; grad_accum follows so a step takes as many examples",
    "train.grad_accum": "follows batch_size: a step keeps its number of examples",
    "train.max_grad_norm": "clipping from the next step",
    "train.precision": "from the next step",
    "train.packing": "exact either way: the same examples, the same numbers",
    "train.gradient_checkpointing": "the same numbers, less memory",
    "train.distributed": "ddp or fsdp: checkpoints are whole tensors either way, the same numbers",
    "train.auto_batch_size": "",
    "train.log_every": "",
    "train.eval_every": "",
    "train.save_every": "",
    "train.save_total_limit": "",
    "train.early_stopping_patience": "",
    "eval.": "",
    "trust_remote_code": "",
    "allow_pickle": "",
}
SCHEDULE_KEYS = ("train.lr", "train.max_steps", "train.epochs")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _resumable(key: str) -> bool:
    return key in RESUMABLE or any(p.endswith(".") and key.startswith(p) for p in RESUMABLE)


def resume_changes(saved, requested) -> dict:
    """{dotted key: [old, new]} between the run's saved config and the one asked for on resume;
    a change to a key that may not change is a ConfigError naming it."""
    before, after = _flat(saved.to_dict()), _flat(requested.to_dict())
    changes = {
        k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)
    }
    refused = {k: v for k, v in changes.items() if not _resumable(k)}
    if refused:
        shown = ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in refused.items())
        allowed = ", ".join(k + ("*" if k.endswith(".") else "") for k in RESUMABLE)
        raise ConfigError(
            f"cannot change on resume: {shown}; a resumed run continues the same training, so start a new "
            f"run for that. These may change on resume: {allowed}"
        )
    return changes


def rebase_schedule(optimizer, scheduler, base_lrs: list[float]) -> None:
    """After a checkpoint restored the optimizer and scheduler: the base LRs of this config (a new
    train.lr) and the LR of the coming step under this config's schedule (a new total)."""
    scheduler.base_lrs = list(base_lrs)
    for group, base, fn in zip(optimizer.param_groups, base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def record_resume(run_dir: Path, step: int, changes: dict) -> dict:
    """Append this resume to RUN/resumes.jsonl; returns the record."""
    record = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": changes}
    with open(Path(run_dir) / "resumes.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return record
