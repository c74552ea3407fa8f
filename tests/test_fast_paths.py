"""The fast paths compute what the plain path computes: the fused LM-head cross-entropy (values and
gradients), the bf16 frozen base, the fused gated MLP, the compiled model."""

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

from helpers import SavedBytes, grads_of, tiny_lm_batch, tiny_lora_model
from tunelab.data.encode import IGNORE_INDEX
from tunelab.losses import (
    FusedLinearCrossEntropy,
    head_ce_sum,
    head_on_labels,
    label_logps,
    label_suffix,
    loss_sum,
    plain_loss_sum,
    selected_loss_sum,
    supports_selected_loss,
)
from tunelab.models import load_causal_lm


@pytest.mark.parametrize("scale", [1.0, 200.0])
def test_fused_head_cross_entropy_equals_plain_values_and_gradients_fp32(scale):
    """Hidden states, a trainable head with a bias, several chunks: loss and all three gradients match
    autograd through full logits. fp32 throughout, so only summation order differs: 1e-5 relative. Scaled
    hidden states give logits in the hundreds, where an unshifted softmax would overflow."""
    g = torch.Generator().manual_seed(0)
    hidden = (scale * torch.randn(37, 16, generator=g)).requires_grad_()
    head = torch.nn.Linear(16, 50)
    targets = torch.randint(0, 50, (37,), generator=g)
    ref = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    ref_grads = torch.autograd.grad(2.5 * ref, [hidden, head.weight, head.bias])
    fused = head_ce_sum(hidden, head, targets, chunk=8)  # 5 chunks, the last one short
    grads = torch.autograd.grad(2.5 * fused, [hidden, head.weight, head.bias])  # a scaled upstream gradient
    assert float(fused.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))


@pytest.mark.parametrize("trainable_head", [False, True])
def test_selected_loss_gradients_equal_the_plain_path(smol_tokenizer, trainable_head):
    """The whole model (tiny-llama, tied embeddings): every parameter's gradient through the fused label-position
    loss equals the plain full-logits loss's. fp32: 1e-5 relative to each gradient's scale."""
    model = load_causal_lm("tiny-llama")
    model.get_output_embeddings().weight.requires_grad_(trainable_head)
    batch = tiny_lm_batch(smol_tokenizer.pad_token_id)
    plain = plain_loss_sum(model, batch, suffix=False)
    plain.backward()
    g_plain = grads_of(model)
    model.zero_grad(set_to_none=True)
    fast = selected_loss_sum(model, batch, chunk=4)  # several chunks
    fast.backward()
    g_fast = grads_of(model)
    assert float(fast) == pytest.approx(float(plain), rel=1e-5)
    assert g_fast.keys() == g_plain.keys() and len(g_fast) > 10
    for name, ref in g_plain.items():
        torch.testing.assert_close(g_fast[name], ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()), msg=name)


def _prompt_learning(kind: str):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

    torch.manual_seed(0)
    config = {"prompt": PromptTuningConfig, "ptuning": PromptEncoderConfig, "prefix": PrefixTuningConfig}[kind]
    return get_peft_model(load_causal_lm("tiny-llama"), config(task_type="CAUSAL_LM", num_virtual_tokens=3))


def test_label_suffix_starts_one_before_the_first_label_of_any_row():
    labels = torch.full((2, 10), IGNORE_INDEX)
    assert label_suffix(labels) == 0
    labels[0, 7], labels[1, 4] = 1, 2  # position 3 predicts the first label: positions 3..9 are kept
    assert label_suffix(labels) == 7


