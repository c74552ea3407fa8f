"""`tunelab compare`: every method trained in its own process, a failing one reported, the reports written and
the HTML page rendered by headless Chromium with every plot visible; the ranking rules on their own."""

import json
import subprocess
import sys

import pytest
import yaml

from helpers import run_cli, toy_rows
from tunelab.compare.choose import pareto_front, recommend
from tunelab.compare.runner import skip_reason
from tunelab.config import build_config
from tunelab.methods import METHODS


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    data = tmp / "toy.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in toy_rows()), encoding="utf-8")
    cfg = {
        "model": "tiny-llama",
        "method": "lora",
        "seed": 0,
        "data": {"train": str(data), "val_fraction": 0.25, "max_length": 64},
        "train": {"max_steps": 4, "batch_size": 4, "precision": "fp32", "lr": 1e-2},
        # ranked on eval loss; the answers are generated and scored too, in each method's training process
        "eval": {"max_new_tokens": 4, "latency_examples": 0},
    }
    (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
    # dora's data file is missing: its own process fails after the others' have started, and only it fails
    args = ["compare", "c.yaml", "--methods", "lora,ia3,dora", "--out", "out", "--no-progress"]
    args += [f"dora:data.train={tmp / 'missing.jsonl'}", "--budget-mem", "64GiB", "--metric", "loss"]
    proc = subprocess.run(
        [sys.executable, "-m", "tunelab", *args], cwd=tmp, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp / "out", json.loads((tmp / "out" / "results.json").read_text())


def test_results_hold_every_method_and_the_failure(compared):
    out, results = compared
    rows = {r["method"]: r for r in results["methods"]}
    assert list(rows) == ["lora", "ia3", "dora"]
    assert rows["dora"]["status"] == "failed" and "missing.jsonl" in rows["dora"]["error"]
    for name in ("lora", "ia3"):
        r = rows[name]
        summary = json.loads((out / "runs" / name / "summary.json").read_text())
        assert r["status"] == "ok", r.get("error")
        assert (r["trainable_params"], r["peak_mem_bytes"]) == (summary["trainable_params"], summary["peak_mem_bytes"])
        assert r["energy_kwh"] == summary["energy_kwh"] > 0 and summary["energy_source"]
        assert r["predicted_peak_bytes"] > 0 and r["train_tokens_per_s"] > 0 and r["artifact_bytes"] > 0
        evaluated = json.loads((out / "runs" / name / "eval.json").read_text())  # written by `train --eval`
        assert r["eval"]["loss"] == evaluated["eval_loss"] and r["eval"]["exact_match"] == evaluated["eval_exact_match"]
        assert evaluated["eval_generated_examples"] == 6 and (out / "runs" / name / "predictions.jsonl").is_file()
        assert [p["step"] for p in r["curve"]] == [1, 2, 3, 4]  # 4 steps: an eval every 4 // 4 = 1 step
        assert all(p["tokens_seen"] > 0 for p in r["curve"])
        assert r["lr"] == yaml.safe_load((out / "runs" / name / "config.yaml").read_text())["train"]["lr"]
    assert (rows["lora"]["lr"], rows["ia3"]["lr"]) == (
        1e-2,
        METHODS["ia3"].default_lr,
    )  # the config's method keeps its lr
    losses = {n: rows[n]["eval"]["loss"] for n in ("lora", "ia3")}
    assert results["metric"] == "loss" and results["recommendation"]["method"] == min(losses, key=losses.get)
    assert results["recommendation"]["left_out"] == {"dora": "failed"}
    for name in ("report.md", "report.html", "plots/eval_loss.png", "plots/quality_cost.png"):
        assert (out / name).stat().st_size > 0
    assert "| dora | failed |" in (out / "report.md").read_text()


def test_report_renders_in_chromium_with_every_image(compared, browser):
    out, _ = compared
    browser.get((out / "report.html").resolve().as_uri())
    images = browser.find_elements("tag name", "img")
    assert len(images) == 2
    for img in images:
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 0
        assert img.get_attribute("src").startswith("data:image/png;base64,")  # self-contained
    assert "failed" in browser.find_element("tag name", "table").text


def _row(method, metric, mem, seconds, status="ok"):
    return {
        "method": method,
        "status": status,
        "eval": {"accuracy": metric},
        "peak_mem_bytes": mem,
        "train_wall_s": seconds,
    }


def test_pareto_front_and_recommendation_within_budgets():
    rows = [_row("a", 0.9, 300, 50), _row("b", 0.8, 100, 10), _row("c", 0.7, 200, 20), _row("d", 0.95, 900, 5)]
    assert pareto_front(rows, "accuracy", "peak_mem_bytes") == ["b", "a", "d"]  # c: b is cheaper and better
    assert pareto_front(rows, "accuracy", "train_wall_s") == ["d"]
    free = recommend(rows, "accuracy", {"mem_bytes": None, "time_s": None})
    assert free["method"] == "d"
    tight = recommend(rows, "accuracy", {"mem_bytes": 350, "time_s": 30})
    assert tight["method"] == "b" and set(tight["left_out"]) == {"a", "d"}
    loss = [{**r, "eval": {"loss": 1 - r["eval"]["accuracy"]}} for r in rows]
    assert recommend(loss, "loss", {"mem_bytes": None, "time_s": None})["method"] == "d"  # lower is better


def test_qlora_is_skipped_for_classification():
    assert skip_reason(build_config({"model": "tiny-bert", "task": "classification"}), "qlora")
    assert skip_reason(build_config({"model": "tiny-llama"}), "qlora") is None


def test_unknown_method_is_one_clear_error(tmp_path):
    (tmp_path / "c.yaml").write_text("model: tiny-llama\n")
    proc = run_cli(["compare", "c.yaml", "--methods", "lora,dorra"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --methods")
    assert "dora" in proc.stderr and "Traceback" not in proc.stderr
