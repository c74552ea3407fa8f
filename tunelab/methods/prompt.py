"""Virtual-token methods through peft: prefix tuning (P-Tuning v2 style), prompt tuning, P-tuning.

They train few parameters far from the output, so their default LR is much higher than LoRA's.
"""

from __future__ import annotations

from .base import PeftMethod, peft_task_type


class PrefixMethod(PeftMethod):
    name = "prefix"
    block = "prefix"
    default_lr = 1e-2
    summary = "trainable key/value prefixes at every layer (P-Tuning v2); 20 virtual tokens; LR 1e-2"

    def peft_config(self, cfg, model, total_steps: int = 1000):
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(
            task_type=peft_task_type(cfg),
            num_virtual_tokens=cfg.prefix.num_virtual_tokens,
            prefix_projection=cfg.prefix.projection,
        )


class PromptMethod(PeftMethod):
    name = "prompt"
    block = "prompt"
    default_lr = 3e-2
    summary = "a soft prompt of trainable input embeddings (optionally initialised from prompt.init_text); LR 3e-2"

    def peft_config(self, cfg, model, total_steps: int = 1000):
        from peft import PromptTuningConfig

        kwargs = {}
        if cfg.prompt.init_text:
            from ..models import resolve_model_path

            kwargs = {
                "prompt_tuning_init": "TEXT",
                "prompt_tuning_init_text": cfg.prompt.init_text,
                "tokenizer_name_or_path": resolve_model_path(cfg.model),
            }
        return PromptTuningConfig(
            task_type=peft_task_type(cfg), num_virtual_tokens=cfg.prompt.num_virtual_tokens, **kwargs
        )


class PTuningMethod(PeftMethod):
    name = "ptuning"
    block = "ptuning"
    default_lr = 1e-2
    summary = "virtual tokens produced by a trainable prompt encoder (MLP); LR 1e-2"

    def peft_config(self, cfg, model, total_steps: int = 1000):
        from peft import PromptEncoderConfig

        hidden = cfg.ptuning.encoder_hidden_size or model.config.hidden_size
        return PromptEncoderConfig(
            task_type=peft_task_type(cfg), num_virtual_tokens=cfg.ptuning.num_virtual_tokens, encoder_hidden_size=hidden
        )
