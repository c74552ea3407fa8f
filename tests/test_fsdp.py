"""Sharded training (train.distributed: fsdp, FSDP2) over 2 gloo processes on CPU: the numbers of one
process, about half the parameter and optimizer bytes per process, and checkpoints that resume across
sharded and unsharded runs in both directions."""

import json
import subprocess
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file

import tunelab
from helpers import interrupted_copy, only_method_sections, toy_rows
from tunelab.cli import main

WORKER = Path(__file__).with_name("sharded_worker.py")
# fp32 on both sides; only the order of the sums differs (per-rank partial sums, reduce-scatter), which
# moves losses by ~1e-7 relative (measured); 1e-4 leaves room for other CPUs' kernels
REL = 1e-4


def _losses(run):
    rows = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _close(a, b, rel=REL):
    return len(a) == len(b) and all(abs(x - y) <= rel * abs(y) for x, y in zip(a, b))


def _artifact_tensors(run):
    files = sorted((Path(run) / ("model" if (Path(run) / "model").is_dir() else "adapter")).glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


def test_sharded_equals_one_process_and_checkpoints_cross(tmp_path, write_jsonl):
    # 17 training examples, 8 a step: step 3 holds one example, so one rank runs only a zero-weight filler pass
    data = write_jsonl(toy_rows(21))
    base = {
        "model": "tiny-llama",
        "out_dir": str(tmp_path / "runs"),
        "seed": 0,
        "data": {"train": str(data), "val_fraction": 0.2, "max_length": 64},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "precision": "fp32", "warmup_ratio": 0.0}
        | {"save_every": 2, "eval_every": 2},
        "lora": {"dropout": 0.0},
    }
    configs = {}
    for method in ("full", "lora"):
        configs[method] = tmp_path / f"{method}.yaml"
        configs[method].write_text(yaml.safe_dump(only_method_sections(base | {"method": method})))

    # one process, the same global batch of 8
    one = {
        m: tunelab.train(
            only_method_sections(
                base | {"method": m, "run_name": f"{m}-one", "train": base["train"] | {"batch_size": 8}}
            ),
            progress=False,
        )
        for m in ("full", "lora")
    }
    cut = interrupted_copy(one["lora"].run_dir, tmp_path / "runs" / "lora-cut", last_step=4)

    # 2 processes: full and lora sharded from the start; the 1-process lora run resumed sharded from step 2
    jobs = [
        ["train", str(configs["full"]), "run_name=full-two", "--shard", "--no-progress"],
        ["train", str(configs["lora"]), "run_name=lora-two", "--shard", "--no-progress"],
        ["train", "--resume", str(cut), "train.batch_size=4", "--shard", "--no-progress"],
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER)]
    proc = subprocess.run([*cmd, json.dumps(jobs)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = tmp_path / "runs"
    assert proc.stdout.split() == [str(runs / "full-two"), str(runs / "lora-two"), str(cut)]  # rank 0 alone
    assert proc.stderr.count("over 2 processes") == 3

    for m in ("full", "lora"):
        two = runs / f"{m}-two"
        assert len(_losses(two)) == 4 and _close(_losses(two), _losses(one[m].run_dir)), m
        summary = json.loads((two / "summary.json").read_text())
        assert _close([summary["eval"]["eval_loss"]], [one[m].summary["eval"]["eval_loss"]]), m
        # each rank holds half of every parameter and optimizer tensor (the largest rank is reported; FSDP
        # pads shards to equal size and AdamW's step counters stay whole, so a little over 1/2)
        for key in ("param_bytes_per_rank", "optimizer_bytes_per_rank"):
            ratio = summary[key] / one[m].summary[key]
            assert 0.5 <= ratio <= 0.6, (m, key, summary[key], one[m].summary[key])
        # the artifact rank 0 saved from the gathered weights is the one-process artifact
        a, b = _artifact_tensors(two), _artifact_tensors(one[m].run_dir)
        assert a.keys() == b.keys()
        for name in a:  # Adam steps amplify last-bit differences (measured 1e-5 of the tensor's scale)
            assert (a[name] - b[name]).abs().max() <= 1e-3 * b[name].abs().max(), (m, name)

    # the 1-process checkpoint resumed sharded: the uninterrupted 1-process losses
    assert _close(_losses(cut), _losses(one["lora"].run_dir))
    assert json.loads((cut / "resumes.jsonl").read_text())["changes"]["train.distributed"] == ["ddp", "fsdp"]

    # the sharded checkpoint resumed in one process (its grad_accum doubles to keep 8 examples a step)
    resumed = tunelab.train(None, resume=interrupted_copy(runs / "full-two", tmp_path / "full-cut", 4), progress=False)
    assert _close(_losses(resumed.run_dir), _losses(one["full"].run_dir))


def test_shard_refuses_what_it_cannot_split(tiny_config, tmp_path, capsys, monkeypatch):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    for method, reason in (("adalora", "rank allocator"), ("qlora", "4-bit")):
        assert main(["train", str(path), f"method={method}", "--shard", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: train.distributed: fsdp does not work with method '{method}'") and reason in err
        assert err.count("\n") == 1  # one line, no traceback
    # accelerate's own FSDP switch is not silently dropped: tunelab reads none of its settings
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert main(["train", str(path), "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("error: accelerate launch --use_fsdp: tunelab shards the model itself")
    assert not (tmp_path / "runs").exists()  # refused before anything is written
