"""Preference objectives: sequence log-probs of answer pairs, the DPO / IPO / ORPO / SimPO losses, reward metrics.

A micro-batch holds the sequences of its pairs in the order chosen_0, rejected_0, chosen_1, ...; every
label token carries its sequence's index (`seq_ids`), so padded rows and packed rows give the same sums.
Per pair, with log-probs summed over the answer's tokens (policy l, reference r, answers c and w):
  DPO  (Rafailov et al. 2023)  h = beta ((l_c - r_c) - (l_w - r_w)),  loss = -(1 - eps) logsig(h) - eps logsig(-h)
       eps = label_smoothing: conservative DPO (the DPO authors' code; TRL's sigmoid loss before 1.0)
  IPO  (Azar et al. 2023)      loss = ((l_c - r_c) / |c| - (l_w - r_w) / |w| - 1 / (2 beta))^2  (per-token ratios, as TRL)
  ORPO (Hong et al. 2024)      mean per-token log-probs m; log odds = (m_c - m_w) - (log(1 - e^m_c) - log(1 - e^m_w))
       loss = NLL of the chosen answers' tokens - lambda logsig(log odds); no reference model
  SimPO (Meng et al. 2024)     h = beta (m_c - m_w) - gamma (mean per-token log-probs m, a target margin gamma),
       loss = -(1 - eps) logsig(h) - eps logsig(-h) (TRL's CPOTrainer loss_type="simpo"); no reference model
Rewards: beta x log-ratio (DPO, IPO), lambda x mean log-prob (ORPO), beta x mean log-prob (SimPO), as TRL logs them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import varlen_attention
from .data.encode import IGNORE_INDEX
from .losses import label_logps

REFERENCE_OBJECTIVES = ("dpo", "ipo")  # those that compare with a reference model
METRICS = ("reward_accuracy", "rewards_chosen", "rewards_rejected", "rewards_margin", "logps_chosen", "logps_rejected")


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob, answer tokens) of every sequence of the batch, in `seq_ids` order."""
    token_logps = label_logps(model, batch)
    seq = batch["seq_ids"][:, 1:][batch["labels"][:, 1:] != IGNORE_INDEX]
    n = int(batch["n_seqs"])
    sums = token_logps.new_zeros(n).index_add(0, seq, token_logps)
    return sums, torch.bincount(seq, minlength=n)


@dataclass
class PairTerms:
    """One micro-batch's pairs under an objective: `pair_losses` per pair; ORPO also `nll_sum` over the chosen
    answers' `chosen_tokens` tokens. The rest are detached, for metrics."""

    pair_losses: torch.Tensor
    nll_sum: torch.Tensor | None
    chosen_tokens: int
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor

    def metric_sums(self) -> dict[str, float]:
        """Sums over the pairs (divide by the pair count for means)."""
        margin = self.chosen_rewards - self.rejected_rewards
        return {
            "reward_accuracy": float((margin > 0).sum()),
            "rewards_chosen": float(self.chosen_rewards.sum()),
            "rewards_rejected": float(self.rejected_rewards.sum()),
            "rewards_margin": float(margin.sum()),
            "logps_chosen": float(self.chosen_logps.sum()),
            "logps_rejected": float(self.rejected_logps.sum()),
        }


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def pair_terms(objective: str, options, logps: torch.Tensor, tokens: torch.Tensor, ref_logps=None) -> PairTerms:
    """The objective's per-pair terms from interleaved sequence log-probs (chosen, rejected, ...).
    `options`: the config's preference section (beta, label_smoothing, orpo_lambda, simpo_gamma)."""
    chosen, rejected = logps[0::2].float(), logps[1::2].float()
    n_chosen, n_rejected = tokens[0::2].clamp(min=1), tokens[1::2].clamp(min=1)
    if objective == "orpo":
        mean_c, mean_r = chosen / n_chosen, rejected / n_rejected
        log_odds = (mean_c - mean_r) - (log1mexp(mean_c) - log1mexp(mean_r))
        losses = -options.orpo_lambda * F.logsigmoid(log_odds)
        rewards = (options.orpo_lambda * mean_c.detach(), options.orpo_lambda * mean_r.detach())
        return PairTerms(losses, -chosen.sum(), int(tokens[0::2].sum()), *rewards, mean_c.detach(), mean_r.detach())
    if objective == "simpo":  # length-normalised, reference-free
        mean_c, mean_r = chosen / n_chosen, rejected / n_rejected
        h = options.beta * (mean_c - mean_r) - options.simpo_gamma
        eps = options.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
        rewards = (options.beta * mean_c.detach(), options.beta * mean_r.detach())
        return PairTerms(losses, None, int(tokens[0::2].sum()), *rewards, mean_c.detach(), mean_r.detach())
    ref_c, ref_r = ref_logps[0::2].float(), ref_logps[1::2].float()
    ratio_c, ratio_r = chosen - ref_c, rejected - ref_r
    if objective == "dpo":
        h = options.beta * (ratio_c - ratio_r)
        eps = options.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
    elif objective == "ipo":
        losses = (ratio_c / n_chosen - ratio_r / n_rejected - 1 / (2 * options.beta)) ** 2
    else:
        raise ValueError(f"unknown preference objective '{objective}'")
    rewards = (options.beta * ratio_c.detach(), options.beta * ratio_r.detach())
    return PairTerms(losses, None, int(tokens[0::2].sum()), *rewards, chosen.detach(), rejected.detach())


