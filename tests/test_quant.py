"""QLoRA on CPU: bitsandbytes' packed AVX512-BF16 kernel is kept out (shapes it cannot take, lost gradients)."""

import bitsandbytes as bnb
import torch

from tunelab.config import build_config
from tunelab.methods import get_method
from tunelab.methods.lora import bnb_config
from tunelab.models import load_causal_lm
from tunelab.quant import packed_cpu_kernel_fits, use_generic_4bit_kernel


def qlora_cfg(**extra):
    return build_config(
        {
            "model": "tiny-llama",
            "method": "qlora",
            "train": {"precision": "fp32"},
            "lora": {"target_modules": ["q_proj", "v_proj"], "r": 4},
        }
        | extra
    )


def four_bit_layers(model):
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_packed_kernel_shape_rule():
    assert packed_cpu_kernel_fits(64, 64, 64)
    assert packed_cpu_kernel_fits(32, 128, 64)
    assert not packed_cpu_kernel_fits(32, 32, 64)  # tiny-bert's query: fewer inputs than one block -> [32, 0]
    assert not packed_cpu_kernel_fits(48, 64, 64)  # output rows not a multiple of the 32-row tile


def test_every_4bit_layer_leaves_the_packed_kernel_and_misfits_are_named():
    # force bitsandbytes' AVX512-BF16 choice on every layer, as it is on such a CPU, whatever this CPU is
    model = load_causal_lm(
        "tiny-llama",
        None,
        torch.float32,
        quantization_config=bnb_config(qlora_cfg().quant),
        device_map={"": torch.device("cpu")},
    )
    layers = four_bit_layers(model)
    assert layers
    for m in layers:
        m.support_avx512bf16_for_cpu = True
    m0 = layers[0]
    m0.weight.quant_state.shape = torch.Size([48, m0.weight.quant_state.shape[1]])  # one shape it cannot take
    would_pack, misfits = use_generic_4bit_kernel(model)
    assert would_pack == len(layers)
    assert len(misfits) == 1 and misfits[0].endswith("layers.0.self_attn.q_proj")
    assert not any(m.support_avx512bf16_for_cpu for m in layers)


def test_qlora_base_never_takes_the_packed_kernel():
    model = get_method("qlora").load_base(qlora_cfg(), torch.device("cpu"))
    assert four_bit_layers(model) and not any(
        getattr(m, "support_avx512bf16_for_cpu", False) for m in four_bit_layers(model)
    )


def test_qlora_gradients_survive_an_evaluation():
    """On AVX512-BF16 CPUs a no-grad eval forward used to pack the weights, and the packed kernel has no
    backward: the base layers then passed no gradient (LoRA B gradients all zero)."""
    method, cfg = get_method("qlora"), qlora_cfg()
    ids = torch.randint(5, 1000, (2, 16), generator=torch.Generator().manual_seed(0))

    def grads(evaluate_first):
        torch.manual_seed(0)
        model = method.apply(method.load_base(cfg, torch.device("cpu")), cfg)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
            model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and ".lora_B." in n}

    plain, after_eval = grads(False), grads(True)
    assert all(float(g.abs().max()) > 0 for g in plain.values())
    for name, g in plain.items():
        assert after_eval[name] is not None, name
        assert torch.allclose(after_eval[name], g, rtol=1e-5, atol=0), name
