"""tunelab's fast path for the benchmark: our own training loop with `train.packing: true`, precision auto.

It reads the same examples from a JSONL file (re-encoded by the loop; checked equal to what the baseline
got), with the same LoRA, optimizer settings, schedule and seed. The loop's own data order is what the
baseline was given, and every step's example indices are recorded so the parent can check that.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..config import build_config
from ..training.loop import Trainer
from .steps import StepLog, adapter_checksum


def fast_config(spec: dict) -> dict:
    """The tunelab config the fast phase trains with (a plain dict, as a user would write it)."""
    return {
        "model": spec["model"],
        "method": "lora",
        "seed": spec["seed"],
        "out_dir": str(Path(spec["workdir"]) / "runs"),
        "run_name": "bench-fast",
        "data": {
            "train": spec["train_file"],
            "val_fraction": 0.0,
            "max_length": spec["max_length"],
            "loss_on": "completion",
        },
        "train": {
            "max_steps": spec["steps"],
            "batch_size": spec["batch_size"],
            "grad_accum": spec["grad_accum"],
            "lr": spec["lr"],
            "scheduler": "linear",
            "warmup_ratio": 0.0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "precision": "auto",
            "packing": True,
            "compile": spec.get("compile", "auto"),
            "log_every": 1,
        },
        "lora": dict(spec["lora"]),
    }


def step_order(spec: dict) -> list[int]:
    """The example indices in the order tunelab's loop will train on them (its first epoch)."""
    from ..training.batching import epoch_windows

    cfg = build_config(fast_config(spec))
    windows = epoch_windows([len(e["input_ids"]) for e in spec["examples"]], cfg, 0)
    return _flat_indices(windows)


def _flat_indices(window) -> list[int]:
    if isinstance(window, int):
        return [window]
    return [i for part in window for i in _flat_indices(part)]


class TimedTrainer(Trainer):
    """tunelab's Trainer, unchanged, with each optimizer step timed and its examples recorded."""

    def __init__(self, cfg, step_log: StepLog):
        super().__init__(cfg, progress=False)
        self.step_log = step_log

    def train_step(self, window, *args, **kwargs):
        self.step_log.begin()
        result = super().train_step(window, *args, **kwargs)
        indices = _flat_indices(window)
        self.step_log.add_micro(
            loss=float(result[0]), useful=sum(len(self.data.train[i]["input_ids"]) for i in indices)
        )
        self.step_log.end(indices=indices, loop_tokens=int(result[2]))
        return result

    def section(self, name):
        return self.step_log.section(name)

    def batch_loss(self, batch):
        """Count the token positions each micro-batch runs on (rows x width) and whether it was packed
        (position ids restart inside rows), whatever the loop's batching does."""
        self.step_log.add_micro(slots=int(batch["input_ids"].numel()), packed="position_ids" in batch)
        return super().batch_loss(batch)


def train_fast(spec: dict, step_log: StepLog):
    """Train with tunelab's loop; returns the trained model. Raises if its data differ from the baseline's."""
    cfg = build_config(fast_config(spec))
    trainer = TimedTrainer(cfg, step_log)
    ours = [(e["input_ids"], e["labels"]) for e in trainer.data.train]
    theirs = [(e["input_ids"], e["labels"]) for e in spec["examples"]]
    if ours != theirs:
        raise RuntimeError("the fast phase encoded different tokens from those the baseline was given")
    step_log.init_checksum = adapter_checksum(trainer.model)
    step_log.notes["precision"] = trainer.precision
    step_log.notes["packing"] = trainer.cfg.train.packing  # as the loop resolved it
    step_log.notes["compiled_blocks"] = trainer.compiled_blocks
    step_log.notes["fused_mlps"] = trainer.fused_mlps
    step_log.mark_train_start()
    t0 = time.perf_counter()
    result = trainer.run()
    step_log.notes["train_wall_s"] = time.perf_counter() - t0
    step_log.notes["run_dir"] = str(result.run_dir)
    return trainer.model


def trained_model(step_log: StepLog):
    """The fast phase's saved adapter on a fresh fp32 base: what a user loads (training held the frozen
    base in bf16; the held-out loss is measured on the fp32 base, as the baseline's is)."""
    from ..loading import load

    return load(step_log.notes.pop("run_dir"))[0]
