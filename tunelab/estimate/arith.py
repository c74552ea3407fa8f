"""Parameter counts of a preset Llama architecture (llama-3-8b, -70b) by arithmetic, for full fine-tuning and
the LoRA family, so that estimating such a run needs neither transformers nor peft (importing them and
building an 8B model on the meta device took ~10 s of a 12 s estimate). The counts equal the meta-device
build's exactly (tested); a setting this arithmetic does not cover (other methods, per-module ranks, a regex
of targets, modules_to_save) returns None and the estimate builds the model as for any other.
"""

from __future__ import annotations

from .params import PRESETS, ParamCounts, Shape

LORA_FAMILY = ("lora", "qlora", "dora", "rslora", "pissa", "loraplus")
PEFT_LLAMA_DEFAULT = ("q_proj", "v_proj")  # peft's default LoRA targets for the llama architecture


def preset_shape(name: str) -> Shape:
    p = PRESETS[name]
    return Shape(
        model_type="llama",
        vocab=p["vocab_size"],
        hidden=p["hidden_size"],
        intermediate=p["intermediate_size"],
        layers=p["num_hidden_layers"],
        heads=p["num_attention_heads"],
        kv_heads=p["num_key_value_heads"],
        tied=p["tie_word_embeddings"],
    )


def block_linears(shape: Shape) -> list[tuple[str, int, int]]:
    """(name, in, out) of a Llama block's linear layers (no biases: attention_bias and mlp_bias are off)."""
    h, kv, i = shape.hidden, shape.kv_hidden, shape.intermediate
    return [
        ("q_proj", h, h),
        ("k_proj", h, kv),
        ("v_proj", h, kv),
        ("o_proj", h, h),
        ("gate_proj", h, i),
        ("up_proj", h, i),
        ("down_proj", i, h),
    ]


def _targets(target_modules, names: list[str]) -> list[str] | None:
    if target_modules is None:
        return list(PEFT_LLAMA_DEFAULT)
    if target_modules == "all-linear":  # every linear layer but the output head
        return names
    if isinstance(target_modules, list) and all(t in names for t in target_modules):
        return [n for n in names if n in target_modules]
    return None  # a regex, or a name only the model can resolve (or reject)


def preset_counts(cfg, shape: Shape) -> tuple[ParamCounts, int, list[tuple[str, int]]] | None:
    """(counts, summed input features of the LoRA-adapted layers, (name, out features) of each adapted layer),
    or None where the model must be built."""
    if cfg.model not in PRESETS or cfg.task != "causal_lm" or cfg.method not in ("full", *LORA_FAMILY):
        return None
    linears = block_linears(shape)
    per_block_linear = sum(i * o for _, i, o in linears)
    embedding = shape.vocab * shape.hidden
    head = 0 if shape.tied else embedding
    base = embedding + shape.layers * (per_block_linear + 2 * shape.hidden) + shape.hidden + head
    if cfg.method == "full":
        tensors = 1 + shape.layers * (len(linears) + 2) + 1 + (0 if shape.tied else 1)
        counts = ParamCounts(base, base, shape.layers * per_block_linear, 0, embedding, tensors)
        return counts, 0, []
    lc = cfg.lora
    if lc.rank_pattern or lc.modules_to_save:
        return None
    targets = _targets(lc.target_modules, [n for n, _, _ in linears])
    if targets is None:
        return None
    dora = lc.dora or cfg.method == "dora"
    adapted = [(i, o) for n, i, o in linears if n in targets]
    lora_linear = shape.layers * sum(lc.r * (i + o) for i, o in adapted)  # A (r x in) and B (out x r)
    magnitude = shape.layers * sum(o for _, o in adapted) if dora else 0
    trainable = lora_linear + magnitude
    tensors = shape.layers * len(adapted) * (3 if dora else 2)
    frozen_linear = shape.layers * per_block_linear
    counts = ParamCounts(trainable, base + trainable, frozen_linear + lora_linear, frozen_linear, embedding, tensors)
    outputs = [(f"layers.{k}.{n}", o) for k in range(shape.layers) for n, _, o in linears if n in targets]
    return counts, shape.layers * sum(i for i, _ in adapted), outputs
