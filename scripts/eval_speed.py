"""Generation evaluation speed: the demo's held-out dates answered one at a time against in batches.

    python scripts/eval_speed.py [RUN] [--batch-size 16]

Prints JSON: examples/s of both, their ratio, and whether every greedy answer is identical. Without RUN
it uses the demo's base model (smollm2-135m-instruct) with the demo's chat template and system prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    import tunelab
    from tunelab.data.encode import resolve_chat_template
    from tunelab.demo.dates import write_dataset
    from tunelab.demo.run import GREEDY, demo_config
    from tunelab.device import cpu_capability
    from tunelab.eval.run import batched_answers
    from tunelab.generation import generate_batch
    from tunelab.models import load_causal_lm, load_tokenizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        _, test_path = write_dataset(Path(tmp))
        rows = [json.loads(line) for line in test_path.read_text(encoding="utf-8").splitlines()]
        cfg = demo_config(Path(tmp) / "train.jsonl", tmp)
    if args.run:
        model, tokenizer = tunelab.load(args.run)
    else:
        tokenizer, model = load_tokenizer(cfg.model), load_causal_lm(cfg.model)
        model.eval()
        model.tunelab_config = cfg
        tokenizer.chat_template = resolve_chat_template(tokenizer, cfg.data.chat_template)
    prompts = [[{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"}] for r in rows]
    t0 = time.perf_counter()
    alone = [generate_batch(model, tokenizer, [q], GREEDY)[0] for q in prompts]
    t_alone = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = batched_answers(model, tokenizer, prompts, GREEDY, args.batch_size, progress=False)
    t_batched = time.perf_counter() - t0
    result = {
        "model": args.run or cfg.model,
        "cpu": cpu_capability(),
        "examples": len(prompts),
        "max_new_tokens": GREEDY.max_new_tokens,
        "batch_size": args.batch_size,
        "one_at_a_time_examples_per_s": round(len(prompts) / t_alone, 2),
        "batched_examples_per_s": round(len(prompts) / t_batched, 2),
        "speedup": round(t_alone / t_batched, 2),
        "identical_greedy_answers": alone == batched,
        "differing": sum(a != b for a, b in zip(alone, batched)),
    }
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0 if result["identical_greedy_answers"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
