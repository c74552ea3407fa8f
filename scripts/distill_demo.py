"""README numbers for `tunelab distill`: the demo run (LoRA on smollm2-135m-instruct, the date task) as the
teacher, a half-depth student cut from it (blocks 0, 2, ..., 28 of 30, weights copied), then two runs of that
student with the same labeled data, seed, steps and LR: distilled (KD, T=4, alpha=0.7 by default) and
fine-tuned without the teacher (plain CE). With `--prompts N` the distilled student also gets N date prompts
without answers (`distill.prompts`: the teacher answers them; none is a training or test date), which plain
fine-tuning cannot use. Held-out exact match on the demo's 64 test dates (greedy, as `tunelab demo`), params
and speed of each; JSON on stdout and in OUT_DIR/distill-demo-TAG.json.

    PYTHONPATH=. python scripts/distill_demo.py [--steps N] [--lr LR] [--method full] [--temperature T] [--alpha A]
        [--hidden-weight B] [--prompts N] [--seed S] [--out-dir DIR] [--teacher RUN] [--skip-plain]
"""

import argparse
import json
import time
from pathlib import Path

import tunelab
from tunelab.demo.dates import write_dataset
from tunelab.demo.run import demo_config, score_exact_match
from tunelab.distill import distill
from tunelab.io import atomic_write_json, atomic_write_jsonl
from tunelab.loading import is_run_dir


def student_config(train_path: Path, out_dir: Path, teacher: str, name: str, args, prompts_path=None) -> dict:
    """The demo's data settings and step size; `full` fine-tuning of the student."""
    demo = demo_config(train_path, str(out_dir)).to_dict()
    return {
        "method": args.method,
        "run_name": name,
        "out_dir": str(out_dir),
        "seed": args.seed,
        "data": demo["data"],
        "train": {**demo["train"], "max_steps": args.steps, "lr": args.lr, "log_every": 5},
        "distill": {
            "teacher": teacher,
            "keep_every": 2,
            "temperature": args.temperature,
            "alpha": args.alpha,
            "hidden_weight": args.hidden_weight,
            "kd_positions": args.kd_positions,
            **({"prompts": str(prompts_path)} if prompts_path else {}),
        },
    }


def write_prompts(folder: Path, n: int) -> Path:
    """n date prompts without answers, none of them a training or test date (the same seed every time)."""
    import datetime as dt

    from tunelab.demo.dates import make_examples

    used = set()
    for name in ("dates-train.jsonl", "dates-test.jsonl"):
        for line in (folder / name).read_text(encoding="utf-8").splitlines():
            used.add(dt.date.fromisoformat(json.loads(line)["output"]))
    rows = [{"instruction": r["instruction"], "input": r["input"]} for r in make_examples(n, 999, exclude=used)]
    path = folder / f"dates-prompts-{n}.jsonl"
    atomic_write_jsonl(path, rows)
    return path


def exact_match(run_dir, rows) -> float:
    model, tokenizer = tunelab.load(run_dir)
    return score_exact_match(model, tokenizer, rows)[0]


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--method", default="full")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.7)
    parser.add_argument("--hidden-weight", type=float, default=0.0, help="distill.hidden_weight (the cosine term)")
    parser.add_argument("--skip-plain", action="store_true", help="the distilled student only (another T or alpha)")
    parser.add_argument("--prompts", type=int, default=0, help="N unanswered date prompts the teacher answers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kd-positions", default="labels", choices=["labels", "all"], help="distill.kd_positions")
    parser.add_argument("--out-dir", default="runs/distill-demo")
    parser.add_argument("--teacher", help="an existing demo run (default: train one, as `tunelab demo` does)")
    args = parser.parse_args()
    t0 = time.time()
    out = Path(args.out_dir)
    train_path, test_path = write_dataset(out / "demo-data")
    rows = [json.loads(line) for line in test_path.read_text(encoding="utf-8").splitlines()]
    teacher = args.teacher or str(out / "demo-dates")
    if not is_run_dir(teacher):
        teacher = str(tunelab.train(demo_config(train_path, str(out))).run_dir)

    tag = f"t{args.temperature:g}-a{args.alpha:g}" + (f"-h{args.hidden_weight:g}" if args.hidden_weight else "")
    tag += (f"-p{args.prompts}" if args.prompts else "") + ("-all" if args.kd_positions == "all" else "")
    tag += f"-s{args.steps}-seed{args.seed}"
    prompts_path = write_prompts(out / "demo-data", args.prompts) if args.prompts else None
    distilled_run = distill(student_config(train_path, out, teacher, f"student-distilled-{tag}", args, prompts_path))
    distilled = distilled_run.summary
    runs = [("distilled", distilled_run)]
    if not args.skip_plain:  # the same student, its own folder as the model: plain fine-tuning from the same weights
        plain_cfg = student_config(train_path, out, teacher, f"student-plain-s{args.steps}-seed{args.seed}", args)
        del plain_cfg["distill"]
        runs.append(("plain", tunelab.train({**plain_cfg, "model": distilled["model"]})))

    report = {"steps": args.steps, "lr": args.lr, "method": args.method, "held_out": len(rows)}
    report |= {"temperature": args.temperature, "alpha": args.alpha, "hidden_weight": args.hidden_weight}
    report |= {"prompts": args.prompts, "seed": args.seed, "kd_positions": args.kd_positions}
    report["teacher"] = {
        "run": teacher,
        "exact_match": exact_match(teacher, rows),
        **{
            k: distilled["distill"]["teacher"].get(k)
            for k in ("total_params", "eval_loss", "eval_forward_tokens_per_s")
        },
    }
    for name, result in runs:
        run, summary = result.run_dir, result.summary
        report[name] = {
            "run": str(run),
            "exact_match": exact_match(run, rows),
            "total_params": summary["total_params"],
            "eval_loss": summary["eval"].get("eval_loss"),
            "train_wall_s": round(summary["train_wall_s"], 1),
            "train_tokens_per_s": round(summary["train_tokens_per_s"], 1),
        }
    report["student_eval_forward_tokens_per_s"] = distilled["distill"]["student"].get("eval_forward_tokens_per_s")
    report["wall_s"] = round(time.time() - t0, 1)
    atomic_write_json(out / f"distill-demo-{tag}.json", report)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
