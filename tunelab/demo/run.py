"""`tunelab demo` / `make demo`: exact match of the base model, a short LoRA run, exact match again."""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from ..config import apply_overrides, build_config
from ..data.encode import resolve_chat_template
from ..eval.metrics import exact_match
from ..generation import GenerationSettings, generate_batch
from ..io import atomic_write_json
from ..models import load_causal_lm, load_tokenizer
from .dates import write_dataset

GREEDY = GenerationSettings.greedy(16)


def demo_config(data_path: Path, out_dir: str, steps: int | None = None):
    import yaml

    data = yaml.safe_load(resources.files("tunelab.demo").joinpath("dates.yaml").read_text())
    data["data"]["train"] = str(data_path)
    data["out_dir"] = out_dir
    overrides = [f"train.max_steps={steps}"] if steps else []
    return build_config(apply_overrides(data, overrides))


def score_exact_match(model, tokenizer, rows: list[dict]) -> tuple[float, list[str]]:
    """Greedy answers to the rows and their exact match (the same definition as `tunelab eval`)."""
    prompts = [f"{r['instruction']}\n\n{r['input']}" for r in rows]
    predictions = generate_batch(model, tokenizer, prompts, GREEDY, batch_size=32)
    return exact_match(predictions, [r["output"] for r in rows]), predictions


def run_demo(out_dir: str = "runs", steps: int | None = None) -> dict:
    import tunelab

    t_start = time.time()
    data_dir = Path(out_dir) / "demo-data"
    train_path, test_path = write_dataset(data_dir)
    test_rows = [json.loads(line) for line in test_path.read_text(encoding="utf-8").splitlines()]
    cfg = demo_config(train_path, out_dir, steps)
    print(f"demo: {cfg.model}, {sum(1 for _ in open(train_path))} training / {len(test_rows)} held-out date examples")

    tokenizer = load_tokenizer(cfg.model)
    base = load_causal_lm(cfg.model)
    base.eval()
    base.tunelab_config = cfg  # same system prompt as training

    tokenizer.chat_template = resolve_chat_template(tokenizer, cfg.data.chat_template)
    before, before_preds = score_exact_match(base, tokenizer, test_rows)
    print(f"before fine-tuning: exact match {before:.1%}")
    del base

    result = tunelab.train(cfg)
    model, tokenizer = tunelab.load(result.run_dir)
    after, after_preds = score_exact_match(model, tokenizer, test_rows)
    print()
    print(f"{'input':38s} {'expected':12s} {'before':28s} after")
    for r, b, a in list(zip(test_rows, before_preds, after_preds))[:8]:
        print(f"{r['input'][:38]:38s} {r['output']:12s} {b.replace(chr(10), ' ')[:28]:28s} {a}")
    print()
    summary = result.summary
    report = {
        "exact_match_before": before,
        "exact_match_after": after,
        "held_out_examples": len(test_rows),
        "train_steps": summary["steps"],
        "train_wall_s": round(summary["train_wall_s"], 1),
        "train_tokens_per_s": round(summary["train_tokens_per_s"], 1),
        "demo_wall_s": round(time.time() - t_start, 1),
        "run_dir": str(result.run_dir),
    }

    atomic_write_json(Path(result.run_dir) / "demo.json", report)
    print(
        f"exact match on {len(test_rows)} held-out dates: before {before:.1%} -> after {after:.1%} "
        f"({summary['steps']} LoRA steps, {summary['train_wall_s']:.0f}s training, "
        f"{summary['train_tokens_per_s']:.0f} tokens/s; whole demo {report['demo_wall_s']:.0f}s)"
    )
    print(f"run directory: {result.run_dir}")
    return report
