"""Training: the loop (recipe), optimizer/scheduler groups, checkpoints, accounting, run directory."""

from .loop import TrainResult, train

__all__ = ["TrainResult", "train"]
