"""Shared fixtures: tiny models from the registry, data files generated per test."""

import json
import os

import pytest
from hypothesis import settings

from browser import browser  # noqa: F401 - the headless Chromium fixture for the browser tests
from helpers import toy_rows

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# CI replays the same generated cases every run (a regression suite that cannot go red by chance);
# elsewhere the fuzz tests draw new cases each run and keep what failed in .hypothesis/
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


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
