"""README numbers for `tunelab data clean --drop-label-errors`: the triage demo with 8% of its training labels
flipped (seeded): `uniform` flips random records to a random other department; `pairs` flips within two
confusable pairs (cardiology -> respiratory, neurology -> dermatology), as a tired annotator would. Measures how many flips the label-error finder ranks in its top k (k = 1.5 x flips), then
trains the triage LoRA run on the noisy file and on the cleaned file and prints held-out macro-F1 as JSON.

    PYTHONPATH=. python scripts/noisy_triage.py [uniform|pairs] [OUT_DIR]
"""

import json
import random
import sys
from pathlib import Path

from tunelab.data.clean import clean_file
from tunelab.data.label_errors import rank_label_issues
from tunelab.demo.triage import LABELS, triage_config, write_triage
from tunelab.io import atomic_write_jsonl
from tunelab.training.loop import Trainer

FLIP_SHARE, SEED = 0.08, 7
PAIRS = {"cardiology": "respiratory", "neurology": "dermatology"}


def main(mode: str = "uniform", out_dir: str = "runs/noisy-triage") -> dict:
    out = Path(out_dir) / mode
    train_path, test_path = write_triage(out / "data", seed=SEED)
    rows = [json.loads(line) for line in train_path.read_text(encoding="utf-8").splitlines()]
    rng = random.Random(SEED)
    n_flips = round(FLIP_SHARE * len(rows))
    if mode == "pairs":
        flipped = []
        for source in PAIRS:
            flipped += rng.sample([i for i, r in enumerate(rows) if r["label"] == source], n_flips // len(PAIRS))
    else:
        flipped = rng.sample(range(len(rows)), n_flips)
    for i in flipped:
        others = [lab for lab in LABELS if lab != rows[i]["label"]]
        rows[i]["label"] = PAIRS[rows[i]["label"]] if mode == "pairs" else rng.choice(others)
    noisy = out / "data" / "triage-train-noisy.jsonl"
    atomic_write_jsonl(noisy, rows)
    ranked = rank_label_issues([r["text"] for r in rows], [r["label"] for r in rows])
    top_k = set(ranked["ranking"][: int(1.5 * len(flipped))])
    report = clean_file(noisy, out / "data" / "triage-train-clean.jsonl", drop_label_errors=True)
    dropped = {r["line"] - 1 for r in report["removed"]}
    result = {
        "mode": mode,
        "train_records": len(rows),
        "flipped": len(flipped),
        "flips_in_top_k": len(top_k & set(flipped)),
        "top_k": len(top_k),
        "dropped_by_clean": len(dropped),
        "flips_dropped": len(dropped & set(flipped)),
    }
    for name, path in (("noisy", noisy), ("clean", out / "data" / "triage-train-clean.jsonl")):
        cfg = triage_config(path, test_path, out, [f"run_name=triage-{name}"])
        summary = Trainer(cfg, progress=False).run().summary
        result[f"macro_f1_{name}"] = round(float(summary["eval"]["eval_f1_macro"]), 4)
        result[f"accuracy_{name}"] = round(float(summary["eval"]["eval_accuracy"]), 4)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(*sys.argv[1:])