@pytest.mark.parametrize("kind", ["prompt", "ptuning", "prefix"])
def test_virtual_token_methods_take_the_fused_label_path_with_the_same_numbers(smol_tokenizer, kind):
    """Prompt learning (peft adds the virtual tokens in its own forward) runs that forward with the LM head
    bypassed, then the fused head on label positions only (loss_sum's fast path); the plain path asks for the
    logits from the first label on only. Value, every trainable gradient and the per-token log-probs (DPO) of
    both equal the full-logits path; fp32, so 1e-5 relative. The head is the model's own again afterwards."""
    model = _prompt_learning(kind)
    head = model.get_base_model().get_output_embeddings()
    assert head_on_labels(model) and not supports_selected_loss(model)
    batch = tiny_lm_batch(smol_tokenizer.pad_token_id)
    assert 0 < label_suffix(batch["labels"]) < batch["input_ids"].shape[1]
    full = plain_loss_sum(model, batch, suffix=False)
    full.backward()
    g_full = grads_of(model)
    assert g_full
    for loss in (lambda: plain_loss_sum(model, batch), lambda: loss_sum(model, batch)):
        model.zero_grad(set_to_none=True)
        value = loss()
        value.backward()
        grads = grads_of(model)
        assert float(value.detach()) == pytest.approx(float(full.detach()), rel=1e-5)
        assert grads.keys() == g_full.keys()
        for name, ref in g_full.items():
            torch.testing.assert_close(grads[name], ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()), msg=name)
    with torch.no_grad():
        torch.testing.assert_close(
            label_logps(model, batch), label_logps(model, batch, fast=False), rtol=1e-5, atol=1e-5
        )
    assert model.get_base_model().get_output_embeddings() is head


def test_a_bypassed_head_comes_back_when_the_forward_fails(smol_tokenizer):
    model = _prompt_learning("prefix")
    head = model.get_base_model().get_output_embeddings()
    batch = tiny_lm_batch(smol_tokenizer.pad_token_id)
    batch["input_ids"] = batch["input_ids"] + 10**6  # out of the vocabulary: the embedding fails
    with pytest.raises(IndexError):
        loss_sum(model, batch)
    assert model.get_base_model().get_output_embeddings() is head


def test_fused_loss_keeps_no_vocabulary_sized_tensor_for_backward():
    """What the Function saves for backward is d(loss)/d(hidden) only (N x hidden), never N x vocab."""
    hidden = torch.randn(64, 8, requires_grad=True)
    head = torch.nn.Linear(8, 1000).requires_grad_(False)
    loss = FusedLinearCrossEntropy.apply(hidden, head.weight, None, torch.randint(0, 1000, (64,)), 16, torch.float32)
    saved = [t for t in loss.grad_fn.saved_tensors if t is not None]
    assert [tuple(t.shape) for t in saved] == [(64, 8)]


