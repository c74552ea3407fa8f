"""Predicted vs measured peak memory and step time: short real trainings, one per cell, each in its own
process (so each peak RSS is its own). Writes JSON and a Markdown table (for the README).

    python scripts/estimate_matrix.py --models tiny-llama smollm2-135m-instruct --out docs/estimate-matrix

Measured: summary.json's peak_mem_bytes (peak RSS on a CPU: the whole process) and the median step time
of steps 2.. (differences of metrics.jsonl's cumulative train_s; step 1 warms up), over enough steps to fill
MEASURE_SECONDS (a shared machine's speed moves for seconds at a time: 6 steps of 0.3 s can meet one phase
only). Predicted: `tunelab estimate` on the same config, its runtime baseline included; its step time is
measured on shallow copies of the run (tunelab/estimate/depth.py).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

METHODS = ("full", "lora", "qlora", "adapter", "prefix")
NO_CHECKPOINTING = {"prefix"}  # peft's prefix tuning refuses gradient checkpointing (tunelab says so)
SHAPES = ((2, 64), (4, 256))  # (batch_size, max_length)
MEASURE_SECONDS, MIN_STEPS, MAX_STEPS = 10.0, 6, 600  # the measured run: as many steps as fill 10 s
WORDS = "the quick brown fox jumps over a lazy dog while seven red birds sing in the old tall tree".split()


def write_data(path: Path, n: int = 48) -> None:
    """Texts longer than any max_length here: every example is exactly max_length tokens."""
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(400))} for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def cell_config(model, method, batch, length, checkpointing, data, out_dir, steps=6) -> dict:
    return {
        "model": model,
        "method": method,
        "out_dir": str(out_dir),
        "run_name": f"{method}-b{batch}-t{length}-gc{int(checkpointing)}",
        "data": {"train": str(data), "max_length": length, "val_fraction": 0.0, "loss_on": "all"},
        "train": {"max_steps": steps, "batch_size": batch, "gradient_checkpointing": checkpointing},
    }


def measure(cfg: dict, workdir: Path) -> dict:
    """Train the cell in a fresh process; its peak memory and median step time."""
    import yaml

    path = workdir / f"{cfg['run_name']}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "tunelab", "train", str(path), "--no-progress"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{cfg['run_name']}: {proc.stderr.strip()[-400:]}")
    run = Path(proc.stdout.strip().splitlines()[-1])
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    # a step's time: the difference of the cumulative training seconds (metrics.jsonl's train_s); step 1 warms up
    seconds = [b["train_s"] - a["train_s"] for a, b in zip(records, records[1:])]
    return {
        "peak_bytes": summary["peak_mem_bytes"],
        "step_s": statistics.median(seconds),
        "load_peak_bytes": summary.get("load_peak_mem_bytes"),
        "train_peak_bytes": summary.get("train_peak_mem_bytes"),
    }


def predict(cfg: dict) -> dict:
    from tunelab.config import build_config
    from tunelab.estimate import estimate

    report = estimate(build_config(cfg))
    return {"peak_bytes": report["memory"]["total"], "step_s": report["step_seconds"], "memory": report["memory"]}


def run_matrix(models, methods=METHODS, shapes=SHAPES, checkpointing=(False, True)) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data.jsonl"
        write_data(data)
        for model in models:
            for method in methods:
                for batch, length in shapes:
                    for ckpt in checkpointing:
                        if ckpt and method in NO_CHECKPOINTING:
                            continue
                        cfg = cell_config(model, method, batch, length, ckpt, data, tmp / "runs")
                        steps = math.ceil(MEASURE_SECONDS / predict(cfg)["step_s"])
                        cfg["train"]["max_steps"] = min(MAX_STEPS, max(MIN_STEPS, steps))
                        want, got = predict(cfg), measure(cfg, tmp)  # the copies' calibration is cached by now
                        row = {
                            "model": model,
                            "method": method,
                            "batch_size": batch,
                            "max_length": length,
                            "checkpointing": ckpt,
                            "measured_steps": cfg["train"]["max_steps"],
                            "measured_peak_mib": got["peak_bytes"] / 2**20,
                            "predicted_peak_mib": want["peak_bytes"] / 2**20,
                            "peak_error_pct": 100 * (want["peak_bytes"] - got["peak_bytes"]) / got["peak_bytes"],
                            "measured_step_s": got["step_s"],
                            "predicted_step_s": want["step_s"],
                            "step_error_pct": 100 * (want["step_s"] - got["step_s"]) / got["step_s"],
                            "baseline_mib": want["memory"]["runtime_baseline"] / 2**20,
                            "measured_load_peak_mib": (got["load_peak_bytes"] or 0) / 2**20,
                            "measured_train_peak_mib": (got["train_peak_bytes"] or 0) / 2**20,
                        }
                        print(json.dumps(row), flush=True)
                        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | method | batch x length | checkpointing | measured peak MiB | predicted MiB | error | "
        "steps | measured step s | predicted step s | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['batch_size']} x {r['max_length']} | "
            f"{'yes' if r['checkpointing'] else 'no'} | {r['measured_peak_mib']:.0f} | {r['predicted_peak_mib']:.0f} | "
            f"{r['peak_error_pct']:+.1f}% | {r.get('measured_steps', 6)} | {r['measured_step_s']:.3f} | "
            f"{r['predicted_step_s']:.3f} | "
            f"{r['step_error_pct']:+.0f}% |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["tiny-llama"])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--out", default="estimate-matrix")
    p.add_argument("--shapes", nargs="+", default=[f"{b}x{t}" for b, t in SHAPES], help="BATCHxLENGTH")
    p.add_argument("--checkpointing", nargs="+", default=["no", "yes"], choices=["no", "yes"])
    args = p.parse_args()
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # before the hour of runs, not after it
    rows = run_matrix(args.models, args.methods, shapes, [c == "yes" for c in args.checkpointing])
    Path(f"{args.out}.json").write_text(json.dumps(rows, indent=2) + "\n")
    Path(f"{args.out}.md").write_text(markdown(rows))
    print(markdown(rows))
