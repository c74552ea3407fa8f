"""Bottleneck adapters on tiny-llama and tiny-bert: identity at step 0, placement, frozen base, save/load."""

import json
import types

import pytest
import torch

from tunelab.errors import UserError
from tunelab.methods.adapter import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdaptedLinear,
    BottleneckAdapter,
    BottleneckAdapterMethod,
)
from tunelab.models import load_causal_lm, resolve_model_path

METHOD = BottleneckAdapterMethod()


def adapter_cfg(kind="houlsby", reduction=4, non_linearity="relu", dropout=0.0):
    return types.SimpleNamespace(
        adapter=types.SimpleNamespace(kind=kind, reduction=reduction, non_linearity=non_linearity, dropout=dropout)
    )


def tiny_llama():
    return load_causal_lm("tiny-llama").eval()


def tiny_bert(head=False):
    from transformers import AutoModel, AutoModelForSequenceClassification

    path = resolve_model_path("tiny-bert")
    if head:
        torch.manual_seed(0)  # the classification head is new (random) on every load
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=3).eval()
    return AutoModel.from_pretrained(path).eval()


def llama_ids(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (2, 12), generator=g)


def bert_ids(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (2, 10), generator=g)


def llama_out(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def bert_out(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def wrapped(model):
    return [name for name, m in model.named_modules() if isinstance(m, AdaptedLinear)]


def adapter_param_count(hidden, reduction, n_adapters):
    """down (hidden*b + b) plus up (b*hidden + hidden) per adapter; houlsby has 2 adapters a layer."""
    b = hidden // reduction
    return n_adapters * (hidden * b + b + b * hidden + hidden)


def trainable(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# --- step 0: placement, identity, trainable set ---------------------------------------------------


@pytest.mark.parametrize("kind,per_layer", [("houlsby", 2), ("pfeiffer", 1)])
def test_llama_step0_is_identity_and_only_adapters_train(kind, per_layer):
    base, model = tiny_llama(), tiny_llama()
    ids = llama_ids(base)
    before = llama_out(base, ids)
    out = METHOD.apply(model, adapter_cfg(kind))
    assert out is model
    n_layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    names = wrapped(model)
    expected = [
        f"model.layers.{i}.{t}"
        for i in range(n_layers)
        for t in (["self_attn.o_proj", "mlp.down_proj"] if kind == "houlsby" else ["mlp.down_proj"])
    ]
    assert names == expected and len(names) == per_layer * n_layers
    assert (llama_out(model, ids) - before).abs().max().item() < 1e-6
    params = trainable(model)
    assert params and all(".adapter." in n for n in params)
    assert all(p.dtype == torch.float32 for p in params.values())
    assert sum(p.numel() for p in params.values()) == adapter_param_count(hidden, 4, per_layer * n_layers)
    assert model.tunelab_adapter_config["targets"] == expected


@pytest.mark.parametrize("kind", ["houlsby", "pfeiffer"])
def test_bert_step0_is_identity_with_the_right_sublayers(kind):
    base, model = tiny_bert(), tiny_bert()
    ids = bert_ids(base)
    before = bert_out(base, ids)
    METHOD.apply(model, adapter_cfg(kind))
    n_layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    own = [f"encoder.layer.{i}.output.dense" for i in range(n_layers)]
    attn = [f"encoder.layer.{i}.attention.output.dense" for i in range(n_layers)]
    names = wrapped(model)
    if kind == "houlsby":
        assert sorted(names) == sorted(attn + own) and len(set(names)) == 2 * n_layers
    else:
        assert names == own
    assert (bert_out(model, ids) - before).abs().max().item() < 1e-6
    params = trainable(model)
    assert all(".adapter." in n for n in params)
    assert sum(p.numel() for p in params.values()) == adapter_param_count(hidden, 4, len(names))


def test_bert_classifier_head_trains_with_the_adapters_and_is_saved(tmp_path):
    base, model = tiny_bert(head=True), tiny_bert(head=True)
    ids = bert_ids(base)
    with torch.no_grad():
        before = base(input_ids=ids).logits
    METHOD.apply(model, adapter_cfg())
    with torch.no_grad():
        assert (model(input_ids=ids).logits - before).abs().max().item() < 1e-6
    params = trainable(model)
    head = {n for n in params if n.startswith("classifier.")}
    assert head == {"classifier.weight", "classifier.bias"}  # a new head must learn
    assert all(".adapter." in n for n in set(params) - head)
    n_head = sum(params[n].numel() for n in head)
    assert sum(p.numel() for p in params.values()) - n_head == adapter_param_count(model.config.hidden_size, 4, 4)
    with torch.no_grad():
        model.classifier.weight.add_(0.5)
        expected = model(input_ids=ids).logits
    METHOD.save(model, tmp_path / "art")
    reloaded = METHOD.load(tiny_bert(head=True), tmp_path / "art", adapter_cfg())
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - expected).abs().max().item() < 1e-6


def test_bottleneck_is_at_least_one_and_up_starts_at_zero():
    adapter = BottleneckAdapter(hidden=8, reduction=16)
    assert adapter.down.out_features == 1
    assert torch.count_nonzero(adapter.up.weight) == 0 and torch.count_nonzero(adapter.up.bias) == 0
    x = torch.randn(3, 8)
    assert torch.equal(adapter(x), x)


def test_missing_adapter_section_uses_defaults_and_bad_values_are_user_errors():
    model = tiny_llama()
    METHOD.apply(model, types.SimpleNamespace())  # no adapter section: houlsby, reduction 16, relu
    meta = model.tunelab_adapter_config
    assert (meta["kind"], meta["reduction"], meta["non_linearity"], meta["dropout"]) == ("houlsby", 16, "relu", 0.0)
    for bad in (dict(kind="lora"), dict(reduction=0), dict(non_linearity="tanh"), dict(dropout=1.0)):
        with pytest.raises(UserError):
            METHOD.apply(tiny_llama(), adapter_cfg(**bad))
    with pytest.raises(UserError, match="already has an adapter"):
        METHOD.apply(model, adapter_cfg())


def test_pydantic_config_section_is_accepted():
    from tunelab.methods.adapter import AdapterSection

    model = tiny_llama()
    cfg = types.SimpleNamespace(adapter=AdapterSection(kind="pfeiffer", reduction=8, non_linearity="gelu"))
    METHOD.apply(model, cfg)
    assert len(wrapped(model)) == model.config.num_hidden_layers
    assert model.tunelab_adapter_config["non_linearity"] == "gelu"


def test_registered_as_adapter():
    from tunelab.methods import METHODS

    assert isinstance(METHODS["adapter"], BottleneckAdapterMethod)


# --- training: outputs move, base stays bit-identical ---------------------------------------------


def _snapshot(model):
    # the wrapper keeps the original Parameter objects, so they can be compared after training
    return [(name, p, p.detach().clone()) for name, p in model.named_parameters()]


def _train_llama(model, ids, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_llama_training_moves_outputs_and_leaves_base_untouched():
    model = tiny_llama()
    ids = llama_ids(model)
    before = llama_out(model, ids)
    snapshot = _snapshot(model)
    METHOD.apply(model, adapter_cfg(non_linearity="gelu", dropout=0.1))
    _train_llama(model, ids)
    assert (llama_out(model, ids) - before).abs().max().item() > 1e-3
    for name, param, saved in snapshot:
        assert not param.requires_grad and torch.equal(param, saved), name


def test_bert_training_moves_outputs_and_leaves_base_untouched():
    model = tiny_bert()
    ids = bert_ids(model)
    before = bert_out(model, ids)
    snapshot = _snapshot(model)
    METHOD.apply(model, adapter_cfg("pfeiffer", non_linearity="silu"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(input_ids=ids).last_hidden_state.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert (bert_out(model, ids) - before).abs().max().item() > 1e-3
    for name, param, saved in snapshot:
        assert torch.equal(param, saved), name


def test_bf16_base_gets_fp32_adapters():
    model = load_causal_lm("tiny-llama", dtype=torch.bfloat16).eval()
    ids = llama_ids(model)
    before = llama_out(model, ids)
    METHOD.apply(model, adapter_cfg())
    assert all(p.dtype == torch.float32 for p in trainable(model).values())
    after = llama_out(model, ids)
    assert after.dtype == torch.bfloat16 and torch.equal(after, before)


# --- save / load --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_llama(tmp_path_factory):
    """(trained model, its logits, artifact dir) for a houlsby tiny-llama after 3 steps."""
    torch.manual_seed(0)
    model = tiny_llama()
    METHOD.apply(model, adapter_cfg())
    ids = llama_ids(model)
    _train_llama(model, ids)
    out_dir = tmp_path_factory.mktemp("adapter")
    METHOD.save(model, out_dir)
    return model, llama_out(model, ids), out_dir


def test_save_load_round_trip_into_a_fresh_base(trained_llama):
    model, logits, out_dir = trained_llama
    # cfg is ignored on load: the artifact describes itself
    loaded = METHOD.load(tiny_llama(), out_dir, adapter_cfg("pfeiffer", reduction=2))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert wrapped(loaded) == wrapped(model)
    assert (llama_out(loaded, llama_ids(loaded)) - logits).abs().max().item() < 1e-6


def test_artifact_contents(trained_llama):
    from safetensors import safe_open

    model, _, out_dir = trained_llama
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    config = json.loads((out_dir / CONFIG_FILE).read_text())
    n_layers = model.config.num_hidden_layers
    assert config == {
        "tunelab_method": "adapter",
        "kind": "houlsby",
        "reduction": 4,
        "non_linearity": "relu",
        "dropout": 0.0,
        "targets": [f"model.layers.{i}.{t}" for i in range(n_layers) for t in ("self_attn.o_proj", "mlp.down_proj")],
        "base_model_name_or_path": resolve_model_path("tiny-llama"),
        "hidden_size": model.config.hidden_size,
    }
    with safe_open(str(out_dir / WEIGHTS_FILE), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(trainable(model))
    assert all(".adapter." in k for k in keys) and len(keys) == 4 * 2 * n_layers
    assert (out_dir / WEIGHTS_FILE).stat().st_size < 4 * adapter_param_count(64, 4, 2 * n_layers) + 4096


def test_bert_save_load_round_trip(tmp_path):
    model = tiny_bert()
    METHOD.apply(model, adapter_cfg())
    ids = bert_ids(model)
    with torch.no_grad():
        for p in trainable(model).values():
            p.add_(0.05 * torch.randn_like(p))
    out = bert_out(model, ids)
    METHOD.save(model, tmp_path)
    loaded = METHOD.load(tiny_bert(), tmp_path, None)
    assert (bert_out(loaded, ids) - out).abs().max().item() < 1e-6
    with pytest.raises(UserError, match="hidden size 32"):  # a BERT artifact on a Llama base
        METHOD.load(tiny_llama(), tmp_path, None)


def _copy_artifact(src, dst):
    dst.mkdir()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_truncated_weights_raise_user_error(trained_llama, tmp_path):
    art = _copy_artifact(trained_llama[2], tmp_path / "art")
    data = (art / WEIGHTS_FILE).read_bytes()
    (art / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=str(art / WEIGHTS_FILE)):
        METHOD.load(tiny_llama(), art, None)


def test_missing_or_broken_files_raise_user_error(trained_llama, tmp_path):
    art = _copy_artifact(trained_llama[2], tmp_path / "art")
    (art / WEIGHTS_FILE).unlink()
    with pytest.raises(UserError, match=str(art / WEIGHTS_FILE)):
        METHOD.load(tiny_llama(), art, None)
    (art / CONFIG_FILE).write_text("{not json")
    with pytest.raises(UserError, match=str(art / CONFIG_FILE)):
        METHOD.load(tiny_llama(), art, None)
    (art / CONFIG_FILE).unlink()
    with pytest.raises(UserError, match=str(art / CONFIG_FILE)):
        METHOD.load(tiny_llama(), art, None)


def test_edited_kind_no_longer_matching_the_targets_is_refused(trained_llama, tmp_path):
    art = _copy_artifact(trained_llama[2], tmp_path / "art")
    config = json.loads((art / CONFIG_FILE).read_text())
    (art / CONFIG_FILE).write_text(json.dumps(dict(config, kind="pfeiffer")))
    with pytest.raises(UserError, match="targets do not match"):
        METHOD.load(tiny_llama(), art, None)


def test_key_mismatch_is_refused(trained_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    art = _copy_artifact(trained_llama[2], tmp_path / "art")
    tensors = load_file(str(art / WEIGHTS_FILE))
    tensors.pop(sorted(tensors)[0])
    tensors["model.layers.0.extra.weight"] = torch.zeros(1)
    save_file(tensors, str(art / WEIGHTS_FILE))
    with pytest.raises(UserError, match="missing .*unexpected"):
        METHOD.load(tiny_llama(), art, None)


def test_unsupported_architecture_raises_user_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UserError, match="gpt2.*llama.*bert"):
        METHOD.apply(model, adapter_cfg())
    assert not wrapped(model)