def test_bf16_frozen_base_equals_autocast_over_fp32_weights(smol_tokenizer):
    """Under bf16 autocast, a base stored in bf16 runs the same matmuls as an fp32 base that autocast
    casts: the same loss and LoRA gradients. Only kernel-internal ordering could differ: 1e-6 relative."""
    import copy

    from tunelab.training.frozen import store_frozen_at

    plain = tiny_lora_model()
    low = copy.deepcopy(plain)
    assert store_frozen_at(low, torch.bfloat16) > 0
    dtypes = {n: p.dtype for n, p in low.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n or "norm" in n or "embed" in n)
    assert {d for n, d in dtypes.items() if "base_layer" in n} == {torch.bfloat16}
    batch = tiny_lm_batch(smol_tokenizer.pad_token_id)
    results = []
    for model in (plain, low):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = selected_loss_sum(model, batch, chunk=4)
        loss.backward()
        results.append((float(loss), grads_of(model)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and all("lora_" in n for n in grads_a)
    for name, ref in grads_a.items():
        torch.testing.assert_close(grads_b[name], ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()), msg=name)


def test_a_lora_layer_keeps_a_small_update_under_bf16_autocast():
    """peft adds the adapter's output to the base output and casts the sum to the base output's dtype, bf16
    under autocast: an update of 1e-4 of the base output (an adapter's first steps) is rounded to the bf16
    step of the base output (2^-8 of it), mostly away. With lora_sums_in_fp32 the sum is fp32, so the layer
    output minus the base output is the adapter's own output; that is computed by bf16 matmuls, hence 2%."""
    from peft.tuners.lora import LoraLayer

    from tunelab.training.frozen import lora_sums_in_fp32, store_frozen_at

    model = tiny_lora_model()
    store_frozen_at(model, torch.bfloat16)
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    base = layer.get_base_layer()
    x = torch.randn(4, 16, base.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_size = float((x @ base.weight.float().T).abs().mean())
        layer.lora_B["default"].weight.normal_(generator=torch.Generator().manual_seed(1))
        own = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
        layer.lora_B["default"].weight.mul_(1e-4 * out_size / float(own.abs().mean()))
        own = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]  # fp32

    def update():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out, plain = layer(x), base(x)
        return out, (out.float() - plain.float() - own).norm() / own.norm()

    out, error = update()
    assert out.dtype == torch.bfloat16 and error > 0.3  # what peft does on its own
    assert lora_sums_in_fp32(model) == sum(isinstance(m, LoraLayer) for m in model.modules())
    out, error = update()
    assert out.dtype == torch.float32 and error < 0.02


def test_shared_input_casts_equal_autocast_casts(smol_tokenizer):
    """Casting a LoRA layer's fp32 input to bf16 once for its base, its A matrix and the layers after it that
    read the same tensor (q/k/v, gate/up) gives autocast's values bit for bit: loss and every LoRA gradient
    (each reader's gradient is cast back and summed in fp32, as before), with far fewer forward casts."""
    import copy

    from torch.utils._python_dispatch import TorchDispatchMode

    from tunelab.training.frozen import lora_sums_in_fp32, shared_input_casts, store_frozen_at

    class CountCasts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.casts = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.casts += func is torch.ops.aten._to_copy.default
            return func(*args, **(kwargs or {}))

    plain = tiny_lora_model()
    store_frozen_at(plain, torch.bfloat16)
    lora_sums_in_fp32(plain)
    shared = copy.deepcopy(plain)
    assert shared_input_casts(shared) == 2 * 7 * 2  # tiny-llama: 2 blocks x 7 LoRA layers x (base, A)
    batch = tiny_lm_batch(smol_tokenizer.pad_token_id)
    results = []
    for model in (plain, shared):
        with torch.autocast("cpu", dtype=torch.bfloat16), CountCasts() as counter:
            loss = selected_loss_sum(model, batch, chunk=4)
        loss.backward()
        results.append((loss.detach(), grads_of(model), counter.casts))
    (loss_a, grads_a, casts_a), (loss_b, grads_b, casts_b) = results
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys()
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    # per block, autocast cast the fp32 input of q/k/v (6 casts: base and A each), gate/up (4) and down (2):
    # now once each (3); o_proj's bf16 input is cast for its A by peft either way
    assert casts_b == casts_a - 2 * 9


@pytest.mark.parametrize("low", [False, True])
@pytest.mark.parametrize("lora", [False, True])
def test_fused_gated_mlp_equals_autograd_and_saves_no_silu_output(smol_tokenizer, low, lora):
    """SiLUMul(gate, up) gives autograd's silu(gate) * up bit for bit: loss and every gradient, fp32 and under
    bf16 autocast (with a LoRA model's fp32 sums: gate and up fp32, down's input cast), full fine-tuning and LoRA.
    It saves one (tokens x intermediate) tensor per MLP fewer: SiLU's output, 4 bytes a feature (2 in bf16)."""
    import copy

    from tunelab.training.frozen import lora_sums_in_fp32, shared_input_casts, store_frozen_at
    from tunelab.training.gated_mlp import fuse_gated_mlps

    if lora:
        plain = tiny_lora_model()
        if low:
            store_frozen_at(plain, torch.bfloat16)
            lora_sums_in_fp32(plain)
            shared_input_casts(plain)
    else:
        torch.manual_seed(0)
        plain = load_causal_lm("tiny-llama")
    fused = copy.deepcopy(plain)
    assert fuse_gated_mlps(fused) == 2 and fuse_gated_mlps(torch.nn.Linear(2, 2)) == 0
    batch = tiny_lm_batch(smol_tokenizer.pad_token_id)
    results = []
    for model in (plain, fused):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low), SavedBytes() as saved:
            loss = selected_loss_sum(model, batch, chunk=4)
        loss.backward()
        results.append((loss.detach(), grads_of(model), saved.total))
    (loss_a, grads_a, saved_a), (loss_b, grads_b, saved_b) = results
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    silu_dtype = torch.float32 if lora or not low else torch.bfloat16  # a LoRA gate's sum is fp32
    config = plain.config
    tokens = batch["input_ids"].numel()
    assert saved_a - saved_b == config.num_hidden_layers * tokens * config.intermediate_size * silu_dtype.itemsize


