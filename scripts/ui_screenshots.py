"""The README's screenshots of `tunelab ui` (docs/ui-runs.png, docs/ui-run.png, docs/ui-compare.png).

Trains three short tiny-llama runs (two LoRA settings and full fine-tuning) into a temporary runs directory,
serves it on 127.0.0.1 and photographs the pages in headless Chromium.

    python scripts/ui_screenshots.py [--out docs] [--steps 40]
"""

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from browser import chromium_driver  # noqa: E402

RUNS = {  # name: (method, lr, extra config)
    "lora-r8": ("lora", 1e-2, {"lora": {"r": 8}}),
    "lora-r16-lr3e-3": ("lora", 3e-3, {"lora": {"r": 16}}),
    "full-lr1e-3": ("full", 1e-3, {}),
}


def toy_rows(n=64, seed=0):
    rng = random.Random(seed)
    colours = ["red", "green", "blue", "yellow", "black", "white"]
    return [{"instruction": f"Repeat the word: {c}", "output": c} for c in (rng.choice(colours) for _ in range(n))]


def main() -> None:
    import tunelab
    from tunelab.serve.server import ServerThread
    from tunelab.ui.server import UiOptions, UiServing

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="docs")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "colours.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in toy_rows()))
        for name, (method, lr, extra) in RUNS.items():
            tunelab.train(
                {
                    "model": "tiny-llama",
                    "method": method,
                    "out_dir": str(Path(tmp) / "runs"),
                    "run_name": name,
                    "data": {"train": str(data), "val_fraction": 0.25, "max_length": 64},
                    "train": {"max_steps": args.steps, "batch_size": 4, "lr": lr, "eval_every": 5, "precision": "fp32"},
                    **extra,
                },
                progress=False,
            )
        serving = UiServing(UiOptions(runs=[str(Path(tmp) / "runs")]), log=lambda message: None)
        with ServerThread(serving) as url:
            driver = chromium_driver()
            try:
                ids = ",".join(f"0/{name}" for name in RUNS)
                for page, path, height in (
                    ("runs", "/", 360),
                    ("run", "/run/0/lora-r8", 1500),
                    ("compare", f"/compare?runs={ids}", 1100),
                ):
                    driver.set_window_size(1280, height)
                    driver.get(url + path)
                    time.sleep(2)  # the page draws from the API
                    driver.save_screenshot(str(out / f"ui-{page}.png"))
                    print(out / f"ui-{page}.png")
            finally:
                driver.quit()


if __name__ == "__main__":
    main()
