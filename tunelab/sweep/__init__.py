"""Hyperparameter sweeps (Optuna): every trial an ordinary run whose parent is the sweep."""

from .run import SweepOptions, run_sweep

__all__ = ["SweepOptions", "run_sweep"]
