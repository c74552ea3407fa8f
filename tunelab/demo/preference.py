"""`tunelab demo --task preference`: DPO fixes a wrong preference that a small SFT adapter leaves.

The task is the dates demo's (free-form dates -> the ISO date and nothing else), learned in two stages:
a short LoRA SFT run (merged into the base: the SFT model), then DPO with LoRA on pairs whose chosen
answer is the bare ISO date and whose rejected one is a typical slip of a chatty model (a sentence
around the date, chatter after it, DD/MM/YYYY). The DPO reference is the SFT
model itself (the adapter switched off). Held-out, before and after DPO: format accuracy (the answer is
exactly one YYYY-MM-DD date), exact match, and the preference win rate (the model gives the chosen answer
a higher log-probability per token than the rejected one).
"""

from __future__ import annotations

import datetime as dt
import json
import random
import re
import time
from importlib import resources
from pathlib import Path

import torch

from ..config import apply_overrides, build_config
from ..io import atomic_write_json, atomic_write_jsonl
from ..log import log
from .dates import WEEKDAYS, make_examples

ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _slips(d: dt.date) -> list[str]:
    """What a chatty or careless model answers instead of the bare date."""
    iso = d.isoformat()
    return [
        f"The date in ISO 8601 format is {iso}.",
        f"{iso}\n\nThis date is a {WEEKDAYS[d.weekday()]}.",
        f"{d.day:02d}/{d.month:02d}/{d.year}",
    ]


def make_pairs(rows: list[dict], seed: int) -> list[dict]:
    rng = random.Random(seed)
    pairs = []
    for r in rows:
        d = dt.date.fromisoformat(r["output"])
        pairs.append(
            {"prompt": f"{r['instruction']}\n\n{r['input']}", "chosen": r["output"], "rejected": rng.choice(_slips(d))}
        )
    return pairs


def write_dataset(folder: Path, seed: int = 4321, n_sft: int = 96, n_pairs: int = 320, n_test: int = 64):
    """sft.jsonl (alpaca rows), pairs.jsonl (preference), test.jsonl (held-out pairs: dates never trained on)."""
    folder.mkdir(parents=True, exist_ok=True)
    test_rows = make_examples(n_test, seed + 1)
    test_dates = {dt.date.fromisoformat(r["output"]) for r in test_rows}
    train_rows = make_examples(n_sft + n_pairs, seed, exclude=test_dates)
    paths = {name: folder / f"preference-{name}.jsonl" for name in ("sft", "pairs", "test")}
    atomic_write_jsonl(paths["sft"], train_rows[:n_sft])
    atomic_write_jsonl(paths["pairs"], make_pairs(train_rows[n_sft:], seed))
    atomic_write_jsonl(paths["test"], make_pairs(test_rows, seed + 1))
    return paths


def demo_configs(paths: dict, out_dir: str, sft_model: Path, dpo_steps: int | None = None) -> tuple:
    import yaml

    data = yaml.safe_load(resources.files("tunelab.demo").joinpath("preference.yaml").read_text())
    sft, dpo = data["sft"], data["dpo"]
    sft["data"]["train"], sft["out_dir"] = str(paths["sft"]), out_dir
    dpo["data"]["train"], dpo["out_dir"], dpo["model"] = str(paths["pairs"]), out_dir, str(sft_model)
    overrides = [f"train.max_steps={dpo_steps}"] if dpo_steps else []
    return build_config(sft), build_config(apply_overrides(dpo, overrides))


