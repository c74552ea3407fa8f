"""Bottleneck adapters (Houlsby 2019, Pfeiffer 2021): a small down/up MLP after chosen sublayers.

Each adapter wraps an existing output projection, so it acts on the sublayer's output before the
transformer's residual add, as in the papers:

- houlsby: after the attention output projection and after the feed-forward output projection;
- pfeiffer: after the feed-forward output projection only.

The up-projection starts at exactly zero, so right after `apply` the model computes what the base
model computes. Only adapter parameters train; everything else (heads included) is frozen.

Artifact (`adapter/`): `adapter_model.safetensors` (adapter tensors only, keyed by their parameter
names in the adapted model) and `adapter_config.json` (kind, sizes, the wrapped module names), which
is all `load` needs: the artifact describes itself.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..errors import ConfigError, UserError
from ..io import read_json_object, read_safetensors
from ..sections import Section
from .base import Method, classification_head

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
HEAD_FILE = "head.safetensors"  # a classification head trained alongside the adapters

KINDS = ("houlsby", "pfeiffer")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
LLAMA_STYLE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
BERT_STYLE_TYPES = ("bert", "roberta", "xlm-roberta", "electra")  # same BertLayer module tree


class AdapterSection(Section):
    kind: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby", description="houlsby: after attention and FFN outputs; pfeiffer: after the FFN output only"
    )
    reduction: int = Field(16, ge=1, description="hidden size / bottleneck size")
    non_linearity: Literal["relu", "gelu", "silu"] = Field("relu", description="activation inside the bottleneck")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's output")


@dataclass
class AdapterSettings:
    """The `adapter:` config section; the fallback when a config has none (tests, plain namespaces)."""

    kind: str = "houlsby"
    reduction: int = 16  # hidden size / bottleneck size
    non_linearity: str = "relu"
    dropout: float = 0.0

    @classmethod
    def from_section(cls, section) -> AdapterSettings:
        """From a pydantic AdapterConfig, a namespace or a dict; missing fields take the defaults."""
        if section is None:
            return cls()
        get = section.get if isinstance(section, dict) else (lambda key, default: getattr(section, key, default))
        defaults = cls()
        settings = cls(**{key: get(key, value) for key, value in asdict(defaults).items()})
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"adapter.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if isinstance(self.reduction, bool) or not isinstance(self.reduction, int) or self.reduction < 1:
            raise ConfigError(f"adapter.reduction must be an integer >= 1, got {self.reduction!r}")
        if self.non_linearity not in ACTIVATIONS:
            raise ConfigError(
                f"adapter.non_linearity must be one of {', '.join(ACTIVATIONS)}, got {self.non_linearity!r}"
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"adapter.dropout must be in [0, 1), got {self.dropout!r}")


def bottleneck_size(hidden: int, reduction: int) -> int:
    return max(1, hidden // reduction)


class BottleneckAdapter(nn.Module):
    """x + up(dropout(act(down(x)))), computed in the adapter's dtype (fp32) and cast back to x's."""

    def __init__(self, hidden: int, reduction: int, non_linearity: str = "relu", dropout: float = 0.0):
        super().__init__()
        bottleneck = bottleneck_size(hidden, reduction)
        self.down = nn.Linear(hidden, bottleneck)
        self.act = ACTIVATIONS[non_linearity]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, hidden)
        # down as nn.Linear's own (Kaiming-uniform) init so the bottleneck is not near zero and up
        # gets useful gradients from step 1; up at exactly zero so the adapter starts as the identity
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.down.weight.dtype)
        delta = self.up(self.dropout(self.act(self.down(h))))
        return x + delta.to(x.dtype)


class AdaptedLinear(nn.Module):
    """An existing linear layer (`.base`, frozen, same Parameter objects) followed by an adapter."""

    def __init__(self, base: nn.Linear, adapter: BottleneckAdapter):
        super().__init__()
        self.base = base
        self.adapter = adapter

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base(x))


# --- placement ---------------------------------------------------------------------------------


def _has_linear(module: nn.Module, path: str) -> bool:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return False
    return isinstance(module, (nn.Linear, AdaptedLinear))


def adapter_targets(model: nn.Module, kind: str) -> list[str]:
    """Names of the linear output projections an adapter of `kind` wraps, in module order.

    Llama-style decoder layers (`self_attn.o_proj`, `mlp.down_proj`) and BERT-style encoder layers
    (`attention.output.dense`, the layer's own `output.dense`) are recognised by their module tree."""
    if kind not in KINDS:
        raise ConfigError(f"adapter.kind must be one of {', '.join(KINDS)}, got {kind!r}")
    targets = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if _has_linear(module, "self_attn.o_proj") and _has_linear(module, "mlp.down_proj"):
            attn, ffn = "self_attn.o_proj", "mlp.down_proj"
        elif (
            _has_linear(module, "attention.output.dense")
            and _has_linear(module, "output.dense")
            and hasattr(module, "intermediate")
        ):
            attn, ffn = "attention.output.dense", "output.dense"
        else:
            continue
        if kind == "houlsby":
            targets.append(prefix + attn)
        targets.append(prefix + ffn)
    if not targets:
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None) or type(model).__name__
        raise UserError(
            f"the adapter method does not support model type '{model_type}' ({type(model).__name__}): "
            f"supported are Llama-style decoders ({', '.join(LLAMA_STYLE_TYPES)}) and BERT-style "
            f"encoders ({', '.join(BERT_STYLE_TYPES)})"
        )
    return targets


