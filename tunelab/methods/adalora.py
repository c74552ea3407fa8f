"""AdaLoRA through peft: LoRA whose rank budget is reallocated by importance during training.

peft adds the orthogonality regulariser only when the model computes the loss itself, and the rank
schedule needs `update_and_allocate(step)` between the optimizer step and zeroing the gradients; our
loop computes its own loss, so both are wired through the Method hooks here.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator

from ..errors import ConfigError
from ..sections import Section
from .base import PeftMethod, peft_task_type


class AdaLoraSection(Section):
    init_r: int = Field(12, ge=1, description="rank every adapted layer starts with")
    target_r: int = Field(8, ge=1, validate_default=True, description="average rank the budget shrinks to")
    tinit_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="share of steps before rank pruning starts")
    tfinal_ratio: float = Field(
        0.2, ge=0.0, lt=1.0, validate_default=True, description="share of final steps at the target budget"
    )
    delta_t: int = Field(1, ge=1, description="steps between budget reallocations")
    orth_reg_weight: float = Field(0.5, ge=0.0, description="weight of the orthogonality regulariser on A and B")
    alpha: float = Field(32, gt=0, description="scale of the update (alpha / r)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the adapter branch's input")
    target_modules: str | list[str] | None = Field(
        None, description="linear layers to adapt (as lora.target_modules); unset: peft's default for the architecture"
    )

    # field validators run in field order, so the fields they compare with are already in info.data
    @field_validator("target_r")
    @classmethod
    def _budget_shrinks(cls, v, info):
        init_r = info.data.get("init_r")
        if init_r is not None and v > init_r:
            raise ValueError(f"must be <= init_r ({init_r}): the rank budget only shrinks")
        return v

    @field_validator("tfinal_ratio")
    @classmethod
    def _leaves_budgeting_steps(cls, v, info):
        tinit = info.data.get("tinit_ratio")
        if tinit is not None and tinit + v >= 1:
            raise ValueError(f"tinit_ratio + tfinal_ratio ({tinit} + {v}) must be < 1 (steps left for rank budgeting)")
        return v


class AdaLoraMethod(PeftMethod):
    name = "adalora"
    sections = {"adalora": AdaLoraSection}
    default_lr = 1e-3
    summary = "LoRA with an importance-driven rank budget (init_r 12 -> target_r 8) over the run"

    def peft_config(self, cfg, model, total_steps: int = 1000):
        from peft import AdaLoraConfig

        a = cfg.adalora
        tinit, tfinal = int(a.tinit_ratio * total_steps), int(a.tfinal_ratio * total_steps)
        if tinit + tfinal >= total_steps:
            raise ConfigError(
                f"adalora: tinit_ratio + tfinal_ratio must leave steps for budgeting (total {total_steps})"
            )
        return AdaLoraConfig(
            task_type=peft_task_type(cfg),
            init_r=a.init_r,
            target_r=a.target_r,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=a.delta_t,
            total_step=total_steps,
            orth_reg_weight=a.orth_reg_weight,
            lora_alpha=a.alpha,
            lora_dropout=a.dropout,
            target_modules=a.target_modules,
        )

    def module_options(self, cfg) -> dict:
        return {"adalora.target_modules": cfg.adalora.target_modules}

    def extra_loss(self, model):
        weight = model.peft_config[model.active_adapter].orth_reg_weight
        terms = []
        for name, p in model.named_parameters():
            if p.requires_grad and (".lora_A." in name or ".lora_B." in name) and p.numel():
                cov = p @ p.T if ".lora_A." in name else p.T @ p
                eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
                terms.append(torch.linalg.matrix_norm(cov - eye))
        return weight * torch.stack(terms).mean() if terms else None

    def on_step_end(self, model, step: int) -> None:
        model.base_model.update_and_allocate(step)