@torch.no_grad()
def win_rate(model, tokenizer, cfg, pairs_path: Path) -> float:
    """Share of held-out pairs whose chosen answer the model finds more likely, per token, than the rejected one
    (per token: a summed log-prob favours the shorter answer whatever the model prefers)."""
    from ..data.dataset import prepare_data
    from ..data.preference import pair_batches
    from ..preference import sequence_logps

    held_out = build_config(
        apply_overrides(cfg.to_dict(), [f"data.train={pairs_path}", "data.eval=null", "data.val_fraction=0"])
    )
    pairs = prepare_data(held_out, tokenizer).train
    wins = 0
    device = next(model.parameters()).device
    for batch in pair_batches(pairs, 16, tokenizer.pad_token_id):
        logps, tokens = sequence_logps(model, {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
        mean = logps / tokens
        wins += int((mean[0::2] > mean[1::2]).sum())
    return wins / len(pairs)


def score(model, tokenizer, cfg, test_path: Path) -> dict:
    from ..eval.metrics import exact_match
    from ..generation import GenerationSettings, generate_batch

    rows = [json.loads(line) for line in test_path.read_text(encoding="utf-8").splitlines()]
    answers = generate_batch(model, tokenizer, [r["prompt"] for r in rows], GenerationSettings.greedy(24), 32)
    return {
        "format_accuracy": sum(bool(ISO_DATE.fullmatch(a.strip())) for a in answers) / len(rows),
        "exact_match": exact_match(answers, [r["chosen"] for r in rows]),
        "win_rate": win_rate(model, tokenizer, cfg, test_path),
        "samples": answers[:6],
    }


def run_preference_demo(out_dir: str = "runs", steps: int | None = None) -> dict:
    import tunelab

    t_start = time.time()
    paths = write_dataset(Path(out_dir) / "demo-data")
    sft_model = Path(out_dir) / "demo-data" / "sft-model"
    sft_cfg, dpo_cfg = demo_configs(paths, out_dir, sft_model, steps)
    log(f"demo: {sft_cfg.model}; stage 1: a small SFT adapter ({sft_cfg.train.max_steps} LoRA steps), merged")
    sft = tunelab.train(sft_cfg)
    model, tokenizer = tunelab.load(sft.run_dir)
    merged = model.merge_and_unload()
    merged.save_pretrained(sft_model, safe_serialization=True)
    tokenizer.save_pretrained(sft_model)
    merged.tunelab_config = dpo_cfg  # the same system prompt as the DPO run
    before = score(merged, tokenizer, dpo_cfg, paths["test"])
    log(f"SFT model: format accuracy {before['format_accuracy']:.1%}, win rate {before['win_rate']:.1%}")
    del model, merged

    log(f"stage 2: DPO with LoRA ({dpo_cfg.train.max_steps} steps), reference: the SFT model")
    dpo = tunelab.train(dpo_cfg)
    model, tokenizer = tunelab.load(dpo.run_dir)
    after = score(model, tokenizer, dpo_cfg, paths["test"])
    print(f"\n{'expected':12s} {'before DPO':34s} after DPO")
    rows = [json.loads(line) for line in paths["test"].read_text(encoding="utf-8").splitlines()]
    for r, b, a in zip(rows, before.pop("samples"), after.pop("samples")):
        print(f"{r['chosen']:12s} {b.replace(chr(10), ' ')[:34]:34s} {a.replace(chr(10), ' ')}")
    summary = dpo.summary
    report = {
        "before_dpo": before,
        "after_dpo": after,
        "held_out_pairs": len(rows),
        "sft_steps": sft.summary["steps"],
        "dpo_steps": summary["steps"],
        "dpo_train_wall_s": round(summary["train_wall_s"], 1),
        "demo_wall_s": round(time.time() - t_start, 1),
        "run_dir": str(dpo.run_dir),
    }
    atomic_write_json(Path(dpo.run_dir) / "demo.json", report)
    print(
        f"\nheld-out ({len(rows)} dates never trained on), SFT model -> after DPO: format accuracy "
        f"{before['format_accuracy']:.1%} -> {after['format_accuracy']:.1%}, exact match "
        f"{before['exact_match']:.1%} -> {after['exact_match']:.1%}, preference win rate "
        f"{before['win_rate']:.1%} -> {after['win_rate']:.1%} ({summary['steps']} DPO steps, "
        f"{summary['train_wall_s']:.0f}s; whole demo {report['demo_wall_s']:.0f}s)"
    )
    print(f"run directory: {dpo.run_dir}")
    return report
