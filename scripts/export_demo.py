"""Measure `tunelab export` on the demo's smollm2 run (numbers for the README): merged, GGUF f16 and q8_0,
Ollama, int8 (both CPU runtimes), --prune-layers 6 with and without healing. Prints one JSON object.

    python scripts/export_demo.py RUN --out-dir DIR [--prompts FILE] [--heal-steps 40]

RUN is `runs/demo-dates` after `tunelab demo`; --prompts defaults to the demo's 64 held-out dates next to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _runtime_speed(out: Path, prompts_file: Path, limit: int) -> dict:
    """Greedy tokens/s and load time of the int8 export under each CPU runtime, on the same prompts."""
    from tunelab.data.formats import load_examples
    from tunelab.export.parity import _answers
    from tunelab.export.quantize import load_int8

    convs = [e.messages[:-1] for e in load_examples(prompts_file, "auto", False)[0]][:limit]
    result = {}
    import importlib.util

    # torchao is an optional extra (tunelab[int8]): measured when installed
    for runtime in ("dequant", "torch", "torchao") if importlib.util.find_spec("torchao") else ("dequant", "torch"):
        t0 = time.perf_counter()
        model, tokenizer = load_int8(out, runtime)
        load_s = time.perf_counter() - t0
        answers, tps = _answers(model, tokenizer, convs, "You are a precise assistant.", 16)
        result[runtime] = {"load_s": round(load_s, 2), "tokens_per_s": round(tps, 2), "answers": answers[:3]}
    return result


def main() -> None:
    from tunelab.export import export_run

    parser = argparse.ArgumentParser()
    parser.add_argument("run")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--prompts", default=None)
    parser.add_argument("--max-prompts", type=int, default=64)
    parser.add_argument("--heal-steps", type=int, default=40)
    parser.add_argument("--only", default=None, help="comma-separated subset of the exports")
    args = parser.parse_args()
    run, out_dir = Path(args.run), Path(args.out_dir)
    prompts = Path(args.prompts) if args.prompts else run.parent / "demo-data" / "dates-test.jsonl"
    torch.manual_seed(0)
    exports = {
        "merged": {"merge": True},
        "gguf-f16": {"fmt": "gguf"},
        "ollama-q8_0": {"fmt": "ollama", "quantize": "q8_0"},
        "int8": {"quantize": "int8"},
        "prune6": {"prune_layers": 6},
        "prune6-healed": {"prune_layers": 6, "heal_steps": args.heal_steps},
    }
    if args.only:
        exports = {k: v for k, v in exports.items() if k in args.only.split(",")}
    report = {}
    for name, options in exports.items():
        t0 = time.perf_counter()
        r = export_run(run, out_dir / name, prompts=prompts, max_prompts=args.max_prompts, progress=False, **options)
        keep = ("kind", "mean_kl", "max_kl", "greedy_token_agreement", "same_greedy_answers", "conversations")
        report[name] = {k: r[k] for k in keep} | {
            "exact_match": r.get("exact_match"),
            "tokens_per_s": r["tokens_per_s"],
            "export_bytes": r["export_bytes"],
            "export_load_s": r["export_load_s"],
            "wall_s": round(time.perf_counter() - t0, 1),
        }
        for extra in ("int8", "pruning", "gguf_tokenizer_agreement"):
            if extra in r:
                report[name][extra] = r[extra]
        if name == "int8":
            report[name]["runtimes"] = _runtime_speed(out_dir / name, prompts, 16)
        print(json.dumps({name: report[name]}), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
