"""Shared fixtures: tiny models from the registry, data files generated per test."""

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The SmolLM2 tokenizer + chat template (also tiny-llama's)."""
    from tunelab.models import load_tokenizer

    return load_tokenizer("tiny-llama")


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(rows, name='data.jsonl') -> path of a JSON Lines file."""

    def write(rows, name="data.jsonl"):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return path

    return write


def interrupted_copy(run_dir, dest, last_step):
    """A copy of a finished run made to look killed after its second-to-last checkpoint."""
    import shutil

    shutil.copytree(run_dir, dest)
    for name in ("summary.json", "eval.json"):
        (dest / name).unlink()
    shutil.rmtree(dest / "checkpoints" / f"step-{last_step}")
    shutil.rmtree(dest / "adapter")
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


def train_tiny_run(tmp, val_fraction=0.2, **train):
    """A short tiny-llama LoRA run on the toy task under `tmp`; returns the TrainResult."""
    import tunelab

    data = tmp / "toy.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in toy_rows()), encoding="utf-8")
    cfg = {"model": "tiny-llama", "out_dir": str(tmp / "runs"), "run_name": "tiny",
           "data": {"train": str(data), "val_fraction": val_fraction, "max_length": 64},
           "train": {"max_steps": 5, "batch_size": 4, "precision": "fp32"} | train}
    return tunelab.train(cfg, progress=False)


@pytest.fixture
def toy_data(write_jsonl):
    return write_jsonl(toy_rows())


@pytest.fixture
def tiny_config(tmp_path, toy_data):
    """A dict config for a short tiny-llama LoRA run writing under tmp_path."""
    return {
        "model": "tiny-llama",
        "method": "lora",
        "out_dir": str(tmp_path / "runs"),
        "run_name": "tiny",
        "seed": 0,
        "data": {"train": str(toy_data), "val_fraction": 0.2, "max_length": 64},
        "train": {"max_steps": 5, "batch_size": 4, "lr": 1e-3, "precision": "fp32", "warmup_ratio": 0.0},
    }
