"""Eval loss and perplexity, token-weighted over the whole split (not a mean of batch means).
For classification: mean loss per example and accuracy."""

from __future__ import annotations

import contextlib
import math

import torch

from ..data.collate import count_loss_tokens, pad_batch
from ..losses import loss_sum
from ..methods.lora import dora_norms_cached
from .metrics import classification_metrics


def _classification_scores(model, y_true, y_pred, probs) -> dict:
    """Accuracy, macro/weighted P/R/F1, ROC AUC and the confusion matrix as eval_* entries."""
    id2label = getattr(model.config, "id2label", None) or {}
    names = [str(id2label.get(i, i)) for i in range(probs.shape[1])]
    m = classification_metrics(y_true, y_pred, probs, names)
    keys = [
        "accuracy",
        "precision_macro",
        "recall_macro",
        "f1_macro",
        "precision_weighted",
        "recall_weighted",
        "f1_weighted",
    ]
    out = {f"eval_{k}": m[k] for k in keys}
    if m.get("roc_auc") is not None:
        out["eval_auc"] = m["roc_auc"]
    out["eval_confusion_matrix"] = m["confusion_matrix"]
    out["eval_classification_warnings"] = m["warnings"]  # why eval_auc is missing (a class absent from the split)
    return out


@torch.no_grad()
def evaluate_loss(model, examples: list[dict], pad_id: int, batch_size: int = 8, device=None, autocast=None) -> dict:
    """{'eval_loss', 'eval_ppl', 'eval_tokens'} (LM) or {'eval_loss', 'eval_accuracy', 'eval_examples'}
    (classification) over all examples; empty dict when there are none."""
    if not examples:
        return {}
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    y_true, y_pred, probs = [], [], []
    classification = "label" in examples[0]
    device = device or next(model.parameters()).device
    with dora_norms_cached(model):  # a DoRA model: merged weight norms once, not per batch
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in pad_batch(examples[start : start + batch_size], pad_id).items()}
            with autocast or contextlib.nullcontext():
                if classification:
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
                    total += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
                    y_true += batch["labels"].tolist()
                    y_pred += logits.argmax(-1).tolist()
                    probs.append(logits.softmax(-1).cpu())
                else:
                    total += float(loss_sum(model, batch))
            tokens += count_loss_tokens(batch)
    model.train(was_training)
    mean = total / max(tokens, 1)
    if classification:
        return {
            "eval_loss": mean,
            **_classification_scores(model, y_true, y_pred, torch.cat(probs).numpy()),
            "eval_examples": tokens,
        }
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0)), "eval_tokens": tokens}
