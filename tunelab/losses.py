"""Causal-LM loss as a token sum, so gradient accumulation can normalise by the effective batch.

The fast path never materialises full-vocabulary logits for every position: it runs the decoder,
keeps only hidden states at label positions, and applies the LM head and cross-entropy there in
chunks (each chunk recomputed in backward). It is used for architectures whose logits are exactly
lm_head(hidden); others (and methods that change the forward, e.g. prefixes) take the plain path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .data.encode import IGNORE_INDEX

# model types whose logits are exactly lm_head(final hidden state): no soft-capping or scaling
_PLAIN_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3"}
CHUNK = 1024  # label positions per LM-head chunk
# on an FSDP-sharded model: selected_loss_sum registered as a forward method, so the root's weights are gathered
SHARDED_LOSS = "tunelab_selected_loss_sum"


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_prompt_learning(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


# what a batch may hand the model besides input_ids (packed batches: positions and example boundaries)
_MODEL_KEYS = ("attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in _MODEL_KEYS if k in batch}


def supports_selected_loss(model) -> bool:
    if is_prompt_learning(model):  # peft adds virtual tokens in its own forward
        return False
    lm = _causal_lm(model)
    return getattr(getattr(lm, "config", None), "model_type", None) in _PLAIN_HEAD_TYPES and hasattr(lm, "get_decoder")


def plain_loss_sum(model, batch) -> torch.Tensor:
    """Sum of token NLL over label positions, from the model's full logits."""
    kwargs = model_inputs(batch)
    logits = model(input_ids=batch["input_ids"], **kwargs).logits
    # prompt/P-tuning prepend virtual-token positions to the logits: keep the real ones
    logits = logits[:, -batch["input_ids"].shape[1] : -1].float()
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _head_ce_sum(hidden, weight, bias, targets):
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def selected_loss_sum(model, batch, chunk: int = CHUNK) -> torch.Tensor:
    """Same value as plain_loss_sum, computing the LM head only on label positions, chunk by chunk."""
    lm = _causal_lm(model)
    kwargs = model_inputs(batch)
    hidden = lm.get_decoder()(input_ids=batch["input_ids"], **kwargs).last_hidden_state
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    hidden = hidden[:, :-1][mask]
    targets = labels[mask]
    head = lm.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled() and targets.numel() > chunk:
            total = total + checkpoint(_head_ce_sum, h, head.weight, head.bias, t, use_reentrant=False)
        else:
            total = total + _head_ce_sum(h, head.weight, head.bias, t)
    return total


def classification_loss_sum(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if "weights" in batch:  # train.class_weights: auto; per example, so the sum is still normalised by examples
        losses = F.cross_entropy(logits.float(), batch["labels"], reduction="none")
        return (losses * batch["weights"].to(losses.device)).sum()
    return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")


def loss_sum(model, batch, fast: bool = True) -> torch.Tensor:
    """Summed loss of a batch: per answer token for LMs, per example for classification (1-D labels).
    A batch with `loss_weight` 0 is a filler pass (FSDP: ranks run as many passes); its loss counts zero."""
    if batch["labels"].dim() == 1:
        total = classification_loss_sum(model, batch)
    elif fast and supports_selected_loss(model):
        sharded = getattr(model, SHARDED_LOSS, None)
        total = sharded(batch) if sharded is not None else selected_loss_sum(model, batch)
    else:
        total = plain_loss_sum(model, batch)
    return total * batch["loss_weight"] if "loss_weight" in batch else total


def _head_logps(hidden, weight, bias, targets):
    logits = F.linear(hidden, weight, bias).float()
    return -F.cross_entropy(logits, targets, reduction="none")


def label_logps(model, batch, fast: bool = True, chunk: int = CHUNK) -> torch.Tensor:
    """Log-probability of every label token (labels shifted by one), in the order of
    `batch["labels"][:, 1:] != -100` flattened row by row: the pieces of a sequence log-prob."""
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    targets = labels[mask]
    if not (fast and supports_selected_loss(model)):
        logits = model(input_ids=batch["input_ids"], **model_inputs(batch)).logits
        logits = logits[:, -batch["input_ids"].shape[1] : -1][mask].float()  # virtual tokens first (prompt tuning)
        return torch.gather(logits.log_softmax(-1), 1, targets[:, None]).squeeze(1)
    lm = _causal_lm(model)
    hidden = lm.get_decoder()(input_ids=batch["input_ids"], **model_inputs(batch)).last_hidden_state[:, :-1][mask]
    head = lm.get_output_embeddings()
    parts = []
    for start in range(0, targets.numel(), chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled() and targets.numel() > chunk:
            parts.append(checkpoint(_head_logps, h, head.weight, head.bias, t, use_reentrant=False))
        else:
            parts.append(_head_logps(h, head.weight, head.bias, t))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
