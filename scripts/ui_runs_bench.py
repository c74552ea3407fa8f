"""How fast the dashboard's runs page is with many runs on disk; prints JSON (numbers for the README).

Writes N run folders (config, a metrics log of 300 records, summary or failure) into a temporary runs
directory, serves it on 127.0.0.1 and measures: /api/runs the first time (every run parsed) and again (from
the mtime cache), the same after one run's log grew, a full re-parse (`tunelab.runs.list_runs`, what an
uncached server would do per request), and the runs page in headless Chromium until its table shows every run.

    python scripts/ui_runs_bench.py [--runs 200]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from browser import chromium_driver  # noqa: E402


def write_runs(root: Path, n: int) -> None:
    import yaml

    for i in range(n):
        run = root / f"lora-tiny-llama-{i:04d}"
        run.mkdir(parents=True)
        config = {"model": "tiny-llama", "method": "lora", "train": {"lr": 1e-3 * (1 + i % 7), "max_steps": 300}}
        (run / "config.yaml").write_text(yaml.safe_dump(config | {"lora": {"r": 8 << (i % 3)}}))
        records = [
            {
                "step": s,
                "epoch": s / 100,
                "loss": 2.0 / (1 + s / 50),
                "lr": 1e-3,
                "grad_norm": 1.0,
                "tokens_per_s": 900.0,
            }
            | ({"eval_loss": 2.1 / (1 + s / 50)} if s % 50 == 0 else {})
            for s in range(1, 301)
        ]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        if i % 10 == 9:
            (run / "failure.json").write_text(json.dumps({"error": "non-finite loss", "step": 300}))
            continue
        summary = {"method": "lora", "model": "tiny-llama", "steps": 300, "final_train_loss": records[-1]["loss"]}
        summary |= {"eval": {"eval_loss": 0.3}, "peak_mem_bytes": 5 << 28, "train_tokens_per_s": 900.0}
        (run / "summary.json").write_text(json.dumps(summary | {"artifact_bytes": 36000}))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tunelab.runs import list_runs
    from tunelab.serve.server import ServerThread
    from tunelab.ui.server import UiOptions, UiServing

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    n = parser.parse_args().runs
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "runs"
        write_runs(root, n)
        serving = UiServing(UiOptions(runs=[str(root)]), log=lambda message: None)
        with ServerThread(serving) as url, httpx.Client(base_url=url, timeout=120) as client:
            cold = timed(lambda: client.get("/api/runs").raise_for_status())
            warm = [timed(lambda: client.get("/api/runs").raise_for_status()) for _ in range(10)]
            with open(root / "lora-tiny-llama-0000" / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": 301, "loss": 0.1}) + "\n")
            one_changed = timed(lambda: client.get("/api/runs").raise_for_status())
            reparse = [timed(lambda: list_runs(root)) for _ in range(3)]
            driver = chromium_driver()
            try:
                pages = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    driver.get(url + "/")
                    WebDriverWait(driver, 120, poll_frequency=0.01).until(
                        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#runs tbody tr")) == n
                    )
                    pages.append(time.perf_counter() - t0)
            finally:
                driver.quit()
    ms = lambda s: round(1000 * s, 1)  # noqa: E731
    print(
        json.dumps(
            {
                "runs": n,
                "load_average_1m": round(os.getloadavg()[0], 2),  # other work on the machine slows every number
                "api_runs_first_ms": ms(cold),
                "api_runs_cached_median_ms": ms(statistics.median(warm)),
                "api_runs_one_run_changed_ms": ms(one_changed),
                "full_reparse_list_runs_median_ms": ms(statistics.median(reparse)),
                "runs_page_until_table_shown_median_ms": ms(statistics.median(pages)),
                "runs_page_loads_ms": [ms(p) for p in pages],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
