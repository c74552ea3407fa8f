"""The issue's acceptance run of `tunelab compare`: smollm2-135m-instruct, 5 methods on the demo's date task
(its config, 40 steps, the 64 held-out dates as the evaluation), the whole comparison's wall time printed as JSON.

    python scripts/compare_demo.py --out compare-demo [--methods lora,dora,adapter,ia3,prefix]

LoRA keeps the demo's lr (2e-3) and DoRA gets the same; the other methods train at their defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from importlib import resources
from pathlib import Path

import torch
import yaml

from tunelab.cli import main
from tunelab.demo.dates import write_dataset

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="compare-demo")
    p.add_argument("--methods", default="lora,dora,adapter,ia3,prefix")
    p.add_argument("--steps", type=int, help="fewer steps than the demo's 40 (a shorter check)")
    args = p.parse_args()
    out = Path(args.out)
    train, test = write_dataset(out / "data")
    cfg = yaml.safe_load(resources.files("tunelab.demo").joinpath("dates.yaml").read_text())
    cfg["data"].update(train=str(train.resolve()), eval=str(test.resolve()), val_fraction=0.0)
    cfg["eval"] = {"max_new_tokens": 16, "batch_size": 32, "latency_examples": 0}
    if args.steps:
        cfg["train"]["max_steps"] = args.steps
    path = out / "compare.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    t0 = time.perf_counter()
    code = main(["compare", str(path), "--methods", args.methods, "--out", str(out / "report"), "dora:train.lr=2e-3"])
    wall = time.perf_counter() - t0
    report = {"exit": code, "wall_s": round(wall, 1), "load_avg": os.getloadavg(), "threads": torch.get_num_threads()}
    print(json.dumps(report | {"out": str(out / "report")}))
