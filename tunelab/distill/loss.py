"""The knowledge-distillation loss (Hinton et al. 2015), as a sum the training loop normalises like any loss.

Per label position (causal LM: every completion token; classification: every example), with teacher logits
t, student logits s, temperature T and weight alpha:

    loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, label)
           [+ beta * mean over block boundaries of (1 - cos(student hidden, teacher hidden))]

The bracketed term (distill.hidden_weight = beta; a student cut from the teacher, causal LM) is DistilBERT's
cosine loss: each kept block's output is pulled towards the teacher's hidden state at the boundary it stands for.
T^2 keeps the soft term's gradient on the scale of the hard one's as T grows. A cached teacher is its k
largest logits per position (values, vocabulary ids): its distribution is renormalised over those k, and the
KL sums over them against the student's full-vocabulary log-probs.

For causal LMs the LM heads run only at label positions, in chunks (each student chunk recomputed in
backward), as the plain fine-tuning loss does (tunelab.losses): full-vocabulary logits of every position are
never held, neither the teacher's nor the student's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.encode import IGNORE_INDEX
from ..losses import CHUNK, _causal_lm, label_logits, model_inputs, supports_selected_loss

TopK = tuple[torch.Tensor, torch.Tensor]  # (values, vocabulary ids), each (positions, k)


@dataclass
class KDSums:
    """A micro-batch's summed terms: `total` (what backward runs on) and, detached, the KL, CE and hidden-state
    (distill.hidden_weight) sums."""

    total: torch.Tensor
    kl_sum: float
    ce_sum: float
    hidden_sum: float = 0.0


def kd_terms(student_logits: torch.Tensor, teacher, targets: torch.Tensor, temperature: float):
    """(KL sum, CE sum) over positions; `teacher` is full logits like the student's or a TopK pair.
    KL is KL(teacher_T || student_T) at temperature T, CE the student's plain cross-entropy (T = 1)."""
    s = student_logits.float()
    log_q = F.log_softmax(s / temperature, dim=-1)
    if isinstance(teacher, tuple):
        values, ids = teacher
        log_p = F.log_softmax(values.float() / temperature, dim=-1)
        log_q = log_q.gather(-1, ids.long())
    else:
        log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    ce = F.cross_entropy(s, targets, reduction="sum")
    return kl, ce


def _combine(kl, ce, temperature: float, alpha: float):
    return alpha * temperature**2 * kl + (1 - alpha) * ce


def kd_mask(batch: dict, every_position: bool = False) -> torch.Tensor:
    """[rows, length - 1] positions whose next token the KD loss scores: the label positions, or with
    `every_position` each real token whose next token is in the same example (the prompt's too; not across
    padding or the boundary of two packed examples, where position_ids start again at 0)."""
    labels = batch["labels"][:, 1:]
    if not every_position:
        return labels != IGNORE_INDEX
    mask = torch.ones_like(labels, dtype=torch.bool)
    if "attention_mask" in batch:
        real = batch["attention_mask"].bool()
        mask &= real[:, 1:] & real[:, :-1]
    if "position_ids" in batch:
        mask &= batch["position_ids"][:, 1:] != 0
    return mask


def label_features(model, batch: dict, layers: bool = False, mask: torch.Tensor | None = None):
    """What becomes the logits at every label position (labels shifted by one, row-major; or at `mask`, a
    kd_mask, on the fast path): on the fast path (hidden states [N, H], LM head, None); else (logits [N, V],
    None, None) from the model's full forward. With `layers` (fast path only) the third item is every layer's
    hidden states at those positions: the embeddings', each block's output, the final norm's (transformers'
    `hidden_states`)."""
    labels = batch["labels"][:, 1:]
    if mask is not None and not supports_selected_loss(model):
        raise ValueError("distill.kd_positions: all needs a model with the label-position path (a llama-style LM)")
    mask = labels != IGNORE_INDEX if mask is None else mask
    if supports_selected_loss(model):
        lm = _causal_lm(model)
        out = lm.get_decoder()(input_ids=batch["input_ids"], **model_inputs(batch), output_hidden_states=layers)
        every = [h[:, :-1][mask] for h in out.hidden_states] if layers else None
        return out.last_hidden_state[:, :-1][mask], lm.get_output_embeddings(), every
    if layers:
        raise ValueError("distill.hidden_weight needs a model with the label-position path (a llama-style LM)")
    logits, shifted = label_logits(model, batch)  # prompt learning: from the first label position on
    return logits[shifted != IGNORE_INDEX], None, None


def block_pairs(teacher_blocks: int, keep_every: int) -> list[tuple[int, int]]:
    """(student, teacher) indices into `hidden_states` that should agree in a student of blocks 0, k, 2k, ...:
    student block j stands for teacher blocks kept[j] .. kept[j+1] - 1, so its output (hidden_states[j + 1])
    is matched with the teacher's input to block kept[j + 1]; the last outputs (after the final norm) with the
    teacher's last."""
    from ..blocks import every_kth

    kept = every_kth(teacher_blocks, keep_every)
    return [(j, kept[j]) for j in range(1, len(kept))] + [(len(kept), teacher_blocks)]


