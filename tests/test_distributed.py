"""Data-parallel training: 2 processes (gloo on CPU) compute what 1 process computes with the same
global batch, only rank 0 writes, and checkpoints resume under a different process count."""

import json
import subprocess
import sys

import yaml

import tunelab
from helpers import interrupted_copy, toy_rows


def _losses(run):
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]


def test_two_processes_equal_one_and_resume_under_another_count(tmp_path, write_jsonl):
    cfg = {
        "model": "tiny-llama",
        "out_dir": str(tmp_path / "runs"),
        "seed": 0,
        "data": {"train": str(write_jsonl(toy_rows(40))), "val_fraction": 0.2, "max_length": 64},
        "train": {
            "max_steps": 6,
            "batch_size": 4,
            "lr": 1e-3,
            "precision": "fp32",
            "warmup_ratio": 0.0,
            "save_every": 3,
            "eval_every": 3,
        },
        "lora": {"dropout": 0.0},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "tunelab", "train", str(path), "run_name=two", "--nproc", "2", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "runs" / "two"
    assert proc.stdout.strip() == str(two)  # printed once: only rank 0 speaks
    assert "over 2 processes" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["two"]  # only rank 0 writes

    # one process, the same global batch of 8
    one = tunelab.train(cfg | {"run_name": "one", "train": cfg["train"] | {"batch_size": 8}}, progress=False)
    a, b = _losses(two), _losses(one.run_dir)
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    summary = json.loads((two / "summary.json").read_text())
    assert abs(summary["final_train_loss"] - one.summary["final_train_loss"]) < 1e-4
    assert abs(summary["eval"]["eval_loss"] - one.summary["eval"]["eval_loss"]) < 1e-4

    # the 2-process run, killed after step 3, resumed by a single process
    resumed = tunelab.train(None, resume=interrupted_copy(two, tmp_path / "resumed", last_step=6), progress=False)
    assert max(abs(x - y) for x, y in zip(_losses(resumed.run_dir), a)) < 1e-4
