"""tunelab export: merges that reproduce the adapter model, GGUF that transformers' reader reproduces, an
Ollama template that renders the chat template's prompt, int8, layer pruning, the parity report."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import tunelab
from helpers import TINY_LR, toy_rows
from tunelab.blocks import keep_blocks
from tunelab.cli import main
from tunelab.config import build_config
from tunelab.errors import UserError
from tunelab.export import export_run
from tunelab.export.merge import adapter_on, check_mergeable, dequantized_base
from tunelab.export.modelfile import modelfile_text, parse_modelfile
from tunelab.export.quantize import quantize_rows
from tunelab.io import created_mode

IDS = torch.tensor([[1, 4093, 198, 28120, 905, 28, 27709, 2, 198, 1, 520, 9531, 198]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def tiny_run(tmp_path_factory, method, **train):
    tmp = tmp_path_factory.mktemp(method)
    lora = {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4, "dropout": 0.0}
    cfg_extra = {"method": method, "lora": lora} if method != "lora" else {"lora": lora}
    return _train(tmp, cfg_extra, **train)


def _train(tmp, extra, model="tiny-llama", **train):
    data = tmp / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in toy_rows()), encoding="utf-8")
    cfg = {
        "model": model,
        "out_dir": str(tmp / "runs"),
        "run_name": "run",
        "data": {"train": str(data), "val_fraction": 0.2, "max_length": 64},
        "train": {"max_steps": 2, "batch_size": 4, "precision": "fp32", "lr": TINY_LR.get(extra.get("method", "lora"))}
        | train,
        "eval": {"max_new_tokens": 8},
    } | extra
    return tunelab.train(cfg, progress=False).run_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return tiny_run(tmp_path_factory, "lora")


@pytest.fixture(scope="module")
def lora_merged(tmp_path_factory, lora_run):
    """(the merged export's report, the export loaded with plain transformers)."""
    out = tmp_path_factory.mktemp("out") / "merged"
    report = export_run(lora_run, out, merge=True, max_prompts=2)
    return report, AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_export_loads_in_plain_transformers_with_the_adapter_models_logits(
    tmp_path_factory, lora_run, lora_merged, method
):
    if method == "lora":
        run, (report, plain) = lora_run, lora_merged
    else:
        run, out = tiny_run(tmp_path_factory, method), tmp_path_factory.mktemp("out") / "merged"
        report = export_run(run, out, merge=True, max_prompts=2)
        plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    out = Path(report["export_dir"])
    trained, _ = tunelab.load(run)
    base = AutoModelForCausalLM.from_pretrained(trained.peft_config["default"].base_model_name_or_path).eval()
    ref = logits(trained)
    # the adapter moved the logits, so agreement below is the merge's doing
    assert (logits(base) - ref).abs().max() > 1e-3
    # fp32: merged W + BA vs W x + B(A x) differ by summation order only (~1e-6 of logits of size ~4)
    assert (logits(plain) - ref).abs().max() <= 1e-4
    assert report["kind"] == "merged" and report["within_tolerance"] and report["greedy_token_agreement"] == 1.0
    assert {"model.safetensors", "config.json", "generation_config.json", "chat_template.jinja", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    assert f"method: `{method}`" in (out / "README.md").read_text()
    saved = json.loads((out / "parity.json").read_text())
    assert saved["mean_kl"] == report["mean_kl"] and saved["conversations"] == 2


def test_qlora_merges_into_the_dequantized_4bit_weights(tmp_path_factory):
    run = tiny_run(tmp_path_factory, "qlora")
    out = tmp_path_factory.mktemp("out") / "qlora"
    report = export_run(run, out, merge=True, max_prompts=2)
    trained, _ = tunelab.load(run)
    cfg = trained.tunelab_config
    reference = adapter_on(dequantized_base(cfg, trained), run, cfg)  # dequantized 4-bit base + the adapter, unmerged
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(reference.peft_config["default"].base_model_name_or_path).eval()
    assert (logits(plain) - logits(reference)).abs().max() <= 1e-4  # fp32 on both sides, as for LoRA
    # and that is not the original fp32 weights: the 4-bit rounding shows
    assert (logits(adapter_on(original, run, cfg)) - logits(reference)).abs().max() > 1e-3
    assert report["kind"] == "merged-quantized-base" and "dequantized 4-bit" in report["merged_into"]
    assert "dequantized 4-bit" in (out / "README.md").read_text()


def _small_vocab_model(tmp):
    """A tiny Llama with a 300-token byte-level BPE (transformers' GGUF reader parses a 49k vocabulary in ~1 min)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from tunelab.models import load_tokenizer, tiny_llama_config

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    text = [f"{r['instruction']} {r['output']} system user assistant" for r in toy_rows(200)]
    bpe.train_from_iterator(
        text,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = load_tokenizer("tiny-llama").chat_template  # SmolLM2's ChatML
    config = tiny_llama_config(tok)  # the registry's tiny-llama, on this small vocabulary
    torch.manual_seed(0)
    path = tmp / "small-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_gguf_and_ollama_export_round_trips_through_transformers_gguf_reader(tmp_path_factory):
    from tunelab.export.gguf_file import load_gguf

    tmp = tmp_path_factory.mktemp("gguf")
    run = _train(
        tmp, {"lora": {"target_modules": ["q_proj", "k_proj", "v_proj"], "r": 4}}, model=str(_small_vocab_model(tmp))
    )
    out = tmp / "ollama"
    report = export_run(run, out, fmt="ollama", max_prompts=3)
    merged_dir = tmp / "merged"
    export_run(run, merged_dir, merge=True, max_prompts=1)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    gguf_model, gguf_tok = load_gguf(out / "model.gguf")
    _, tokenizer = tunelab.load(run)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Repeat the word: blue"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    a, b = logits(merged, ids), logits(gguf_model, ids)
    # f16 weights: a relative rounding of 2^-11 per weight, through two blocks of a 64-wide model
    assert (a - b).abs().max() <= 1e-2 * a.abs().max()
    same = merged.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(same, gguf_model.generate(ids, max_new_tokens=8, do_sample=False))
    # the file carries the tokenizer, its special tokens and the chat template
    assert gguf_tok.chat_template == tokenizer.chat_template
    assert (gguf_tok.eos_token, gguf_tok.bos_token) == (tokenizer.eos_token, tokenizer.bos_token)
    assert (
        gguf_tok("Repeat the word: 红色 <|im_end|>").input_ids
        == tokenizer("Repeat the word: 红色 <|im_end|>").input_ids
    )
    assert report["kind"] == "gguf-f16" and report["within_tolerance"] and report["gguf_tokenizer_agreement"] == 1.0
    for path in [*out.iterdir(), *merged_dir.iterdir()]:  # an Ollama service reads them as another user
        assert path.stat().st_mode & 0o777 == created_mode(), path
    modelfile = parse_modelfile((out / "Modelfile").read_text())
    assert "<|im_end|>" in modelfile["stops"] and (out / "Modelfile").read_text().startswith("FROM ./model.gguf")


def _go_render(tmp_path, template: str, values: dict) -> str:
    go_template = pytest.importorskip("go_template", reason="go-template (Go's text/template) is a dev dependency")
    import yaml

    (tmp_path / "t.tmpl").write_text(template, encoding="utf-8")
    (tmp_path / "v.yaml").write_text(yaml.safe_dump(values, allow_unicode=True), encoding="utf-8")
    go_template.render_template(str(tmp_path / "t.tmpl"), str(tmp_path / "v.yaml"), str(tmp_path / "out.txt"))
    return (tmp_path / "out.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize("system", [None, "You are a precise assistant."])
def test_modelfile_template_renders_the_chat_templates_prompt(tmp_path, smol_tokenizer, system):
    """Ollama's values for a chat: .System (the conversation's system turn, else the Modelfile's SYSTEM) and
    .Messages (every turn, the system one included); rendered by Go's text/template as Ollama does."""
    template = smol_tokenizer.chat_template
    parsed = parse_modelfile(modelfile_text(smol_tokenizer, template, "model.gguf", system))
    turns = [
        {"role": "user", "content": "Normalise: 3rd of March"},
        {"role": "assistant", "content": "2024-03-03"},
        {"role": "user", "content": 'and 红色 {{ .System }} "quoted"?'},
    ]
    messages = ([{"role": "system", "content": system}] if system else []) + turns
    expected = smol_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    values = {
        "System": system or parsed["system"],  # without a system turn Ollama passes the Modelfile's SYSTEM
        "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
    }
    assert _go_render(tmp_path, parsed["template"], values) == expected
    assert system is not None or "SmolLM" in parsed["system"]  # the template's own default system prompt


def test_int8_export_is_smaller_reloads_and_stays_close(tmp_path, lora_run, lora_merged):
    from safetensors.torch import load_file

    from tunelab.export.quantize import load_int8

    report = export_run(lora_run, tmp_path / "int8", quantize="int8", max_prompts=2)
    assert report["int8"]["linear_fp32_bytes"] / report["int8"]["linear_int8_bytes"] >= 3
    saved = load_file(str(tmp_path / "int8" / "model-int8.safetensors"))
    plain = lora_merged[1]
    q, scale = quantize_rows(plain.model.layers[0].self_attn.q_proj.weight)
    assert saved["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.int8
    assert torch.equal(saved["model.layers.0.self_attn.q_proj.qweight"], q)
    # torchao is an optional extra (installed, transformers imports it everywhere): its runtime is checked when present
    for runtime in ("dequant", "torch", "torchao") if importlib.util.find_spec("torchao") else ("dequant", "torch"):
        model, _ = load_int8(tmp_path / "int8", runtime)
        a, b = logits(plain), logits(model)
        # int8 rows carry ~1/254 relative error per weight; the logits stay within a few percent of their range
        assert (a - b).abs().max() <= 0.1 * a.abs().max()
    assert report["kind"] == "int8" and report["within_tolerance"]


def test_nf4_export_holds_the_merged_weights_in_4bit_and_reloads_in_plain_transformers(tmp_path, lora_run, lora_merged):
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    from tunelab.quant import use_generic_4bit_kernel

    report = export_run(lora_run, tmp_path / "nf4", quantize="nf4", max_prompts=2)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map={"": "cpu"})  # its quantization config
    use_generic_4bit_kernel(model)
    merged = dict(lora_merged[1].named_modules())
    linears = {n: m for n, m in model.named_modules() if n.startswith("model.layers.") and hasattr(m, "weight")}
    linears = {n: m for n, m in linears.items() if isinstance(m, torch.nn.Linear)}
    assert linears and all(isinstance(m, bnb.nn.Linear4bit) for m in linears.values())
    for name, module in linears.items():
        assert module.weight.quant_state.quant_type == "nf4"
        w = dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        ref = merged[name].weight
        # NF4: 16 levels per 64-weight block scaled by its absmax; on these near-gaussian weights the rounding
        # error is ~9% of the weights' norm (measured 0.090-0.093); another layer's weight is 1.39-1.46 away
        assert float((w - ref).norm() / ref.norm()) < 0.15, name
    assert report["kind"] == "nf4" and report["within_tolerance"] and 0 <= report["mean_kl"] < 0.2

    def linear_bytes(folder):  # the blocks' linear layers, with NF4's block scales and quant state
        from safetensors import safe_open

        with safe_open(str(Path(folder) / "model.safetensors"), "pt") as f:
            names = [k for k in f.keys() if ".self_attn." in k or ".mlp." in k]
            return sum(f.get_tensor(k).nbytes for k in names)

    # 4 bits a weight plus one fp32 absmax per 64 (0.5 + 0.0625 bytes) against fp32's 4: ~7x here
    assert linear_bytes(tmp_path / "nf4") * 6 < linear_bytes(lora_merged[0]["export_dir"])


def test_prune_layers_removes_the_least_influential_block(tmp_path, lora_run, lora_merged):
    from tunelab.export.prune import block_influence

    report = export_run(lora_run, tmp_path / "pruned", prune_layers=1, max_prompts=2)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert plain.config.num_hidden_layers == 1 and len(plain.model.layers) == 1
    influence = report["pruning"]["block_influence"]
    assert report["pruning"]["removed_blocks"] == [min(range(2), key=lambda i: influence[i])]
    full = AutoModelForCausalLM.from_pretrained(lora_merged[0]["export_dir"]).eval()
    assert block_influence(full, [{"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}])[0] >= 0
    kept = 1 - report["pruning"]["removed_blocks"][0]
    full = keep_blocks(full, [kept])
    assert torch.allclose(logits(full), logits(plain), atol=1e-5)  # the export is the kept block, unchanged
    assert plain.generate(IDS, max_new_tokens=4, do_sample=False).shape[1] == IDS.shape[1] + 4  # the KV cache works


def test_export_cli_refuses_bad_options_in_one_line(tmp_path, lora_run, capsys):
    assert main(["export", str(lora_run), "--out", str(tmp_path / "x"), "--quantize", "q8_0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --quantize q8_0 is a GGUF type: add --format gguf (or ollama)"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert main(["export", str(lora_run), "--out", str(tmp_path / "full")]) == 2
    assert "never overwrites" in capsys.readouterr().err
    with pytest.raises(UserError, match="cannot be merged"):
        check_mergeable(build_config({"model": "tiny-llama", "method": "prompt"}))
