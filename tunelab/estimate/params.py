"""Exact parameter counts without weights: the model is built on the meta device from its config alone,
and the method's own `apply` makes it trainable there (peft and tunelab's adapters both work on meta).

QLoRA counts as LoRA on the same base: quantizing changes how frozen weights are stored, not how many
there are (tunelab.training.accounting counts a packed 4-bit tensor at its logical size).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import torch

from ..errors import UserError

# architectures far larger than this machine, built from their published config.json values (no download):
# `model: llama-3-8b` in a config estimates such a run; training needs the real weights.
_LLAMA_3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
PRESETS: dict[str, dict] = {
    "llama-3-8b": _LLAMA_3_8B,
    "llama-3-70b": _LLAMA_3_8B
    | dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64),
}


@dataclass
class Shape:
    """What the memory and FLOP arithmetic needs from the model config."""

    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool

    @property
    def kv_hidden(self) -> int:
        return self.hidden * self.kv_heads // self.heads


@dataclass
class ParamCounts:
    trainable: int
    total: int
    block_linear: int  # weights of the transformer blocks' linear layers (autocast casts them per forward)
    frozen_block_linear: int  # the frozen ones among them: what QLoRA stores in 4 bits
    embedding: int  # input embedding (and the LM head when tied)
    trainable_tensors: int


def model_config(cfg):
    """The transformers config of cfg.model (registry name, local folder, cached hub id, or a preset)."""
    if cfg.model in PRESETS:
        from transformers import LlamaConfig

        return LlamaConfig(**PRESETS[cfg.model])
    from transformers import AutoConfig

    from ..models import resolve_model_path
    from ..trust import check_remote_code

    path = resolve_model_path(cfg.model)
    check_remote_code(path, cfg.model, cfg.trust_remote_code)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the config of model '{cfg.model}': {' '.join(str(exc).split())[:300]}") from None


def shape_of(config) -> Shape:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    heads = getattr(text, "num_attention_heads", 1)
    return Shape(
        model_type=getattr(text, "model_type", "?"),
        vocab=text.vocab_size,
        hidden=hidden,
        intermediate=getattr(text, "intermediate_size", 4 * hidden),
        layers=text.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
    )


def meta_model(cfg, config):
    """The model of `cfg` on the meta device: every module and parameter, no memory, no weights."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    quiet = contextlib.redirect_stderr(io.StringIO())  # transformers' notes about new heads etc.
    with torch.device("meta"), quiet:
        if cfg.task == "classification":
            labels = cfg.data.labels or ["a", "b"]
            config.num_labels = len(labels)
            return AutoModelForSequenceClassification.from_config(config, trust_remote_code=cfg.trust_remote_code)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)


def count_params(cfg, method, config) -> tuple[ParamCounts, object]:
    """Exact (trainable, total) counts of the method applied to cfg.model, on meta; returns the model too."""
    from torch import nn

    from ..training.accounting import count_params as count

    model = meta_model(cfg, config)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with torch.device("meta"), contextlib.redirect_stderr(io.StringIO()):
        model = method.apply(model, cfg, cfg.train.max_steps or 1000)
    trainable, total = count(model)
    emb = model.get_input_embeddings()
    embedding = emb.weight.numel() if emb is not None else 0
    from ..methods.full import transformer_blocks

    prefix = transformer_blocks(model)[0] + "."
    linear = frozen = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith(prefix):
            linear += module.weight.numel()
            frozen += 0 if module.weight.requires_grad else module.weight.numel()
    n_tensors = sum(1 for p in model.parameters() if p.requires_grad)
    return ParamCounts(trainable, total, linear, frozen, embedding, n_tensors), model
