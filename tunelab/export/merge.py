"""Folding a trained adapter into its base: a plain transformers model that loads without tunelab or peft.

peft's `merge_and_unload` does the folding (LoRA, DoRA's magnitude, rsLoRA's scale, PiSSA's residual base,
IA3, AdaLoRA). A QLoRA adapter was trained against the 4-bit base, not the original weights: it is merged
into those 4-bit weights dequantized to fp32 (merging into the original fp32 weights would move the model
by the quantization error the adapter learned around, and peft's own merge of a 4-bit layer re-quantizes
the sum back to 4 bits).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..methods import get_method
from ..models import load_causal_lm

# methods whose artifact peft can fold into the base weights
MERGEABLE = {"lora", "dora", "rslora", "pissa", "loraplus", "qlora", "ia3", "adalora"}
# the artifact is already a whole model
WHOLE_MODEL = {"full", "freeze"}


def check_mergeable(cfg) -> None:
    if cfg.task != "causal_lm":
        raise UserError(f"tunelab export handles causal LM runs; this run's task is '{cfg.task}'")
    if cfg.method not in MERGEABLE | WHOLE_MODEL:
        raise UserError(
            f"method '{cfg.method}' cannot be merged into the base (virtual tokens / extra modules are not weights "
            f"of the base model); export its adapter without --merge, or train one of: {', '.join(sorted(MERGEABLE))}"
        )


def is_quantized_base(cfg) -> bool:
    method = get_method(cfg.method)
    return bool(getattr(method, "quant_bits", lambda c: None)(cfg))


def dequantized_base(cfg, trained):
    """An fp32 copy of the base whose quantized linear layers hold the 4-/8-bit weights of `trained` (the run
    loaded with its quantized base), dequantized: the weights its adapter was trained against."""
    import bitsandbytes as bnb
    from peft.utils.integrations import dequantize_bnb_weight

    base = load_causal_lm(cfg.model, torch.device("cpu"), torch.float32, cfg.trust_remote_code, cfg.allow_pickle)
    plain = dict(base.named_modules())
    copied = 0
    for name, module in trained.get_base_model().named_modules():
        if isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt):
            # inside the peft model a quantized layer is a LoRA layer's `base_layer`
            target = plain[name.removesuffix(".base_layer")]
            weight = dequantize_bnb_weight(module.weight, state=getattr(module, "state", None))
            target.weight.data.copy_(weight.to(torch.float32))
            copied += 1
    if not copied:
        raise RuntimeError("the run's base has no quantized layers to dequantize")
    base.eval()
    return base


def adapter_on(base, run: Path, cfg):
    """The run's adapter loaded with plain peft onto `base` (not merged)."""
    from peft import PeftModel

    artifact = Path(run) / get_method(cfg.method).artifact
    return PeftModel.from_pretrained(base, artifact, adapter_name=cfg.adapter_name, is_trainable=False).eval()


def merged_model(run: Path, cfg, trained) -> tuple[torch.nn.Module, str]:
    """(the merged plain model, what it was merged into). `trained` (the run as tunelab loads it) is left as it is."""
    check_mergeable(cfg)
    if cfg.method in WHOLE_MODEL:
        model = load_causal_lm(str(Path(run) / "model"), torch.device("cpu"), torch.float32, cfg.trust_remote_code)
        return model.eval(), "nothing: the run trained the whole model"
    if is_quantized_base(cfg):
        base = dequantized_base(cfg, trained)
        into = (
            f"the dequantized {cfg.quant.bits or 4}-bit ({cfg.quant.type if (cfg.quant.bits or 4) == 4 else 'int8'}) "
            "base weights the adapter was trained against, in fp32 (not the original fp32 weights)"
        )
    else:
        base = load_causal_lm(cfg.model, torch.device("cpu"), torch.float32, cfg.trust_remote_code, cfg.allow_pickle)
        into = "the base model's fp32 weights"
    model = adapter_on(base, run, cfg).merge_and_unload()
    return model.eval(), into


def save_plain_model(model, tokenizer, out: Path) -> None:
    """A transformers model directory: safetensors weights, config, generation config, tokenizer, chat template."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)  # the run's chat template is set on it: saved as chat_template.jinja