def step_loss_sum(terms: PairTerms, step_pairs: int, step_chosen_tokens: int) -> torch.Tensor:
    """The micro-batch's share of the step loss, times the step's pair count: the loop divides the sum over
    micro-batches (and processes) by `step_pairs`, so the step loss is the mean pair term (+ ORPO's NLL per
    chosen token of the whole step), whatever the micro-batching."""
    total = terms.pair_losses.sum()
    if terms.nll_sum is not None:
        total = total + terms.nll_sum * (step_pairs / max(step_chosen_tokens, 1))
    return total


class Reference:
    """Where a batch's reference log-probs come from: precomputed in the batch (`ref_logps`), else a frozen
    `model`, else the policy with its adapter switched off (no second copy of the weights)."""

    def __init__(self, policy, model=None):
        self.policy, self.model = policy, model

    @torch.no_grad()
    def __call__(self, batch: dict) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        if self.model is None:
            with self.policy.disable_adapter():
                return sequence_logps(self.policy, batch)[0]
        with varlen_attention(self.model, "cu_seq_lens_q" in batch):
            return sequence_logps(self.model, batch)[0]


def batch_terms(model, batch: dict, objective: str, options, reference: Reference | None) -> PairTerms:
    """The objective's terms for one micro-batch of pairs (reference: for DPO/IPO)."""
    logps, tokens = sequence_logps(model, batch)
    ref = reference(batch) if objective in REFERENCE_OBJECTIVES else None
    return pair_terms(objective, options, logps, tokens, ref)


@torch.no_grad()
def evaluate_pairs(
    model,
    pairs: list[dict],
    objective: str,
    options,
    reference=None,
    batch_size=8,
    pad_id=0,
    device=None,
    autocast=None,
) -> dict:
    """eval_loss (the objective over all the pairs: mean pair term, + ORPO's NLL per chosen token) and the reward
    metrics as eval_*; empty when there are no pairs."""
    from .data.preference import pair_batches

    if not pairs:
        return {}
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    sums = dict.fromkeys(METRICS, 0.0)
    pair_loss = nll = 0.0
    chosen_tokens = 0
    for batch in pair_batches(pairs, batch_size, pad_id):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with autocast or contextlib.nullcontext():
            terms = batch_terms(model, batch, objective, options, reference)
        pair_loss += float(terms.pair_losses.sum())
        nll += float(terms.nll_sum) if terms.nll_sum is not None else 0.0
        chosen_tokens += terms.chosen_tokens
        for key, value in terms.metric_sums().items():
            sums[key] += value
    model.train(was_training)
    n = len(pairs)
    loss = pair_loss / n + (nll / max(chosen_tokens, 1) if objective == "orpo" else 0.0)
    return {"eval_loss": loss, **{f"eval_{k}": v / n for k, v in sums.items()}, "eval_pairs": n}
