"""`tunelab eval`: perplexity checked independently, generation metrics + predictions.jsonl, scorer, ensembles."""

import json
import math

import pytest
import torch

import tunelab
from tunelab.data.encode import IGNORE_INDEX
from tunelab.eval.run import evaluate_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from helpers import toy_rows

    tmp = tmp_path_factory.mktemp("evalruns")
    data = tmp / "toy.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in toy_rows(30)), encoding="utf-8")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        out[name] = tunelab.train(
            {
                "model": "tiny-llama",
                "out_dir": str(tmp / "runs"),
                "run_name": name,
                "seed": seed,
                "data": {"train": str(data), "val_fraction": 0.2, "max_length": 64},
                "train": {"max_steps": 8, "batch_size": 4, "lr": 1e-2, "precision": "fp32"},
                "eval": {"max_new_tokens": 8},
            },
            progress=False,
        ).run_dir
    return out


def test_perplexity_is_exp_of_token_weighted_nll(runs):
    metrics = evaluate_run(str(runs["a"]))
    model, tok = tunelab.load(runs["a"])
    from tunelab.config import load_config
    from tunelab.data import prepare_data

    val = prepare_data(load_config(runs["a"] / "config.yaml"), tok).val
    nll, count = 0.0, 0
    with torch.no_grad():
        for ex in val:  # one example at a time, no padding: an independent computation
            logp = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, :-1].log_softmax(-1)
            for pos, label in enumerate(ex["labels"][1:]):
                if label != IGNORE_INDEX:
                    nll -= float(logp[pos, label])
                    count += 1
    assert metrics["eval_tokens"] == count
    assert metrics["eval_ppl"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_generation_metrics_predictions_and_efficiency(runs, tmp_path, monkeypatch):
    (tmp_path / "my_scorer.py").write_text(
        "def length_ratio(pred, ref, record):\n    return min(len(pred), len(ref)) / max(len(ref), 1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    metrics = evaluate_run(str(runs["a"]), overrides=["eval.scorer=my_scorer:length_ratio"])
    for key in (
        "eval_exact_match",
        "eval_bleu",
        "eval_rouge1",
        "eval_rougeL",
        "eval_score",
        "eval_latency_p50_ms",
        "eval_latency_p95_ms",
        "eval_latency_throughput",
        "peak_mem_bytes",
    ):
        assert key in metrics, key
    assert 0 <= metrics["eval_exact_match"] <= 1 and metrics["eval_latency_p95_ms"] >= metrics["eval_latency_p50_ms"]
    rows = [json.loads(x) for x in (runs["a"] / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["eval_generated_examples"] == metrics["examples"]
    assert {"prompt", "reference", "prediction", "exact_match", "rougeL", "score"} <= set(rows[0])
    assert json.loads((runs["a"] / "eval.json").read_text())["eval_loss"] == pytest.approx(metrics["eval_loss"])


def test_bad_scorer_is_a_user_error(runs):
    from tunelab.errors import UserError

    with pytest.raises(UserError, match="eval.scorer"):
        evaluate_run(str(runs["a"]), overrides=["eval.scorer=no_such_module:f"])


def test_ensemble_of_two_runs_averages_logits(runs):
    single = evaluate_run(str(runs["a"]), overrides=["eval.generate=false"])
    same = evaluate_run(f"{runs['a']},{runs['a']}")
    assert same["eval_loss"] == pytest.approx(single["eval_loss"], abs=1e-5)
    both = evaluate_run(f"{runs['a']},{runs['b']}")
    assert both["models"] == [str(runs["a"]), str(runs["b"])] and math.isfinite(both["eval_loss"])
