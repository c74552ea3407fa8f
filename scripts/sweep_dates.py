"""The sweep on the date demo: 8 trials of LoRA on smollm2-135m (a small step budget), scored on eval_loss.

    python scripts/sweep_dates.py [--out-dir runs-sweep] [--trials 8] [--steps 12] [--eval-every 3] [--batch-size 8]

Trial 0 is the demo's config as written (with the smaller budget); the others draw train.lr, lora.r and
train.warmup_ratio. Prints JSON: the default's and the best trial's eval_loss, how many trials were pruned (and at
which step), the wall time, and the exact match of both runs on the demo's 64 held-out dates.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib import resources
from pathlib import Path

import yaml

SPACE = """\
train.lr: {low: 3.0e-4, high: 1.0e-2, log: true}
lora.r: [4, 8, 16, 32]
train.warmup_ratio: {low: 0.0, high: 0.2}
"""


def main() -> int:
    import tunelab
    from tunelab.demo.dates import write_dataset
    from tunelab.demo.run import score_exact_match
    from tunelab.device import cpu_capability
    from tunelab.sweep import SweepOptions, run_sweep

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default="runs-sweep")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--eval-every", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", default="auto", help="train.precision (the demo's: auto)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="the demo's; fewer: cheaper evaluations")
    args = p.parse_args()

    out = Path(args.out_dir)
    train_path, test_path = write_dataset(out / "demo-data")
    config = yaml.safe_load(resources.files("tunelab.demo").joinpath("dates.yaml").read_text())
    config["data"]["train"] = str(train_path.resolve())
    config["out_dir"] = str(out.resolve())
    config["run_name"] = None
    config["train"].update(max_steps=args.steps, eval_every=args.eval_every, batch_size=args.batch_size, log_every=1)
    config["train"]["precision"] = args.precision
    config["data"]["val_fraction"] = args.val_fraction
    (out / "dates-sweep.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    (out / "dates-space.yaml").write_text(SPACE, encoding="utf-8")

    t0 = time.time()
    summary = run_sweep(
        SweepOptions(config=str(out / "dates-sweep.yaml"), space=str(out / "dates-space.yaml"), trials=args.trials)
    )
    wall = time.time() - t0
    rows = [json.loads(line) for line in test_path.read_text(encoding="utf-8").splitlines()]
    exact = {}
    for which in ("baseline", "best"):
        model, tokenizer = tunelab.load(summary[which]["run"])
        exact[which] = score_exact_match(model, tokenizer, rows)[0]
    results = json.loads((Path(summary["sweep_dir"]) / "sweep.json").read_text())
    report = {
        "model": config["model"],
        "trials": args.trials,
        "max_steps": args.steps,
        "eval_every": args.eval_every,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "val_fraction": args.val_fraction,
        "states": results["states"],
        "default_eval_loss": summary["baseline"]["value"],
        "best_eval_loss": summary["best"]["value"],
        "best_trial": summary["best"]["trial"],
        "best_params": summary["best"]["params"],
        "pruned_at_steps": [r["step"] for r in results["pruned"]],
        "held_out_exact_match_default": exact["baseline"],
        "held_out_exact_match_best": exact["best"],
        "held_out_examples": len(rows),
        "sweep_wall_s": round(wall, 1),
        "cpu": cpu_capability(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "sweep_dir": summary["sweep_dir"],
    }
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
