"""AdaLoRA through peft: LoRA whose rank budget is reallocated by importance during training.

peft adds the orthogonality regulariser only when the model computes the loss itself, and the rank
schedule needs `update_and_allocate(step)` between the optimizer step and zeroing the gradients; our
loop computes its own loss, so both are wired through the Method hooks here.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import PeftMethod, peft_task_type


class AdaLoraMethod(PeftMethod):
    name = "adalora"
    block = "adalora"
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
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
        )

    def module_options(self, cfg) -> dict:
        return {"lora.target_modules": cfg.lora.target_modules}

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