def hidden_distance_sum(student_layers, teacher_layers, pairs) -> torch.Tensor:
    """Sum over positions of the mean, over `pairs`, of 1 - cos(student, teacher) (DistilBERT's cosine loss)."""
    distances = [
        1 - F.cosine_similarity(student_layers[i].float(), teacher_layers[j].float(), dim=-1) for i, j in pairs
    ]
    return torch.stack(distances).mean(0).sum()


def _logits(features, head):
    return features if head is None else F.linear(features, head.weight, head.bias)


def _student_chunk(features, weight, bias, teacher, targets, temperature, alpha):
    logits = features if weight is None else F.linear(features, weight, bias)
    kl, ce = kd_terms(logits, teacher, targets, temperature)
    return torch.stack([_combine(kl, ce, temperature, alpha), kl, ce])


def lm_kd_sums(
    student,
    batch: dict,
    teacher,
    temperature: float,
    alpha: float,
    chunk: int = CHUNK,
    hidden_weight: float = 0.0,
    pairs: list[tuple[int, int]] | None = None,
    every_position: bool = False,
) -> KDSums:
    """The KD loss summed over a causal-LM micro-batch's label tokens. `teacher`: a model (run here without
    gradients, on the same batch), or cached logits (a TopK pair, or full logits) of the batch's label positions.
    With `hidden_weight` (a live teacher) hidden_weight x hidden_distance_sum over `pairs` is added. With
    `every_position` (a live teacher) the KL and hidden terms cover every position of kd_mask; the CE term
    stays on the labels (IGNORE_INDEX elsewhere adds nothing to it)."""
    mask = kd_mask(batch, every_position) if every_position else None
    labels = batch["labels"][:, 1:]
    targets = labels[labels != IGNORE_INDEX if mask is None else mask]
    layers = hidden_weight > 0
    features, head, s_layers = label_features(student, batch, layers, mask)
    if isinstance(teacher, torch.nn.Module):
        with torch.no_grad():
            t_features, t_head, t_layers = label_features(teacher, batch, layers, mask)
    else:
        t_features, t_head, t_layers = teacher, None, None
    weight, bias = (head.weight, head.bias) if head is not None else (None, None)
    sums = features.new_zeros(3, dtype=torch.float32)
    for start in range(0, targets.numel(), chunk):
        part = slice(start, start + chunk)
        if isinstance(t_features, tuple):
            t_part = (t_features[0][part], t_features[1][part])
        else:
            with torch.no_grad():
                t_part = _logits(t_features[part], t_head)
        args = (features[part], weight, bias, t_part, targets[part], temperature, alpha)
        if torch.is_grad_enabled() and targets.numel() > chunk:
            sums = sums + checkpoint(_student_chunk, *args, use_reentrant=False)
        else:
            sums = sums + _student_chunk(*args)
    if not layers:
        return KDSums(sums[0], float(sums[1].detach()), float(sums[2].detach()))
    hidden = hidden_distance_sum(s_layers, t_layers, pairs)
    total = sums[0] + hidden_weight * hidden
    return KDSums(total, float(sums[1].detach()), float(sums[2].detach()), float(hidden.detach()))


def classification_kd_sums(student, batch: dict, teacher, temperature: float, alpha: float) -> KDSums:
    """The KD loss summed over a classification micro-batch's examples (`teacher`: a model, or its cached
    logits of these examples); with `weights` (train.class_weights)
    each example's CE term is weighted, as in plain training."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits = student(**inputs).logits.float()
    if isinstance(teacher, torch.nn.Module):
        with torch.no_grad():
            t_logits = teacher(**inputs).logits
    else:
        t_logits = teacher
    kl, ce = kd_terms(logits, t_logits, batch["labels"], temperature)
    if "weights" in batch:
        ce = (F.cross_entropy(logits, batch["labels"], reduction="none") * batch["weights"].to(logits.device)).sum()
    return KDSums(_combine(kl, ce, temperature, alpha), float(kl.detach()), float(ce.detach()))


def kd_sums(
    student,
    batch: dict,
    teacher,
    temperature: float,
    alpha: float,
    hidden_weight: float = 0.0,
    pairs=None,
    every_position: bool = False,
) -> KDSums:
    """Causal LM (2-D labels) or classification (1-D labels); a filler pass (`loss_weight` 0) counts zero."""
    if batch["labels"].dim() == 1:
        sums = classification_kd_sums(student, batch, teacher, temperature, alpha)
    else:
        sums = lm_kd_sums(
            student,
            batch,
            teacher,
            temperature,
            alpha,
            hidden_weight=hidden_weight,
            pairs=pairs,
            every_position=every_position,
        )
    if "loss_weight" in batch:
        sums.total = sums.total * batch["loss_weight"]
    return sums
