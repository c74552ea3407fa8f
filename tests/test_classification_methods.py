"""Every method on tiny-bert as a sequence classifier: it learns, reloads exactly, keeps its label map."""

import json
import random

import pytest
import torch

import tunelab
from helpers import TINY_LR, only_method_sections
from tunelab.config import build_config, load_config
from tunelab.errors import DataError
from tunelab.training.loop import Trainer

SYMPTOMS = {
    "cardio": ["chest pain", "palpitations", "心悸"],
    "neuro": ["headache", "dizziness", "头痛"],
    "derm": ["rash", "itching", "皮疹"],
}


@pytest.fixture(scope="module")
def triage(tmp_path_factory):
    rng = random.Random(0)
    rows = []
    for _ in range(48):
        label = rng.choice(sorted(SYMPTOMS))
        rows.append(
            {"text": f"patient reports {rng.choice(SYMPTOMS[label])} for {rng.randint(1, 9)} days", "label": label}
        )
    path = tmp_path_factory.mktemp("cls") / "triage.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def config(tmp_path, data, method):
    return build_config(
        only_method_sections(
            {
                "model": "tiny-bert",
                "task": "classification",
                "method": method,
                "out_dir": str(tmp_path / "runs"),
                "run_name": method,
                "data": {"train": str(data), "val_fraction": 0.25, "max_length": 32},
                "train": {
                    "max_steps": 30,
                    "batch_size": 8,
                    "precision": "fp32",
                    "warmup_ratio": 0,
                    "lr": TINY_LR[method],
                },
                "lora": {"target_modules": ["query", "value"], "r": 8},
                "adapter": {"reduction": 4},
                "prefix": {"num_virtual_tokens": 4},
                "prompt": {"num_virtual_tokens": 4},
                "ptuning": {"num_virtual_tokens": 4},
                "adalora": {"target_modules": ["query", "value"]},
            }
        )
    )


@pytest.mark.parametrize("method", sorted(TINY_LR))
def test_classifier_learns_and_reloads_exactly(tmp_path, triage, method):
    trainer = Trainer(config(tmp_path, triage, method), progress=False)
    result = trainer.run()
    losses = [json.loads(x)["loss"] for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.02, losses
    assert 0 <= result.summary["eval"]["eval_accuracy"] <= 1
    assert load_config(result.run_dir / "config.yaml").data.labels == ["cardio", "derm", "neuro"]
    assert (result.run_dir / "plots" / "confusion_matrix.png").exists()

    ids = torch.tensor([[101, 2000, 3000, 4000, 102]])
    trainer.model.eval()
    with torch.no_grad():
        before = trainer.model(input_ids=ids).logits
    model, _ = tunelab.load(result.run_dir)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert after.shape == (1, 3)
    assert (after - before).abs().max() < 1e-5


def test_eval_label_unseen_in_training_is_a_clear_error(tmp_path, triage):
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text('{"text": "fever", "label": "infectious"}\n', encoding="utf-8")
    cfg = config(tmp_path, triage, "lora")
    cfg.data.eval = str(held_out)
    with pytest.raises(DataError, match=r"eval.jsonl:1: field 'label'.*infectious"):
        Trainer(cfg, progress=False)
    assert not (tmp_path / "runs").exists()


def test_text_label_data_needs_the_classification_task(tmp_path, triage):
    from tunelab.errors import ConfigError

    cfg = config(tmp_path, triage, "lora")
    cfg.task = "causal_lm"
    cfg.model = "tiny-llama"
    with pytest.raises(ConfigError, match="task: classification"):
        Trainer(cfg, progress=False)


def test_classification_eval_reports_sklearn_metrics(tmp_path, triage):
    from sklearn.metrics import f1_score

    from tunelab.eval.loss import evaluate_loss

    trainer = Trainer(config(tmp_path, triage, "lora"), progress=False)
    trainer.run()
    trainer.model.eval()  # the reference predictions below must not draw dropout
    metrics = evaluate_loss(trainer.model, trainer.data.val, trainer.pad_id)
    logits = []
    with torch.no_grad():
        for ex in trainer.data.val:
            logits.append(trainer.model(input_ids=torch.tensor([ex["input_ids"]])).logits[0])
    y_pred = [int(x.argmax()) for x in logits]
    y_true = [ex["label"] for ex in trainer.data.val]
    assert metrics["eval_f1_macro"] == pytest.approx(
        f1_score(y_true, y_pred, average="macro", labels=[0, 1, 2], zero_division=0)
    )
    assert metrics["eval_accuracy"] == pytest.approx(sum(a == b for a, b in zip(y_true, y_pred)) / len(y_true))
    assert sum(map(sum, metrics["eval_confusion_matrix"])) == len(y_true) == metrics["eval_examples"]


def test_causal_lm_as_a_classifier(tmp_path, write_jsonl):
    rows = [
        {"text": f"{w} item {i}", "label": "warm" if w in ("red", "orange") else "cold"}
        for i in range(20)
        for w in ("red", "orange", "blue", "teal")
    ]
    result = tunelab.train(
        {
            "model": "tiny-llama",
            "task": "classification",
            "out_dir": str(tmp_path / "runs"),
            "data": {"train": str(write_jsonl(rows)), "max_length": 16},
            "train": {"max_steps": 20, "lr": 1e-2, "batch_size": 8, "precision": "fp32"},
        },
        progress=False,
    )
    assert result.summary["eval"]["eval_accuracy"] >= 0.9
    from tunelab.eval.run import evaluate_run

    metrics = evaluate_run(str(result.run_dir))
    assert metrics["eval_accuracy"] == pytest.approx(result.summary["eval"]["eval_accuracy"])
    assert metrics["eval_latency_p95_ms"] >= metrics["eval_latency_p50_ms"] > 0
