"""int8 for CPU inference: the decoder's linear weights as int8 with one fp32 scale per output row
(symmetric), saved without pickle (safetensors + a JSON manifest) and reloaded by `load_int8`.

Three CPU runtimes take the same files. `dequant` (the default): int8 weights kept in memory, each layer's rows
scaled back per call, so only the weights are rounded. `torch`: torch's dynamic quantization (fbgemm int8 GEMM),
faster, but it also rounds the activations to int8 per tensor, and SmolLM2's activation outliers make that drift
(measured on the demo run: mean KL 1.7 nats/token, exact match 0.94 -> 0.38). `torchao`: its int8 weight-only
tensors (the optional extra tunelab[int8]). The embedding and a tied output head stay fp32 (the head shares the embedding's weights).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..io import atomic_write_json, read_json_object
from ..methods.full import transformer_blocks

WEIGHTS = "model-int8.safetensors"
MANIFEST = "int8.json"
RUNTIMES = ("dequant", "torch", "torchao")


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 scale per output row): round(w / s) with s = max|row| / 127."""
    w = weight.detach().to(torch.float32)
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _linear_names(model) -> list[str]:
    prefix, blocks = transformer_blocks(model)
    return [f"{prefix}.{n}" for n, m in blocks.named_modules() if isinstance(m, nn.Linear)]


def save_int8(model, tokenizer, out: Path) -> dict:
    """Write the int8 model directory; returns byte counts of the quantized linear weights (fp32 vs int8)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    names = _linear_names(model)
    tensors, fp32_bytes, int8_bytes = {}, 0, 0
    modules = dict(model.named_modules())
    for name in names:
        q, scale = quantize_rows(modules[name].weight)
        tensors[f"{name}.qweight"], tensors[f"{name}.scale"] = q, scale
        fp32_bytes += modules[name].weight.numel() * 4
        int8_bytes += q.numel() + scale.numel() * 4
    quantized = {f"{n}.weight" for n in names}
    seen = set()
    for key, value in model.state_dict().items():
        if key in quantized or value.data_ptr() in seen:  # a tied head is the embedding: stored once
            continue
        seen.add(value.data_ptr())
        tensors[key] = value.detach().contiguous()
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt", "tunelab": "int8 per-row symmetric"})
    model.config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    atomic_write_json(out / MANIFEST, {"scheme": "int8 symmetric, one fp32 scale per output row", "linear": names})
    return {"linear_fp32_bytes": fp32_bytes, "linear_int8_bytes": int8_bytes}


class Int8Linear(nn.Module):
    """A linear layer holding int8 weights and a per-row scale; the weight is rebuilt in the input's dtype per call."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias):
        super().__init__()
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(torch.float32))
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = q.shape[1], q.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.qweight.to(x.dtype) * self.scale[:, None].to(x.dtype)
        return nn.functional.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


def _torch_linear(q: torch.Tensor, scale: torch.Tensor, bias):
    from torch.ao.nn.quantized.dynamic import Linear

    with warnings.catch_warnings():  # torch marks its quantized tensors deprecated (torchao takes over)
        warnings.simplefilter("ignore")
        layer = Linear(q.shape[1], q.shape[0], bias_=bias is not None, dtype=torch.qint8)
        zero = torch.zeros(q.shape[0], dtype=torch.long)
        qweight = torch._make_per_channel_quantized_tensor(q, scale.to(torch.float64), zero, 0)
        layer.set_weight_bias(qweight, bias)
    return layer


def _torchao_linear(q: torch.Tensor, scale: torch.Tensor, bias):
    try:
        from torchao.quantization import Int8Tensor
    except ImportError:
        raise UserError(
            "int8 runtime 'torchao' needs torchao: pip install 'tunelab[int8]' (or runtime='dequant')"
        ) from None
    from torchao.quantization.granularity import PerRow

    layer = nn.Linear(q.shape[1], q.shape[0], bias=bias is not None)
    weight = q.to(torch.float32) * scale[:, None]
    # the saved scale, not a new one: the same int8 values come back
    layer.weight = nn.Parameter(Int8Tensor.from_hp(weight, PerRow(), scale=scale[:, None]), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def load_int8(path, runtime: str = "dequant"):
    """(model, tokenizer) from an int8 export directory, for CPU inference (eval mode)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..io import read_safetensors

    if runtime not in RUNTIMES:
        raise UserError(f"int8 runtime '{runtime}': choose one of {', '.join(RUNTIMES)}")
    path = Path(path)
    manifest = read_json_object(path / MANIFEST)
    tensors = read_safetensors(path / WEIGHTS)
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    make = {"dequant": Int8Linear, "torch": _torch_linear, "torchao": _torchao_linear}[runtime]
    for name in manifest["linear"]:
        parent, _, attr = name.rpartition(".")
        old = model.get_submodule(name)
        bias = tensors.pop(f"{name}.bias", None) if old.bias is not None else None
        setattr(
            model.get_submodule(parent), attr, make(tensors.pop(f"{name}.qweight"), tensors.pop(f"{name}.scale"), bias)
        )
    for key, value in tensors.items():  # the fp32 rest, set by name (the quantized layers read no state dict)
        owner, _, attr = key.rpartition(".")
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            raise UserError(f"{path / WEIGHTS}: unexpected tensor {key}") from None
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[attr] = value
    model.tie_weights()
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise UserError(f"{path / WEIGHTS}: missing tensors {meta[:3]}")
    return model.eval(), AutoTokenizer.from_pretrained(path)


def int8_summary(path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
