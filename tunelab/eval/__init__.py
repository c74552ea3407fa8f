"""Evaluation: token-weighted loss / perplexity and generation-based metrics."""

from .loss import evaluate_loss

__all__ = ["evaluate_loss"]
