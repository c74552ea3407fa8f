"""Batching: dynamic padding to the longest example of each micro-batch."""

from __future__ import annotations

import torch

from .encode import IGNORE_INDEX


def pad_batch(examples: list[dict], pad_id: int) -> dict:
    """Right-pad input ids (pad_id), labels (-100) and build the attention mask.
    Classification examples (a `label` per example) get a 1-D `labels` tensor of class ids."""
    if "label" in examples[0]:
        batch = pad_batch([{"input_ids": e["input_ids"], "labels": e["input_ids"]} for e in examples], pad_id)
        batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
        return batch
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def count_loss_tokens(batch: dict) -> int:
    """Tokens that contribute to the loss (labels shifted by one: the first position predicts nothing);
    for classification, the number of examples."""
    if batch["labels"].dim() == 1:
        return int(batch["labels"].numel())
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
