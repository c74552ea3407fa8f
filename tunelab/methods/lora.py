"""LoRA and its variants through peft: DoRA, rsLoRA, PiSSA/OLoRA init, LoRA+ learning rates."""

from __future__ import annotations

from pathlib import Path

from .base import Method

_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


def peft_lora_config(cfg, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    lc = cfg.lora
    return LoraConfig(
        task_type=task_type,
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=lc.target_modules,
        rank_pattern=dict(lc.rank_pattern),
        alpha_pattern=dict(lc.alpha_pattern),
        use_dora=lc.dora,
        use_rslora=lc.rslora,
        init_lora_weights=_INIT[lc.init],
        modules_to_save=lc.modules_to_save,
        bias="none",
    )


class LoraMethod(Method):
    name = "lora"
    artifact = "adapter"
    summary = "low-rank updates B@A on chosen linear layers (peft); r=16, alpha=32, dropout=0.05, q/v by default"

    def apply(self, model, cfg):
        from peft import get_peft_model

        return get_peft_model(model, peft_lora_config(cfg))

    def save(self, model, out_dir: Path) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)

    def load(self, base_model, artifact_dir: Path, cfg):
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, artifact_dir, is_trainable=False)

    def lr_multiplier(self, param_name: str, cfg) -> float:
        ratio = cfg.lora.lr_ratio
        return ratio if ratio and ".lora_B." in param_name else 1.0