def insert_adapters(model: nn.Module, settings: AdapterSettings) -> list[str]:
    """Freeze the whole model, then wrap each target with a trainable fp32 adapter on its device."""
    targets = adapter_targets(model, settings.kind)
    for param in model.parameters():
        param.requires_grad_(False)
    for target in targets:
        parent_name, _, child_name = target.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child_name)
        if isinstance(base, AdaptedLinear):
            raise UserError(f"{target} already has an adapter (apply the adapter method once)")
        adapter = BottleneckAdapter(base.out_features, settings.reduction, settings.non_linearity, settings.dropout)
        adapter.to(device=base.weight.device, dtype=torch.float32)
        setattr(parent, child_name, AdaptedLinear(base, adapter))
    return targets


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors only, keyed by their parameter names in the model."""
    state = {}
    for module_name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            for param_name, param in module.adapter.named_parameters():
                state[f"{module_name}.adapter.{param_name}"] = param
    return state


def _hidden_size(model: nn.Module):
    return getattr(getattr(model, "config", None), "hidden_size", None)


def _base_model_name(model: nn.Module):
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)


# --- the method --------------------------------------------------------------------------------


class BottleneckAdapterMethod(Method):
    name = "adapter"
    artifact = "adapter"
    sections = {"adapter": AdapterSection}
    # only a few, zero-started parameters train, so a higher LR than LoRA's (Houlsby et al. swept 3e-5..3e-3)
    default_lr = 1e-3
    summary = (
        "bottleneck adapters x + up(act(down(x))) after attention/FFN outputs (Houlsby/Pfeiffer); reduction 16; LR 1e-3"
    )

    def apply(self, model, cfg, total_steps: int = 1000):
        """Freeze `model`, wrap its target projections with adapters; returns the same model object."""
        settings = AdapterSettings.from_section(getattr(cfg, "adapter", None))
        targets = insert_adapters(model, settings)
        model.tunelab_adapter_config = {**asdict(settings), "targets": targets}
        head = classification_head(model)
        if head is not None:  # a new classification head must train with the adapters
            head.requires_grad_(True)
        return model

    def save(self, model, out_dir: Path) -> None:
        from safetensors.torch import save_file

        meta = getattr(model, "tunelab_adapter_config", None)
        state = adapter_state(model)
        if meta is None or not state:
            raise UserError("the model has no bottleneck adapters to save (apply the adapter method first)")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()},
            str(out_dir / WEIGHTS_FILE),
            metadata={"format": "pt"},
        )
        config = {
            "tunelab_method": self.name,
            "kind": meta["kind"],
            "reduction": meta["reduction"],
            "non_linearity": meta["non_linearity"],
            "dropout": meta["dropout"],
            "targets": list(meta["targets"]),
            "base_model_name_or_path": _base_model_name(model),
            "hidden_size": _hidden_size(model),
        }
        (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        head = classification_head(model)
        if head is not None:
            save_file(
                {k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()}, str(out_dir / HEAD_FILE)
            )

    def load(self, base_model, artifact_dir: Path, cfg):
        """Adapters from the artifact (its own config, not `cfg`) on `base_model`; eval mode, frozen."""
        artifact_dir = Path(artifact_dir)
        saved = _read_artifact_config(artifact_dir / CONFIG_FILE)
        settings = AdapterSettings.from_section(saved)
        hidden = _hidden_size(base_model)
        if saved.get("hidden_size") is not None and hidden is not None and saved["hidden_size"] != hidden:
            raise UserError(
                f"{artifact_dir}: adapters were trained for hidden size {saved['hidden_size']}, "
                f"the base model has {hidden} (base was {saved.get('base_model_name_or_path')})"
            )
        targets = insert_adapters(base_model, settings)
        if "targets" in saved and list(saved["targets"]) != targets:
            raise UserError(
                f"{artifact_dir / CONFIG_FILE}: the saved adapter targets do not match this base model's "
                f"layers ({len(saved['targets'])} saved, {len(targets)} here; base was "
                f"{saved.get('base_model_name_or_path')})"
            )
        _load_adapter_weights(base_model, artifact_dir / WEIGHTS_FILE)
        head = classification_head(base_model)
        if head is not None and (artifact_dir / HEAD_FILE).is_file():
            head.load_state_dict(read_safetensors(artifact_dir / HEAD_FILE))
        for param in base_model.parameters():
            param.requires_grad_(False)
        base_model.tunelab_adapter_config = {**asdict(settings), "targets": targets}
        base_model.eval()
        return base_model


def _read_artifact_config(path: Path) -> dict:
    config = read_json_object(path, missing="missing (not an adapter artifact)")
    if config.get("tunelab_method") != "adapter":
        raise UserError(f"{path}: not a tunelab bottleneck-adapter config (tunelab_method must be 'adapter')")
    return config


def _load_adapter_weights(model: nn.Module, path: Path) -> None:
    """Copy the saved tensors into the model's adapters; keys and shapes must match exactly."""
    saved = read_safetensors(path, missing="missing (the adapter weights)")
    params = adapter_state(model)
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or unexpected:
        raise UserError(
            f"{path}: adapter weights do not match the model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    with torch.no_grad():
        for name, param in params.items():
            tensor = saved[name]
            if tensor.shape != param.shape:
                raise UserError(
                    f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}"
                )
            param.copy_(tensor)
