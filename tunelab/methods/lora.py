"""LoRA and its variants through peft: DoRA, rsLoRA, PiSSA/OLoRA init, LoRA+ learning rates, QLoRA.

The variants are LoRA with one option forced, so they also combine as options (QLoRA + DoRA:
`method: qlora` with `lora.dora: true`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from pydantic import Field, field_validator

from ..device import cpu_has_native_bf16, dtype_of
from ..errors import UserError
from ..log import log
from ..models import load_causal_lm
from ..quant import use_generic_4bit_kernel
from ..sections import Section, positive_values
from .base import PeftMethod, load_classification_base, peft_task_type


class LoraSection(Section):
    r: int = Field(16, ge=1, description="rank of the update B@A")
    alpha: float = Field(
        32, gt=0, description="scale: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora)"
    )
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the LoRA branch's input")
    target_modules: str | list[str] | None = Field(
        None,
        description="linear layers to adapt: a list of names, `all-linear`, or a regex over full module names; "
        "unset: peft's default for the architecture (q/v projections)",
    )
    rank_pattern: dict[str, int] = Field(
        default_factory=dict, description="module-name pattern -> rank, overriding r for those modules"
    )
    alpha_pattern: dict[str, float] = Field(
        default_factory=dict, description="module-name pattern -> alpha, overriding alpha for those modules"
    )
    dora: bool = Field(False, description="DoRA: learn a magnitude vector and a direction (method dora forces it)")
    rslora: bool = Field(False, description="scale by alpha / sqrt(r), stable at high ranks (method rslora forces it)")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default", description="initialisation of A and B; pissa/olora start from the base's SVD/QR (method pissa)"
    )
    lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: B matrices train at lr_ratio x train.lr (method loraplus: 16 when unset)"
    )
    modules_to_save: list[str] | None = Field(
        None, description="modules trained in full and saved with the adapter (e.g. a new head)"
    )

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _positive_per_module(cls, v):
        return positive_values(v, "value")


class QuantSection(Section):
    bits: Literal[4, 8] | None = Field(
        None, description="quantize the frozen base: 4 = QLoRA (NF4/FP4), 8 = LLM.int8; unset: full precision"
    )
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type")
    double_quant: bool = Field(True, description="also quantize the 4-bit scales (saves ~0.4 bit per weight)")
    compute_dtype: Literal["auto", "bf16", "fp32", "fp16"] = Field(
        "auto", description="dtype of the 4-bit matmuls; auto: bf16 where native, else fp32"
    )


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


def compute_dtype(setting: str):
    if setting == "auto":
        on_gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return (
            torch.bfloat16
            if on_gpu_bf16 or (not torch.cuda.is_available() and cpu_has_native_bf16())
            else torch.float32
        )
    return dtype_of(setting)


def bnb_config(quant, skip_modules=None):
    from transformers import BitsAndBytesConfig

    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(
        llm_int8_skip_modules=skip_modules,
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(quant.compute_dtype),
    )


class LoraMethod(PeftMethod):
    name = "lora"
    sections = {"lora": LoraSection, "quant": QuantSection}
    summary = "low-rank updates B@A on chosen linear layers; r=16, alpha=32, dropout=0.05, q/v projections"
    forced: dict = {}

    def options(self, cfg):
        return cfg.lora.model_copy(update=self.forced)

    def peft_config(self, cfg, model, total_steps: int = 1000):
        return peft_lora_config(cfg.model_copy(update={"lora": self.options(cfg)}), peft_task_type(cfg))

    def quant_bits(self, cfg):
        return cfg.quant.bits

    def module_options(self, cfg) -> dict:
        return {"lora.target_modules": cfg.lora.target_modules, "lora.modules_to_save": cfg.lora.modules_to_save}

    def load_base(self, cfg, device):
        bits = self.quant_bits(cfg)
        if not bits:
            return super().load_base(cfg, device)
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError(
                f"method '{cfg.method}' with quant.bits={bits} needs bitsandbytes: pip install 'bitsandbytes>=0.46.1'"
            ) from None
        from peft import prepare_model_for_kbit_training

        quant = cfg.quant.model_copy(update={"bits": bits})
        if cfg.task == "classification":
            # a new head has no weights to quantize: keep it (and BERT's pooler) in full precision
            skip = ["classifier", "score", "pooler"]
            model = load_classification_base(
                cfg, None, quantization_config=bnb_config(quant, skip), device_map={"": device}
            )
        else:
            model = load_causal_lm(
                cfg.model,
                None,
                torch.float32,
                cfg.trust_remote_code,
                cfg.allow_pickle,
                quantization_config=bnb_config(quant),
                device_map={"": device},
            )
        would_pack, misfits = use_generic_4bit_kernel(model)
        if would_pack:
            log(
                f"note: {would_pack} 4-bit layers use bitsandbytes' generic CPU kernel, not its packed AVX512-BF16 one "
                f"(that one has no backward once a layer is packed by an evaluation"
                + (f", and cannot take the shape of {len(misfits)} of them, e.g. {misfits[0]}" if misfits else "")
                + ")"
            )
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)

    def frozen_at_compute_dtype(self, cfg) -> bool:
        # DoRA also takes the base weight's norm (elementwise, fp32 under autocast): it keeps fp32
        return not self.options(cfg).dora

    def lr_multiplier(self, param_name: str, cfg) -> float:
        ratio = self.options(cfg).lr_ratio
        return ratio if ratio and ".lora_B." in param_name else 1.0


@contextmanager
def dora_norms_cached(model) -> Iterator[None]:
    """Inference with each DoRA layer's B @ A and weight norm computed once, not in every forward (peft's
    DoraCaching; it applies in eval mode only). Without it a decoding step recomputes every layer's full merged
    weight. The cache is emptied on entry and exit: weights may change between two evaluations in eval mode (a
    restored best checkpoint) and peft only empties it on `train()`."""
    from peft.helpers import DoraCaching
    from peft.tuners.lora.dora import DoraLinearLayer

    layers = [m for m in model.modules() if isinstance(m, DoraLinearLayer)]
    if not layers:
        yield
        return
    for layer in layers:
        layer._cache_clear()
    try:
        with DoraCaching():
            yield
    finally:
        for layer in layers:
            layer._cache_clear()


class DoraMethod(LoraMethod):
    name = "dora"
    summary = "LoRA with weight decomposition (magnitude + direction); lora.* options apply"
    forced = {"dora": True}


class RsLoraMethod(LoraMethod):
    name = "rslora"
    summary = "LoRA scaled by alpha/sqrt(r), stable at high ranks; lora.* options apply"
    forced = {"rslora": True}


class PissaMethod(LoraMethod):
    name = "pissa"
    summary = "LoRA initialised from the principal singular vectors (the base keeps the residual)"
    forced = {"init": "pissa"}


class LoraPlusMethod(LoraMethod):
    name = "loraplus"
    summary = "LoRA+ : B matrices at lora.lr_ratio x the LR (default 16)"

    def options(self, cfg):
        return cfg.lora.model_copy(update={"lr_ratio": cfg.lora.lr_ratio or 16.0})


class QLoraMethod(LoraMethod):
    name = "qlora"
    summary = "LoRA on a 4-bit NF4 base (double quantization; bf16 compute where native) via bitsandbytes"

    def quant_bits(self, cfg):
        return cfg.quant.bits or 4
