"""Causal-LM loss as a token sum, so gradient accumulation can normalise by the effective batch.

The fast path never materialises full-vocabulary logits for every position: it runs the decoder,
keeps only hidden states at label positions, and applies the LM head and cross-entropy there in
chunks (fused, Liger-style). It is used for architectures whose logits are exactly lm_head(hidden).
Prompt learning (prefix, prompt and P-tuning: peft adds the virtual tokens in its own forward) takes it
too, through peft's forward with the LM head bypassed. Other architectures take the plain path, which
still asks the model for the logits from the first label position on only (`logits_to_keep`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .data.encode import IGNORE_INDEX

# model types whose logits are exactly lm_head(final hidden state): no soft-capping or scaling
_PLAIN_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3"}
CHUNK = 256  # label positions per LM-head chunk: 50 MB of fp32 logits at a 49,152 vocabulary
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


def _plain_head(model) -> bool:
    """Whether the causal LM's logits are exactly lm_head(its decoder's last hidden state)."""
    return getattr(getattr(_causal_lm(model), "config", None), "model_type", None) in _PLAIN_HEAD_TYPES


def supports_selected_loss(model) -> bool:
    """Whether the decoder can be called on its own for the hidden states at label positions (not under prompt
    learning, whose virtual tokens peft adds in its own forward)."""
    return not is_prompt_learning(model) and _plain_head(model) and hasattr(_causal_lm(model), "get_decoder")


def head_on_labels(model) -> bool:
    """Whether the loss can run the LM head on label positions only (label_hidden). Not prompt learning on an
    FSDP-sharded model: its loss runs as a registered forward method of the root (SHARDED_LOSS), which calls the
    decoder, not the root's own forward that peft's virtual tokens need."""
    if supports_selected_loss(model):
        return True
    return is_prompt_learning(model) and _plain_head(model) and getattr(model, SHARDED_LOSS, None) is None


def _keeps_logits(model) -> bool:
    """Whether the causal LM's forward takes `logits_to_keep` (transformers' LMs: the head runs on the last
    k positions only)."""
    return _forward_keeps_logits(type(_causal_lm(model)))


@functools.cache
def _forward_keeps_logits(cls) -> bool:  # once per model class, not on every micro-batch
    try:
        return "logits_to_keep" in inspect.signature(cls.forward).parameters
    except (AttributeError, TypeError, ValueError):
        return False


def label_suffix(labels: torch.Tensor) -> int:
    """How many last positions of the logits a loss needs: from the one before the first label in any row
    to the end (0: no labels). Prompt learning prepends virtual tokens at the front, so a suffix of the
    logits is a suffix of the real positions whatever their number."""
    has = (labels[:, 1:] != IGNORE_INDEX).any(0)
    if not bool(has.any()):
        return 0
    return labels.shape[1] - int(has.nonzero()[0])


def _label_outputs(model, batch, suffix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's outputs (`.logits`) at the positions that predict each label, with the labels they predict
    (shifted). With `suffix` the head runs on the positions from the first label on only (the prompt's are never
    used): the same numbers, without full-vocabulary logits for every prompt token."""
    ids, labels = batch["input_ids"], batch["labels"]
    kwargs = model_inputs(batch)
    keep = label_suffix(labels) if suffix and _keeps_logits(model) else 0
    if keep:
        kwargs["logits_to_keep"] = keep
    logits = model(input_ids=ids, **kwargs).logits
    width = keep or ids.shape[1]  # prompt/P-tuning prepend virtual-token positions to the logits: keep the real ones
    return logits[:, -width:-1], labels[:, labels.shape[1] - width + 1 :]


