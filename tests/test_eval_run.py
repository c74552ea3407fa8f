"""`tunelab eval`: perplexity checked independently, generation metrics + predictions.jsonl, scorer, ensembles,
`--data` writing its own files, multi-turn prompts, the progress bar."""

import io
import json
import math
import shutil
import sys

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
    # the toy answers are one word: too short for BLEU, which is left out with the reason
    assert "eval_bleu" not in metrics and "BLEU omitted" in metrics["eval_generation_notes"][0]
    assert metrics["scale"] == "0-1"
    rows = [json.loads(x) for x in (runs["a"] / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["eval_generated_examples"] == metrics["examples"]
    assert {"prompt", "reference", "prediction", "exact_match", "rougeL", "score"} <= set(rows[0])
    assert rows[0]["prompt"][-1]["role"] == "user" and rows[0]["prompt"][-1]["content"].startswith("Repeat the word")
    assert json.loads((runs["a"] / "eval.json").read_text())["eval_loss"] == pytest.approx(metrics["eval_loss"])
    assert metrics["written"] == [str(runs["a"] / "eval.json"), str(runs["a"] / "predictions.jsonl")]


def _conversations(n):
    turns = [("Repeat the word: red", "red"), ("Now say it twice", "red red")]
    return [
        {
            "messages": [
                m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})
            ]
        }
    ] * n


def test_data_eval_writes_its_own_files_and_leaves_the_runs_alone(runs, tmp_path, capsys):
    from tunelab.cli import main

    run = shutil.copytree(runs["a"], tmp_path / "run")
    (run / "predictions.jsonl").write_text("the run's own predictions\n")
    own_eval = (run / "eval.json").read_bytes()
    data = tmp_path / "two_turns.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _conversations(3)))

    assert main(["eval", str(run), "--data", str(data)]) == 0  # progress on, but stderr is no terminal
    out, err = capsys.readouterr()
    metrics = json.loads(out)
    assert (run / "eval.json").read_bytes() == own_eval
    assert (run / "predictions.jsonl").read_text() == "the run's own predictions\n"
    written = [str(run / "eval-two_turns.json"), str(run / "predictions-two_turns.jsonl")]
    assert metrics["written"] == written and f"wrote {', '.join(written)}" in err
    assert "example/s" not in err and "it/s" not in err  # no progress bar
    saved = json.loads((run / "eval-two_turns.json").read_text())
    assert saved["data"] == str(data) and saved["eval_loss"] == pytest.approx(metrics["eval_loss"])
    rows = [json.loads(x) for x in (run / "predictions-two_turns.jsonl").read_text().splitlines()]
    # the whole conversation up to the evaluated (second) assistant turn, not only the last question
    assert [r["prompt"] for r in rows] == [_conversations(1)[0]["messages"][:3]] * 3
    assert [r["reference"] for r in rows] == ["red red"] * 3


def test_rows_use_the_aggregates_exact_match_and_the_bar_shows_on_a_terminal(runs, tmp_path, monkeypatch):
    """A prediction that differs from its reference only in inner whitespace counts in its row as in the total."""
    import tunelab.eval.run
    from tunelab.config import load_config
    from tunelab.data.formats import Example
    from tunelab.eval.run import generation_eval

    answers = {"q1": "New   York", "q2": "Paris", "q3": "wrong"}
    asked = []
    monkeypatch.setattr(
        tunelab.eval.run,
        "generate_batch",
        lambda model, tok, prompts, settings, *batch: (
            asked.extend(prompts) or [answers[p[-1]["content"]] for p in prompts]
        ),
    )
    examples = [
        Example(1, [{"role": "user", "content": "q1"}, {"role": "assistant", "content": " New York"}]),
        Example(2, [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "Paris"}]),
        Example(3, [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "Rome"}]),
    ]
    cfg = load_config(runs["a"] / "config.yaml")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for progress in (True, False):
        monkeypatch.setattr(sys, "stderr", Terminal())
        out = generation_eval(None, None, examples, cfg, tmp_path / "p.jsonl", progress=progress)
        assert ("generate: 100%" in sys.stderr.getvalue()) is progress
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["exact_match"] for r in rows] == [1.0, 1.0, 0.0]
    assert out["eval_exact_match"] == pytest.approx(2 / 3)
    assert asked[0] == examples[0].messages[:-1]


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


def test_batched_generation_equals_one_at_a_time(runs):
    """The evaluation answers in left-padded batches sorted by length; greedy answers (token ids, so the
    text too) equal one-at-a-time generation, in the prompts' order."""
    from helpers import toy_rows
    from tunelab.eval.run import batched_answers
    from tunelab.generation import GenerationSettings, generate_batch

    model, tok = tunelab.load(runs["a"])
    prompts = [
        [{"role": "user", "content": r["instruction"] + " please" * (i % 4)}] for i, r in enumerate(toy_rows(12))
    ]
    settings = GenerationSettings.greedy(8)
    alone = [generate_batch(model, tok, [p], settings)[0] for p in prompts]
    assert batched_answers(model, tok, prompts, settings, batch_size=5, progress=False) == alone
    assert len(set(alone)) > 1  # the prompts do not all get one answer: the order is checked too