def test_only_llamas_own_gated_forward_is_fused():
    """A gated MLP with llama's submodules and another forward (here: a scaled product), or another activation,
    keeps its forward: fusing it would silently change the model."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    from tunelab.training.gated_mlp import fuse_gated_mlps

    class ScaledMLP(LlamaMLP):
        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) * 0.5)

    config = load_causal_lm("tiny-llama").config
    assert fuse_gated_mlps(ScaledMLP(config)) == 0
    gelu = LlamaMLP(config)
    gelu.act_fn = torch.nn.GELU()
    assert fuse_gated_mlps(gelu) == 0
    assert fuse_gated_mlps(LlamaMLP(config)) == 1


@pytest.mark.parametrize("precision", ["bf16", "fp32", "auto-avx2"])
def test_trainer_stores_the_frozen_base_at_the_compute_precision(tiny_config, precision, monkeypatch):
    """auto-avx2: precision auto on a CPU without native bf16 (TUNELAB_CPU_BF16=0) trains in fp32, base too."""
    import warnings

    from tunelab.config import build_config
    from tunelab.device import CPU_BF16_ENV
    from tunelab.training.loop import Trainer

    if precision == "auto-avx2":
        monkeypatch.setenv(CPU_BF16_ENV, "0")
        precision = "fp32"
        tiny_config["train"]["precision"] = "auto"
    else:
        tiny_config["train"]["precision"] = precision
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an AVX2-only CPU warns that bf16 is slow
        trainer = Trainer(build_config(tiny_config), progress=False)
    frozen = {p.dtype for n, p in trainer.model.named_parameters() if "base_layer" in n}
    assert frozen == {torch.bfloat16 if precision == "bf16" else torch.float32}
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}  # fp32 masters
    layer = trainer.model.base_model.model.model.layers[0].self_attn.q_proj  # a LoRA layer's sum stays fp32
    with torch.no_grad(), trainer.autocast():
        assert layer(torch.randn(2, layer.in_features)).dtype == torch.float32
    assert trainer.precision == precision
    assert trainer.fused_mlps == 2  # every precision: tiny-llama's two gated MLPs
    trainer.close()


@pytest.mark.skipif(
    os.environ.get("TUNELAB_COMPILE_TESTS") != "1",
    reason="dynamo tracing takes ~160 s on the shared 2-core machine; TUNELAB_COMPILE_TESTS=1 runs it",
)
def test_compiled_blocks_equal_eager(smol_tokenizer):
    """train.compile's regional compilation: each decoder block captured by dynamo (dynamic shapes, graph
    breaks at the per-example attention) and differentiated by AOT autograd, on packed batches of two shapes;
    loss and LoRA gradients equal eager. The suite uses the aot_eager backend: inductor's C++ compile took over
    10 minutes for this tiny model on the shared 2-core machine (the bench measures inductor). fp32: 1e-5."""
    import copy

    from tunelab.attention import varlen_attention
    from tunelab.data.collate import varlen_batch
    from tunelab.training.compiled import compile_blocks

    torch._dynamo.reset()
    eager = tiny_lora_model()
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled, backend="aot_eager") == 2
    examples = [
        {"input_ids": list(range(5, 5 + n)), "labels": [IGNORE_INDEX] * (n // 2) + list(range(5 + n // 2, 5 + n))}
        for n in (7, 12, 9)
    ]
    results = []
    for model in (eager, compiled):
        for batch in (varlen_batch(examples), varlen_batch(examples[:2])):  # a second shape: no recompile
            with varlen_attention(model):
                loss = selected_loss_sum(model, batch, chunk=4)
                loss.backward()
        results.append((float(loss.detach()), grads_of(model)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name, ref in grads_a.items():
        torch.testing.assert_close(grads_b[name], ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()), msg=name)


def _per_example_reference(q, k, v, bounds, scale):
    """Causal SDPA on each example alone, key/value heads repeated for grouped-query attention."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    cuts = list(zip(bounds[:-1], bounds[1:]))
    parts = [
        F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, scale=scale)
        for s, e in cuts
    ]
    return torch.cat(parts, dim=2).transpose(1, 2)


def _varlen_with_grads(q0, k0, v0, bounds, grad_out, autocast: bool):
    from tunelab import attention

    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, _ = attention._varlen_sdpa(None, q, k, v, None, scaling=0.3, cu_seq_lens_q=torch.tensor(bounds))
    out.backward(grad_out)
    return [out.detach(), q.grad, k.grad, v.grad]


