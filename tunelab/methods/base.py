"""What every tuning method provides: apply to a base model, save its artifact, load it back."""

from __future__ import annotations

from pathlib import Path


class Method:
    name: str = ""
    artifact: str = "adapter"  # "adapter" (small, needs the base) or "model" (a full model directory)
    summary: str = ""

    def apply(self, model, cfg):
        """Make the model trainable for this method; returns the model to train."""
        raise NotImplementedError

    def save(self, model, out_dir: Path) -> None:
        raise NotImplementedError

    def load(self, base_model, artifact_dir: Path, cfg):
        """Rebuild the trained model from the base and the saved artifact (for inference)."""
        raise NotImplementedError

    def lr_multiplier(self, param_name: str, cfg) -> float:
        """Per-parameter LR multiplier the method asks for (LoRA+ raises B's); 1.0 by default."""
        return 1.0
