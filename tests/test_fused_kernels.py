"""The training step's fused functions compute what the code they replace computes: the one-function LoRA layer
(against peft, fp32 and bf16), RMSNorm (bit for bit forward), rotary embedding by halves, the LM-head loss's
reused logit buffers, and the fused AdamW; each is applied only where the replaced code is exactly llama's."""

import copy

import pytest
import torch

from helpers import SavedBytes, grads_of, tiny_lm_batch, tiny_lora_model
from tunelab.losses import selected_loss_sum
from tunelab.models import load_causal_lm
from tunelab.training.frozen import lora_sums_in_fp32, shared_input_casts, store_frozen_at
from tunelab.training.fused_lora import fuse_lora_layers, is_fused
from tunelab.training.fused_norm import fuse_rms_norms
from tunelab.training.fused_rope import apply_rotary_pos_emb, fused_rotary, llama_rotary_modules


def _loss_and_grads(model, batch, low: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
        loss = selected_loss_sum(model, batch, chunk=4)
    loss.backward()
    return float(loss), grads_of(model)


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_fused_lora_layers_equal_peft_in_fp32(smol_tokenizer):
    """fp32 (the AVX2 path): the same products as peft's modules; the scale is applied by the addmm instead of a
    separate multiplication, so loss and gradients agree to fp32 rounding (1e-5 relative)."""
    plain = tiny_lora_model(b_std=0.02)
    fused = copy.deepcopy(plain)
    assert fuse_lora_layers(fused) == 2 * 7 and fuse_lora_layers(torch.nn.Linear(2, 2)) == 0
    batch = tiny_lm_batch(smol_tokenizer.pad_token_id)
    (loss_a, grads_a), (loss_b, grads_b) = (_loss_and_grads(m, batch, low=False) for m in (plain, fused))
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 2 * 7 * 2
    for name, ref in grads_a.items():
        torch.testing.assert_close(grads_b[name], ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()), msg=name)


def test_fused_lora_layers_under_bf16_are_as_close_to_fp32_as_peft_with_fp32_sums(smol_tokenizer):
    """bf16 autocast over a bf16 base: peft's modules (with the fp32 sums and shared casts the trainer adds)
    round the adapter's B product to bf16, the fused layer keeps it fp32; against the fp32 computation the fused
    loss and every LoRA gradient are within bf16's rounding, and no further from it than peft's."""
    reference = tiny_lora_model(b_std=0.02)
    batch = tiny_lm_batch(smol_tokenizer.pad_token_id)
    loss_ref, grads_ref = _loss_and_grads(reference, batch, low=False)
    peft_path, fused = copy.deepcopy(reference), copy.deepcopy(reference)
    for model in (peft_path, fused):
        model.zero_grad(set_to_none=True)
        store_frozen_at(model, torch.bfloat16)
    assert fuse_lora_layers(fused) == 14
    for model in (peft_path, fused):  # the trainer's order: fused layers are skipped by the hooks
        lora_sums_in_fp32(model)
        shared_input_casts(model)
    assert lora_sums_in_fp32(copy.deepcopy(fused)) == 0
    (loss_p, grads_p), (loss_f, grads_f) = (_loss_and_grads(m, batch, low=True) for m in (peft_path, fused))
    assert abs(loss_f - loss_ref) <= max(abs(loss_p - loss_ref), 2e-3 * abs(loss_ref))
    errors_p = [_rel(grads_p[n], g) for n, g in grads_ref.items()]
    errors_f = [_rel(grads_f[n], g) for n, g in grads_ref.items()]
    assert max(errors_f) < 0.05  # bf16 matmuls: 2^-8 per product, summed over a few dozen terms
    assert sum(errors_f) <= 1.1 * sum(errors_p)