def label_logits(model, batch, suffix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits at the positions that predict each label, with the labels they predict (shifted)."""
    logits, labels = _label_outputs(model, batch, suffix)
    return logits.float(), labels


@contextlib.contextmanager
def _head_bypassed(lm):
    """The causal LM's forward returns its last hidden states as `.logits` (its LM head an identity meanwhile)."""
    head = lm.get_output_embeddings()
    lm.set_output_embeddings(torch.nn.Identity())
    try:
        yield head
    finally:
        lm.set_output_embeddings(head)


def label_hidden(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    """(hidden states at the positions that predict each label [N, H], those labels [N], the LM head), row by
    row, for a model where head_on_labels: from the decoder alone, or, under prompt learning, from peft's own
    forward with the head bypassed (its virtual tokens added as in training; the head then runs on label
    positions only, as on the decoder path)."""
    lm = _causal_lm(model)
    if supports_selected_loss(model):
        hidden = lm.get_decoder()(input_ids=batch["input_ids"], **model_inputs(batch)).last_hidden_state[:, :-1]
        labels = batch["labels"][:, 1:]
        head = lm.get_output_embeddings()
    else:
        with _head_bypassed(lm) as head:
            hidden, labels = _label_outputs(model, batch)
    mask = labels != IGNORE_INDEX
    return hidden[mask], labels[mask], head


def plain_loss_sum(model, batch, suffix: bool = True) -> torch.Tensor:
    """Sum of token NLL over label positions, from the model's logits (all of them with suffix=False)."""
    logits, labels = label_logits(model, batch, suffix)
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would pick here (the tensor's own dtype outside autocast)."""
    kind = tensor.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else tensor.dtype


class FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ W^T + b, target_i), chunk by chunk, with the gradients computed in the forward
    (Liger's fused linear cross-entropy): per chunk the logits are made, turned into the loss and into
    d(loss)/d(logits) = softmax - onehot, and dropped; only d(loss)/d(hidden) (N x hidden) is kept for the
    backward. So no (N x vocab) tensor outlives a chunk and nothing is recomputed in backward. Logits,
    log-sum-exp and softmax are fp32; the matmuls run in `dtype` (the autocast dtype: bf16 on native CPUs),
    a trainable head's gradient accumulates in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, dtype: torch.dtype):
        w = frozen_cast(weight, dtype)
        b = frozen_cast(bias, dtype) if bias is not None else None
        train_head = weight.requires_grad
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if train_head else None
        grad_b = (
            torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if train_head and b is not None else None
        )
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        low, f32 = _logit_workspace(weight, min(chunk, targets.numel()), dtype)
        for start in range(0, targets.numel(), chunk):
            h = hidden[start : start + chunk].to(dtype)
            t = targets[start : start + chunk]
            n = t.numel()
            logits = f32[:n]
            _linear_into(low[:n], h, w, b)
            if low is not f32:
                logits.copy_(low[:n])
            target_logit = logits.gather(1, t[:, None]).squeeze(1)
            # log-sum-exp and softmax in place on the one chunk (torch.logsumexp allocates its own shifted
            # copy and exponentiates it again: 2.5x the time of this at smollm2's vocabulary, and one more
            # chunk-sized buffer at the peak)
            row_max = logits.amax(dim=1, keepdim=True)
            exp = logits.sub_(row_max).exp_()
            row_sum = exp.sum(dim=1, keepdim=True)
            total += (row_max + row_sum.log()).squeeze(1).sub_(target_logit).sum()
            # d(sum CE)/d(logits), in place: softmax minus the one-hot target
            grad = exp.div_(row_sum)
            grad[torch.arange(n, device=t.device), t] -= 1.0
            if low is not f32:
                grad = low[:n].copy_(grad)
            if grad_hidden.dtype == dtype:
                torch.mm(grad, w, out=grad_hidden[start : start + chunk])
            else:
                grad_hidden[start : start + chunk] = grad @ w
            if grad_w is not None:
                grad_w += (grad.t() @ h).float()
                if grad_b is not None:
                    grad_b += grad.float().sum(0)
        ctx.save_for_backward(grad_hidden, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_w, grad_b = ctx.saved_tensors
        gw = (grad_w * grad_out) if grad_w is not None else None
        gb = (grad_b * grad_out) if grad_b is not None else None
        return grad_hidden * grad_out.to(grad_hidden.dtype), gw, gb, None, None, None


def _linear_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if bias is None:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.addmm(bias, x, weight.t(), out=out)


def _logit_workspace(head: torch.Tensor, rows: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows x vocab) buffers for a chunk's logits in `dtype` and in fp32 (one buffer when dtype is fp32), kept
    on the head's weight and reused by every chunk and step: a fresh chunk-sized buffer is a fresh mapping whose
    pages fault in on first write (an fp32 chunk of 381 x 49,152 from bf16: 17 ms to allocate and fill, 3 ms to refill). They
    grow to the largest chunk seen, never past `CHUNK` rows, which the estimator counts at the peak anyway."""
    vocab = head.shape[0]
    kept = getattr(head, "_tunelab_logit_workspace", None)
    if kept is not None and kept[0].dtype == dtype and kept[0].shape[0] >= rows and kept[0].device == head.device:
        return kept
    rows = max(rows, kept[0].shape[0] if kept is not None and kept[0].dtype == dtype else 0)
    f32 = torch.empty(rows, vocab, dtype=torch.float32, device=head.device)
    kept = (f32 if dtype == torch.float32 else torch.empty(rows, vocab, dtype=dtype, device=head.device), f32)
    head._tunelab_logit_workspace = kept
    return kept


def frozen_cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`; a frozen tensor's cast is made once and kept (on the tensor) while it is
    unchanged, so a tied fp32 embedding serving as a bf16 LM head is not cast again every step."""
    if tensor.dtype == dtype:
        return tensor
    if tensor.requires_grad:
        return tensor.to(dtype)
    key = (tensor._version, dtype)
    cached = getattr(tensor, "_tunelab_cast", None)
    if cached is None or cached[0] != key:
        cached = (key, tensor.detach().to(dtype))
        tensor._tunelab_cast = cached
    return cached[1]


def _head_ce_sum(hidden, weight, bias, targets):
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def head_ce_sum(hidden, head, targets, chunk: int = CHUNK) -> torch.Tensor:
    """Summed cross-entropy of lm_head(hidden) against targets, never all the logits at once: fused per
    chunk when gradients flow, plain chunks otherwise (evaluation)."""
    dtype = _compute_dtype(hidden)
    if torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad):
        with torch.autocast(hidden.device.type, enabled=False):  # the Function casts by itself, once per call
            return FusedLinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk, dtype)
    weight = frozen_cast(head.weight, dtype)
    bias = frozen_cast(head.bias, dtype) if head.bias is not None else None
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk):
        total = total + _head_ce_sum(
            hidden[start : start + chunk].to(dtype), weight, bias, targets[start : start + chunk]
        )
    return total


def selected_loss_sum(model, batch, chunk: int = CHUNK) -> torch.Tensor:
    """Same value as plain_loss_sum, computing the LM head only on label positions, chunk by chunk."""
    hidden, targets, head = label_hidden(model, batch)
    return head_ce_sum(hidden, head, targets, chunk)


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
    elif fast and head_on_labels(model):
        sharded = getattr(model, SHARDED_LOSS, None)
        total = sharded(batch) if sharded is not None else selected_loss_sum(model, batch)
    else:
        total = plain_loss_sum(model, batch, suffix=fast)
    return total * batch["loss_weight"] if "loss_weight" in batch else total


def _head_logps(hidden, weight, bias, targets):
    logits = F.linear(hidden, weight, bias).float()
    return -F.cross_entropy(logits, targets, reduction="none")


def label_logps(model, batch, fast: bool = True, chunk: int = CHUNK) -> torch.Tensor:
    """Log-probability of every label token (labels shifted by one), in the order of
    `batch["labels"][:, 1:] != -100` flattened row by row: the pieces of a sequence log-prob."""
    if not (fast and head_on_labels(model)):
        logits, shifted = label_logits(model, batch, suffix=fast)
        labelled = shifted != IGNORE_INDEX
        targets, logits = shifted[labelled], logits[labelled]  # row by row
        return torch.gather(logits.log_softmax(-1), 1, targets[:, None]).squeeze(1)
    hidden, targets, head = label_hidden(model, batch)
    parts = []
    for start in range(0, targets.numel(), chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled() and targets.numel() > chunk:
            parts.append(checkpoint(_head_logps, h, head.weight, head.bias, t, use_reentrant=False))
        else:
            parts.append(_head_logps(h, head.weight, head.bias, t))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
