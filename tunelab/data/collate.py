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
        if "weight" in examples[0]:  # train.class_weights: auto
            batch["weights"] = torch.tensor([e["weight"] for e in examples], dtype=torch.float32)
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


def example_loss_tokens(example: dict) -> int:
    """One example's share of count_loss_tokens (the same count, however examples are batched)."""
    if "label" in example:
        return 1
    return sum(1 for x in example["labels"][1:] if x != IGNORE_INDEX)


def count_loss_tokens(batch: dict) -> int:
    """Tokens that contribute to the loss (labels shifted by one: the first position predicts nothing);
    for classification, the number of examples."""
    if batch["labels"].dim() == 1:
        return int(batch["labels"].numel())
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: example indices grouped into rows of at most `capacity` tokens.
    Deterministic (ties keep input order), so a resumed run packs the same rows."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return rows


def packed_batch(examples: list[dict], rows: list[list[int]], pad_id: int, mask_dtype=None) -> dict:
    """Padding-free batch: each row holds several examples, position ids restart per example, and a
    4-D block-diagonal causal mask keeps attention inside each example (position ids alone do not
    isolate sequences under sdpa/eager). `mask_dtype=None` gives a boolean mask (sdpa: True = attend);
    a float dtype gives the additive mask eager attention expects.

    The first token of every example gets label -100: under the one-token shift it would otherwise be
    predicted from the previous example's last token. Unpacked, that token is never a target either."""
    width = max(sum(len(examples[i]["input_ids"]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    # segment id per token; each padding token is its own segment so no query row is fully masked
    segment = torch.arange(width).repeat(len(rows), 1) + len(examples)
    for r, row in enumerate(rows):
        start = 0
        for seg, i in enumerate(row):
            n = len(examples[i]["input_ids"])
            input_ids[r, start : start + n] = torch.tensor(examples[i]["input_ids"])
            labels[r, start + 1 : start + n] = torch.tensor(examples[i]["labels"][1:])
            position_ids[r, start : start + n] = torch.arange(n)
            segment[r, start : start + n] = seg
            start += n
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal  # (rows, q, kv)
    if mask_dtype is None:
        mask = allowed[:, None]
    else:
        mask = torch.zeros(allowed.shape, dtype=mask_dtype).masked_fill_(~allowed, torch.finfo(mask_dtype).min)[:, None]
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask}


def varlen_batch(examples: list[dict]) -> dict:
    """All examples back to back in one row, no padding: position ids restart per example and
    `cu_seq_lens_q` holds the boundaries, for attention that runs per example (tunelab.attention,
    flash-attention varlen). First tokens get label -100, as in packed_batch."""
    lengths = [len(e["input_ids"]) for e in examples]
    input_ids = torch.tensor([x for e in examples for x in e["input_ids"]]).unsqueeze(0)
    labels = torch.tensor([x for e in examples for x in [IGNORE_INDEX] + list(e["labels"][1:])]).unsqueeze(0)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    bounds = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "cu_seq_lens_q": bounds,
        "cu_seq_lens_k": bounds,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
    }