def test_a_fused_lora_layer_keeps_a_small_update_and_takes_bf16_inputs():
    """An update of 1e-4 of the base output reaches the fused layer's fp32 output (as with lora_sums_in_fp32);
    a bf16 input (o_proj after bf16 attention) gives an fp32 output and a bf16 input gradient."""
    model = tiny_lora_model(b_std=0.02)
    store_frozen_at(model, torch.bfloat16)
    fuse_lora_layers(model)
    layer = model.base_model.model.model.layers[0].self_attn.o_proj
    base, a, b = layer.get_base_layer(), layer.lora_A["default"], layer.lora_B["default"]
    x = torch.randn(4, 16, base.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_size = float((x @ base.weight.float().T).abs().mean())
        own = b(a(x)) * layer.scaling["default"]
        b.weight.mul_(1e-4 * out_size / float(own.abs().mean()))
        own = b(a(x)) * layer.scaling["default"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, plain = layer(x), base(x)
    assert out.dtype == torch.float32
    assert (out - plain.float() - own).norm() / own.norm() < 0.02
    x_low = x.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x_low)
    out.sum().backward()
    assert out.dtype == torch.float32 and x_low.grad.dtype == torch.bfloat16
    assert b.weight.grad is not None and a.weight.grad is not None


def test_only_plain_lora_layers_are_fused_and_the_rest_is_peft():
    """DoRA keeps peft's forward; mixed-adapter batches (extra arguments), a disabled adapter and another adapter
    switched on after fusing fall back to it."""
    assert fuse_lora_layers(tiny_lora_model(use_dora=True)) == 0
    unfused = tiny_lora_model(b_std=0.02).eval()  # peft takes adapter_names in eval mode only
    model = copy.deepcopy(unfused)
    assert fuse_lora_layers(model) == 14
    assert all(is_fused(m) for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    ids = torch.tensor([[5, 9, 11, 3, 7, 2]])
    with torch.no_grad():
        with model.disable_adapter(), unfused.disable_adapter():
            without = model(input_ids=ids).logits
            assert torch.equal(without, unfused(input_ids=ids).logits)
        with_adapter = model(input_ids=ids).logits
        assert not torch.equal(without, with_adapter)
        torch.testing.assert_close(with_adapter, unfused(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        mixed = model(input_ids=ids, adapter_names=["default"]).logits  # extra arguments: peft's own path
        assert torch.equal(mixed, unfused(input_ids=ids, adapter_names=["default"]).logits)
    from peft import LoraConfig

    for m in (model, unfused):  # another adapter switched on after fusing: the layer is peft's again
        torch.manual_seed(1)
        m.add_adapter("other", LoraConfig(r=2, target_modules="all-linear", init_lora_weights="gaussian"))
        m.set_adapter("other")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, unfused(input_ids=ids).logits)


def test_the_trainer_fuses_plain_lora_layers_but_not_under_compile(tiny_config):
    from tunelab.config import build_config
    from tunelab.training.loop import Trainer

    tiny_config["train"]["precision"] = "bf16"
    trainer = Trainer(build_config(tiny_config), progress=False)
    lora_layers = [m for m in trainer.model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert trainer.cfg.lora.dropout > 0 and trainer.fused_lora == len(lora_layers) > 0  # default: dropout 0.05
    assert trainer.fused_norms == 5  # 2 blocks x 2 norms + the final one
    assert trainer.rotary_modules  # llama's rotary embedding
    assert isinstance(trainer.optimizer.defaults.get("fused"), bool) and trainer.optimizer.defaults["fused"]
    trainer.close()
    tiny_config["train"]["compile"] = True
    trainer = Trainer(build_config(tiny_config), progress=False)
    assert trainer.fused_lora == 0
    trainer.close()


@pytest.mark.parametrize("low", [False, True])
@pytest.mark.parametrize("trainable", [False, True])
def test_fused_rms_norm_equals_autograd_and_saves_less(low, trainable):
    """The fused RMSNorm's forward is llama's, op for op: bit for bit, fp32 input and bf16 input; its input
    gradient (closed form) agrees with autograd's to 1e-6 relative (fp32; bf16: the output's rounding, 1e-2), the
    weight's exactly; with a trainable weight it saves the normalised input less (4 bytes a feature)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    plain = LlamaRMSNorm(48, eps=1e-5)
    plain.weight.data.normal_()
    plain.weight.requires_grad_(trainable)
    fused = copy.deepcopy(plain)
    assert fuse_rms_norms(fused) == 1
    x0 = torch.randn(2, 10, 48, dtype=torch.bfloat16 if low else torch.float32) * 3
    grad = torch.randn(2, 10, 48, dtype=x0.dtype)
    results = []
    for norm in (plain, fused):
        x = x0.clone().requires_grad_()
        with SavedBytes() as saved:
            out = norm(x)
        out.backward(grad)
        results.append((out.detach(), x.grad, norm.weight.grad, saved.total))
    (out_a, gx_a, gw_a, saved_a), (out_b, gx_b, gw_b, saved_b) = results
    assert out_a.dtype == out_b.dtype and torch.equal(out_a, out_b)
    assert gx_b.dtype == x0.dtype and _rel(gx_b, gx_a) < (1e-2 if low else 1e-6)
    if trainable:
        assert _rel(gw_b, gw_a) < (1e-2 if low else 1e-6)
        assert saved_a - saved_b == 2 * 10 * 48 * 4
    else:
        assert gw_a is None and gw_b is None and saved_b <= saved_a


def test_only_llamas_rms_norm_is_fused():
    """Gemma's RMSNorm ((1 + weight) and another order of casts) keeps its forward."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    assert fuse_rms_norms(GemmaRMSNorm(8)) == 0
    assert fuse_rms_norms(Qwen2RMSNorm(8)) == 1  # a copy of llama's


def test_rotary_by_halves_equals_llamas_and_is_swapped_in_only_inside_the_block():
    """Values and gradients of q and k equal llama's rotate_half formula to fp32 rounding (a fused multiply-add
    may round once where it rounds twice), on the transposed (heads, tokens) layout attention hands it; inside
    `fused_rotary` the model's module uses it, outside it is llama's again."""
    from transformers.models.llama import modeling_llama

    torch.manual_seed(0)
    q0 = torch.randn(2, 7, 4, 16).transpose(1, 2)  # (batch, heads, tokens, dim), as LlamaAttention makes it
    k0 = torch.randn(2, 7, 2, 16).transpose(1, 2)
    cos, sin = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    grads = (torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16))
    results = []
    for fn in (modeling_llama.apply_rotary_pos_emb, apply_rotary_pos_emb):
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        outs = fn(q, k, cos, sin)
        torch.autograd.backward(outs, grads)
        results.append([t.detach() for t in outs] + [q.grad, k.grad])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6 * float(a.abs().max()))
    model = load_causal_lm("tiny-llama")
    modules = llama_rotary_modules(model)
    assert modules == [modeling_llama]
    original = modeling_llama.apply_rotary_pos_emb
    with fused_rotary(modules):
        assert modeling_llama.apply_rotary_pos_emb is apply_rotary_pos_emb
    assert modeling_llama.apply_rotary_pos_emb is original


def test_the_model_with_every_fusion_equals_the_plain_model(smol_tokenizer):
    """fp32, a tiny LoRA model with fused LoRA layers, RMSNorms and rotary embedding: loss and every LoRA
    gradient equal the unfused model's to 1e-5 relative."""
    plain = tiny_lora_model(b_std=0.02)
    fused = copy.deepcopy(plain)
    fuse_lora_layers(fused)
    fuse_rms_norms(fused)
    batch = tiny_lm_batch(smol_tokenizer.pad_token_id)
    loss_a, grads_a = _loss_and_grads(plain, batch, low=False)
    with fused_rotary(llama_rotary_modules(fused)):
        loss_b, grads_b = _loss_and_grads(fused, batch, low=False)
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    for name, ref in grads_a.items():
        torch.testing.assert_close(grads_b[name], ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()), msg=name)


def test_the_fused_loss_reuses_one_logit_workspace_on_the_head():
    """The chunk buffers live on the head's weight: a second call (another number of label positions) reuses
    them, they never exceed the chunk's rows, and the values equal a fresh computation."""
    from tunelab.losses import FusedLinearCrossEntropy, head_ce_sum

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = head_ce_sum(hidden, head, targets, chunk=8)
    low, f32 = head.weight._tunelab_logit_workspace
    assert low.shape == f32.shape == (8, 50) and low.dtype == torch.bfloat16 and f32.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        second = head_ce_sum(hidden[:5], head, targets[:5], chunk=8)
    assert head.weight._tunelab_logit_workspace[0].data_ptr() == low.data_ptr()
    del head.weight._tunelab_logit_workspace
    fresh = FusedLinearCrossEntropy.apply(hidden[:5], head.weight, None, targets[:5], 8, torch.bfloat16)
    assert torch.equal(second, fresh) and first > second
    fp32 = head_ce_sum(hidden, head, targets, chunk=8)  # fp32: one buffer serves both
    low, f32 = head.weight._tunelab_logit_workspace
    assert low is f32 and f32.dtype == torch.float32
    assert float(fp32) == pytest.approx(
        float(torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")), rel=1e-5
    )


def test_the_lora_function_passes_gradcheck_in_fp64():
    """The hand-written backward is the forward's derivative (finite differences, fp64), bias and all."""
    from tunelab.training.fused_lora import LoraLinear

    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    a = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: LoraLinear.apply(x, x, weight, bias, a, b, 0.7, 0.0), (x, a, b))


def test_lora_dropout_masks_the_adapters_input_as_peft_defines_it():
    """With dropout p the output is base(x) + scale / (1 - p) * ((x * mask) A^T) B^T for the boolean mask the
    function draws (reproduced here from the same seed), and the gradients are that expression's (autograd);
    in eval mode a dropout layer's fused forward is the plain one."""
    from tunelab.training.fused_lora import LoraLinear

    torch.manual_seed(0)
    x0 = torch.randn(6, 8)
    weight = torch.randn(5, 8)
    a0, b0 = torch.randn(3, 8), torch.randn(5, 3)
    grad = torch.randn(6, 5)

    def run(fn):
        x, a, b = (t.clone().requires_grad_() for t in (x0, a0, b0))
        torch.manual_seed(7)
        out = fn(x, a, b)
        out.backward(grad)
        return [out.detach(), x.grad, a.grad, b.grad]

    def reference(x, a, b):
        mask = torch.empty(x.shape, dtype=torch.bool).bernoulli_(1 - 0.25)
        return x @ weight.T + 2.0 / (1 - 0.25) * ((x * mask) @ a.T) @ b.T

    fused = run(lambda x, a, b: LoraLinear.apply(x, x, weight, None, a, b, 2.0, 0.25))
    for got, want in zip(fused, run(reference)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    model = tiny_lora_model(b_std=0.02, lora_dropout=0.3)
    fused_model = copy.deepcopy(model)
    assert fuse_lora_layers(fused_model) == 14
    ids = torch.tensor([[5, 9, 11, 3, 7, 2]])
    with torch.no_grad():
        model.eval(), fused_model.eval()
        torch.testing.assert_close(fused_model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        fused_model.train()
        assert not torch.allclose(fused_model(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