def test_packed_attention_equals_per_example_reference():
    """CPU packed rows: grouped-query heads inside SDPA against repeated key/value heads, example by example:
    outputs and input gradients, fp32 (only the kernels' blocking differs: 1e-5 relative)."""
    torch.manual_seed(0)
    bounds = [0, 5, 17, 18, 30]
    q0, k0, v0 = torch.randn(1, 4, 30, 8), torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    grad_out = torch.randn(1, 30, 4, 8)
    ours = _varlen_with_grads(q0, k0, v0, bounds, grad_out, autocast=False)
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    ref = _per_example_reference(q, k, v, bounds, 0.3)
    ref.backward(grad_out)
    assert ours[0].is_contiguous() and ours[0].shape == ref.shape
    for a, b in zip(ours, [ref.detach(), q.grad, k.grad, v.grad]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_bf16_packed_attention_runs_in_fp32_on_cpu():
    """bf16 rows (as under bf16 autocast) run SDPA in fp32: the output and the gradients are the fp32
    computation of the same inputs rounded once to bf16, bit for bit, with autocast on too (it would cast
    SDPA's inputs back to bf16); and closer to an fp64 reference than bf16 SDPA."""
    torch.manual_seed(0)
    bounds = [0, 40, 97, 110, 160]
    q0, k0, v0 = (torch.randn(1, h, 160, 16).bfloat16() for h in (6, 2, 2))
    grad_out = torch.randn(1, 160, 6, 16).bfloat16()
    wide = _varlen_with_grads(q0.float(), k0.float(), v0.float(), bounds, grad_out.float(), autocast=False)
    for autocast in (False, True):
        ours = _varlen_with_grads(q0, k0, v0, bounds, grad_out, autocast=autocast)
        assert [t.dtype for t in ours] == [torch.bfloat16] * 4
        for a, b in zip(ours, wide):
            assert torch.equal(a, b.bfloat16())
    exact = _per_example_reference(q0.double(), k0.double(), v0.double(), bounds, 0.3)
    narrow = _per_example_reference(q0, k0, v0, bounds, 0.3)
    err = lambda t: float((t.double() - exact).abs().max() / exact.abs().max())  # noqa: E731
    assert err(ours[0]) <= err(narrow)


def test_dora_inference_with_cached_norms_equals_recomputed(smol_tokenizer, monkeypatch):
    """Inside `dora_norms_cached` each DoRA layer computes B @ A and its weight norm once: logits and greedy
    generation are bit-identical to peft recomputing them every forward, and the cache is empty afterwards, so
    weights changed in eval mode (a restored checkpoint) are seen by the next evaluation."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.dora import DoraLinearLayer

    from tunelab.generation import GenerationSettings, generate_batch
    from tunelab.methods.lora import dora_norms_cached

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    model = get_peft_model(load_causal_lm("tiny-llama"), config).eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # not the identity it starts as
    layers = [m for m in model.modules() if isinstance(m, DoraLinearLayer)]
    ids = torch.tensor([[5, 9, 11, 3, 7, 2]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with dora_norms_cached(model):
            first = model(input_ids=ids).logits
            assert all(layer._dora_cache for layer in layers)  # the cache is in use
            again = model(input_ids=ids).logits
    assert torch.equal(first, plain) and torch.equal(again, plain)
    assert not any(layer._dora_cache for layer in layers)
    settings = GenerationSettings.greedy(6)
    with torch.no_grad():
        with dora_norms_cached(model):
            model(input_ids=ids)
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.mul_(2.0)  # changed in eval mode, between two evaluations
        changed = model(input_ids=ids).logits
        with dora_norms_cached(model):
            assert torch.equal(model(input_ids=ids).logits, changed)
    assert not torch.equal(changed, plain)
    prompts = ["What is 2+2?", "Name a colour."]
    with torch.no_grad():
        cached = generate_batch(model, smol_tokenizer, prompts, settings)
        monkeypatch.setattr("tunelab.methods.lora.dora_norms_cached", lambda m: contextlib.nullcontext())
        recomputed = generate_batch(model, smol_tokenizer, prompts, settings)
    assert cached == recomputed
