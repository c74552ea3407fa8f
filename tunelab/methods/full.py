"""Full fine-tuning and partial fine-tuning (freeze all but chosen layers); both save a full model."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import torch
from pydantic import Field, field_validator
from torch import nn

from ..errors import ConfigError
from ..models import load_causal_lm, load_classifier
from ..sections import Section
from .base import Method, classification_head


class FreezeSection(Section):
    trainable_layers: int | list[int | str] = Field(
        2,
        description="the last N blocks, or a list of block indices (negative counts from the end) and "
        "parameter-name glob patterns",
    )
    train_embeddings: bool = Field(False, description="also train the input embeddings")
    train_lm_head: bool = Field(False, description="also train the output head")
    train_norm: bool = Field(True, description="also train the final norm")

    @field_validator("trainable_layers")
    @classmethod
    def _layer_count(cls, v):
        if isinstance(v, int) and v < 0:
            raise ValueError(f"a number of blocks must be >= 0, got {v} (a list like [-1] picks blocks from the end)")
        if isinstance(v, list) and not v:
            raise ValueError("an empty list trains no block; give a number or block indices / name patterns")
        return v


def transformer_blocks(model) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer blocks (the longest ModuleList named layers/layer/h/blocks)."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "layer", "h", "blocks"):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ConfigError(f"freeze: cannot find the transformer blocks of {type(model).__name__}")
    return best


class FullMethod(Method):
    name = "full"
    artifact = "model"
    default_lr = 2e-5
    summary = "every weight trains; saves a full model directory; LR 2e-5"
    needs_base = False
    frees_weight_gradients = True

    def apply(self, model, cfg, total_steps: int = 1000):
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def save(self, model, out_dir: Path) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)

    def load(self, base_model, artifact_dir: Path, cfg):
        if cfg.task == "classification":
            return load_classifier(
                str(artifact_dir),
                cfg.data.labels,
                trust_remote_code=cfg.trust_remote_code,
                allow_pickle=cfg.allow_pickle,
            )
        return load_causal_lm(
            str(artifact_dir),
            dtype=torch.float32,
            trust_remote_code=cfg.trust_remote_code,
            allow_pickle=cfg.allow_pickle,
        )


class FreezeMethod(FullMethod):
    name = "freeze"
    sections = {"freeze": FreezeSection}
    default_lr = 1e-4
    summary = "freeze everything but the chosen blocks (default: the last 2 + final norm); saves a full model"

    def trainable_names(self, model, cfg) -> set[str]:
        f = cfg.freeze
        prefix, blocks = transformer_blocks(model)
        n = len(blocks)
        if isinstance(f.trainable_layers, int):
            if not 0 <= f.trainable_layers <= n:
                raise ConfigError(f"freeze.trainable_layers={f.trainable_layers}: the model has {n} blocks")
            indices, patterns = set(range(n - f.trainable_layers, n)), []
        else:
            indices = set()
            for i in (x for x in f.trainable_layers if isinstance(x, int)):
                if not -n <= i < n:
                    raise ConfigError(f"freeze.trainable_layers: block {i} out of range (the model has {n})")
                indices.add(i % n)
            patterns = [x for x in f.trainable_layers if isinstance(x, str)]
        names = set()
        for name, _ in model.named_parameters():
            if any(name.startswith(f"{prefix}.{i}.") for i in indices) or any(
                fnmatch.fnmatchcase(name, p) for p in patterns
            ):
                names.add(name)
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        for module, wanted in ((emb, f.train_embeddings), (head, f.train_lm_head)):
            if wanted and module is not None:
                names |= {n for n, p in model.named_parameters() if any(p is q for q in module.parameters())}
        head = classification_head(model)
        if head is not None:  # a new classification head always trains
            names |= {n for n, p in model.named_parameters() if any(p is q for q in head.parameters())}
        if f.train_norm:
            names |= {n for n, _ in model.named_parameters() if not n.startswith(prefix + ".") and "norm" in n.lower()}
        return names

    def apply(self, model, cfg, total_steps: int = 1000):
        names = self.trainable_names(model, cfg)
        if not names:
            raise ConfigError("freeze: the chosen layers and patterns match no parameter")
        for name, p in model.named_parameters():
            p.requires_grad_(name in names)
        return model
