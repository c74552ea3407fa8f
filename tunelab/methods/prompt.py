"""Virtual-token methods through peft: prefix tuning (P-Tuning v2 style), prompt tuning, P-tuning.

They train few parameters far from the output, so their default LR is much higher than LoRA's.
"""

from __future__ import annotations

from pydantic import Field

from ..models import resolve_model_path
from ..sections import Section
from .base import PeftMethod, peft_task_type


def _virtual_tokens():
    return Field(20, ge=1, description="number of virtual tokens")


class PrefixSection(Section):
    num_virtual_tokens: int = _virtual_tokens()
    projection: bool = Field(False, description="reparameterise the prefix through an MLP (more parameters, steadier)")


class PromptSection(Section):
    num_virtual_tokens: int = _virtual_tokens()
    init_text: str | None = Field(None, description="initialise the soft prompt from this text's token embeddings")


class PTuningSection(Section):
    num_virtual_tokens: int = _virtual_tokens()
    encoder_hidden_size: int | None = Field(
        None, ge=1, description="width of the prompt encoder's MLP; unset: the model's hidden size"
    )


class PrefixMethod(PeftMethod):
    name = "prefix"
    sections = {"prefix": PrefixSection}
    virtual_tokens = True
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
    sections = {"prompt": PromptSection}
    virtual_tokens = True
    default_lr = 3e-2
    summary = "a soft prompt of trainable input embeddings (optionally initialised from prompt.init_text); LR 3e-2"

    def peft_config(self, cfg, model, total_steps: int = 1000):
        from peft import PromptTuningConfig

        kwargs = {}
        if cfg.prompt.init_text:
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
    sections = {"ptuning": PTuningSection}
    virtual_tokens = True
    default_lr = 1e-2
    summary = "virtual tokens produced by a trainable prompt encoder (MLP); LR 1e-2"

    def peft_config(self, cfg, model, total_steps: int = 1000):
        from peft import PromptEncoderConfig

        hidden = cfg.ptuning.encoder_hidden_size or model.config.hidden_size
        return PromptEncoderConfig(
            task_type=peft_task_type(cfg), num_virtual_tokens=cfg.ptuning.num_virtual_tokens, encoder_hidden_size=hidden
        )
