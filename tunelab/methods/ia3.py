"""IA3 through peft: learned per-channel rescaling of keys, values and feed-forward activations."""

from __future__ import annotations

from pydantic import Field

from ..sections import Section
from .base import PeftMethod, peft_task_type


class IA3Section(Section):
    target_modules: list[str] | None = Field(
        None, description="modules whose outputs are rescaled; unset: peft's default for the architecture"
    )
    feedforward_modules: list[str] | None = Field(
        None, description="the subset of target_modules rescaled at their input (feed-forward layers)"
    )


class IA3Method(PeftMethod):
    name = "ia3"
    sections = {"ia3": IA3Section}
    default_lr = 3e-3
    summary = "learned rescaling vectors on keys, values and the feed-forward (tiny, no rank); LR 3e-3"

    def module_options(self, cfg) -> dict:
        return {"ia3.target_modules": cfg.ia3.target_modules, "ia3.feedforward_modules": cfg.ia3.feedforward_modules}

    def peft_config(self, cfg, model, total_steps: int = 1000):
        from peft import IA3Config

        return IA3Config(
            task_type=peft_task_type(cfg),
            target_modules=cfg.ia3.target_modules,
            feedforward_modules=cfg.ia3.feedforward_modules,
        )
