"""Helpers the tests share (fixtures stay in conftest.py): toy data, a tiny training run, a faked
interruption, the CLI in a subprocess, learning rates for tiny random models, the bytes autograd saves."""

import contextlib
import json
import subprocess
import sys

# LRs that make a tiny random model learn in 30 steps (the defaults are tuned for real models)
TINY_LR = {
    "full": 1e-3,
    "freeze": 3e-3,
    "lora": 1e-2,
    "dora": 1e-2,
    "rslora": 1e-2,
    "pissa": 1e-2,
    "loraplus": 3e-3,
    "qlora": 1e-2,
    "adapter": 1e-2,
    "prefix": 1e-1,
    "prompt": 3e-1,
    "ptuning": 3e-2,
    "ia3": 1e-1,
    "adalora": 3e-2,
}


def run_cli(args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "tunelab", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def interrupted_copy(run_dir, dest, last_step):
    """A copy of a finished run made to look killed after its second-to-last checkpoint."""
    import shutil

    shutil.copytree(run_dir, dest)
    for name in ("summary.json", "eval.json"):
        (dest / name).unlink()
    shutil.rmtree(dest / "checkpoints" / f"step-{last_step}")
    shutil.rmtree(dest / ("model" if (dest / "model").is_dir() else "adapter"))  # the method's artifact
    return dest


def toy_rows(n=24, seed=0):
    """A learnable toy instruction task: repeat a colour word."""
    import random

    rng = random.Random(seed)
    colours = ["red", "green", "blue", "yellow", "black", "white", "红色", "蓝色"]
    rows = []
    for _ in range(n):
        c = rng.choice(colours)
        rows.append({"instruction": f"Repeat the word: {c}", "output": c * rng.randint(1, 3)})
    return rows


def train_tiny_run(tmp, val_fraction=0.2, rows=None, run_name="tiny", **train):
    """A short tiny-llama LoRA run on the toy task (or on `rows`) under `tmp`; returns the TrainResult."""
    import tunelab

    data = tmp / ("toy.jsonl" if rows is None else f"{run_name}.jsonl")
    rows = toy_rows() if rows is None else rows
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cfg = {
        "model": "tiny-llama",
        "out_dir": str(tmp / "runs"),
        "run_name": run_name,
        "data": {"train": str(data), "val_fraction": val_fraction, "max_length": 64},
        "train": {"max_steps": 5, "batch_size": 4, "precision": "fp32"} | train,
    }
    return tunelab.train(cfg, progress=False)


def only_method_sections(cfg: dict) -> dict:
    """`cfg` without the method sections its method does not read (a test config may offer every method's)."""
    from tunelab.config import DEFAULT_METHOD, SECTIONS
    from tunelab.methods import METHODS

    reads = METHODS[cfg.get("method", DEFAULT_METHOD)].sections
    return {k: v for k, v in cfg.items() if k not in SECTIONS or k in reads}


class SavedBytes(contextlib.AbstractContextManager):
    """Inside the block, counts the bytes autograd saves for backward (`.total`), each tensor once (by address,
    dtype and shape): what the estimator's per-token activation terms are checked against."""

    def __init__(self):
        import torch

        self.tensors = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        self.tensors[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self.hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.tensors.values())


def tiny_lm_batch(pad_id):
    """Three padded causal-LM examples of 7-12 tokens, the second half of each labelled."""
    from tunelab.data.collate import pad_batch
    from tunelab.data.encode import IGNORE_INDEX

    examples = [
        {"input_ids": list(range(5, 5 + n)), "labels": [IGNORE_INDEX] * (n // 2) + list(range(5 + n // 2, 5 + n))}
        for n in (7, 12, 9)
    ]
    return pad_batch(examples, pad_id)


def grads_of(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def tiny_lora_model(b_std: float = 0.0, **overrides):
    """tiny-llama with r=4 LoRA on every linear layer, A drawn gaussian; B drawn with `b_std` when given (peft
    starts it at zero: a test of A's gradient or of the adapter's update needs it non-zero)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tunelab.models import load_causal_lm

    torch.manual_seed(0)
    config = LoraConfig(
        **{"r": 4, "target_modules": "all-linear", "init_lora_weights": "gaussian", "lora_dropout": 0.0, **overrides}
    )
    model = get_peft_model(load_causal_lm("tiny-llama"), config)
    if b_std:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=b_std)
    return model
