"""Decoder blocks of a causal LM: find them, and keep a chosen subset (layer pruning, a smaller student)."""

from __future__ import annotations

from torch import nn

# where the decoder stacks live in the transformers families tunelab trains (Llama/Mistral/Qwen: model.layers)
_STACKS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers")


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _stack(model) -> tuple[nn.Module, str, nn.ModuleList]:
    root = _unwrap(model)
    for path in _STACKS:
        parent, _, attr = path.rpartition(".")
        owner = root.get_submodule(parent) if parent else root
        layers = getattr(owner, attr, None) if owner is not None else None
        if isinstance(layers, nn.ModuleList):
            return owner, attr, layers
    raise ValueError(f"{type(root).__name__}: no decoder block list found (looked for {', '.join(_STACKS)})")


def decoder_blocks(model) -> nn.ModuleList:
    """The model's decoder blocks, in order."""
    return _stack(model)[2]


def keep_blocks(model, indices):
    """Keep only the decoder blocks at `indices` (any order; kept in model order), in place; returns the model.

    The config follows (num_hidden_layers, per-layer lists such as layer_types) and each kept attention
    layer gets its new position as `layer_idx`, which the KV cache is indexed by."""
    owner, attr, layers = _stack(model)
    keep = sorted(set(int(i) for i in indices))
    if not keep or keep[0] < 0 or keep[-1] >= len(layers):
        raise ValueError(f"block indices must be within 0..{len(layers) - 1} and not empty, got {list(indices)}")
    kept = nn.ModuleList([layers[i] for i in keep])
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    setattr(owner, attr, kept)
    config = _unwrap(model).config
    old = config.num_hidden_layers
    config.num_hidden_layers = len(keep)
    for name, value in list(vars(config).items()):  # per-layer settings (layer_types, sliding windows)
        if isinstance(value, list) and len(value) == old and name != "architectures":
            setattr(config, name, [value[i] for i in keep])
    return model
