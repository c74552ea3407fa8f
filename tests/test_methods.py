"""Every method on tiny-llama: it learns, saves, reloads to the same logits, and counts parameters right."""

import json

import pytest
import torch

import tunelab
from helpers import TINY_LR, only_method_sections
from tunelab.config import build_config
from tunelab.methods import METHODS
from tunelab.training.accounting import count_params
from tunelab.training.loop import Trainer

PEFT_BACKED = {"lora", "dora", "rslora", "pissa", "loraplus", "prefix", "prompt", "ptuning", "ia3", "adalora"}
ZERO_INIT = ["lora", "dora", "rslora", "loraplus", "ia3", "adapter", "adalora", "full", "freeze"]


def config(tmp_path, toy_data, method, **train):
    return build_config(
        only_method_sections(
            {
                "model": "tiny-llama",
                "method": method,
                "out_dir": str(tmp_path / "runs"),
                "run_name": method,
                "data": {"train": str(toy_data), "val_fraction": 0, "max_length": 64},
                "train": {
                    "max_steps": 30,
                    "batch_size": 8,
                    "precision": "fp32",
                    "warmup_ratio": 0,
                    "lr": TINY_LR[method],
                }
                | train,
                "lora": {"target_modules": "all-linear", "r": 8},
                "adapter": {"reduction": 4},
                "prefix": {"num_virtual_tokens": 4},
                "prompt": {"num_virtual_tokens": 4, "init_text": "repeat the colour"},
                "ptuning": {"num_virtual_tokens": 4},
                "adalora": {"target_modules": "all-linear"},
            }
        )
    )


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_every_spec_method_is_registered():
    assert set(TINY_LR) == set(METHODS)


@pytest.mark.parametrize("method", sorted(TINY_LR))
def test_method_learns_saves_and_reloads_exactly(tmp_path, toy_data, smol_tokenizer, method):
    trainer = Trainer(config(tmp_path, toy_data, method), progress=False)
    result = trainer.run()
    losses = [json.loads(x)["loss"] for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.25, (method, first, last)

    ids = smol_tokenizer("Repeat the word: 蓝色", return_tensors="pt")["input_ids"]
    trained = logits(trainer.model, ids)
    model, _ = tunelab.load(result.run_dir)
    assert (logits(model, ids) - trained).abs().max() < 1e-5

    s = result.summary
    trainable, total = count_params(trainer.model)
    assert (s["trainable_params"], s["total_params"]) == (trainable, total)
    assert s["artifact_bytes"] > 0 and (result.run_dir / METHODS[method].artifact).is_dir()
    if method in PEFT_BACKED:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        cfg = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
        plain = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"]), result.run_dir / "adapter"
        )
        assert (logits(plain, ids) - trained).abs().max() < 1e-5


@pytest.mark.parametrize("method", ZERO_INIT)
def test_zero_initialised_methods_leave_the_base_unchanged_at_step_0(tmp_path, toy_data, smol_tokenizer, method):
    trainer = Trainer(config(tmp_path, toy_data, method), progress=False)
    from tunelab.models import load_causal_lm

    ids = smol_tokenizer("hello 你好", return_tensors="pt")["input_ids"]
    base = logits(load_causal_lm("tiny-llama"), ids)
    assert (logits(trainer.model, ids) - base).abs().max() < 1e-5


def test_freeze_trains_exactly_the_chosen_blocks(tmp_path, toy_data):
    from tunelab.models import load_causal_lm

    cfg = config(tmp_path, toy_data, "freeze", max_steps=3)
    cfg.freeze.trainable_layers = 1
    cfg.freeze.train_norm = False
    trainer = Trainer(cfg, progress=False)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.layers.1.") for n in trainable)
    assert trainable == {n for n, _ in trainer.model.named_parameters() if n.startswith("model.layers.1.")}
    trainer.run()
    base = dict(load_causal_lm("tiny-llama").named_parameters())
    for name, p in trainer.model.named_parameters():
        if name in trainable:
            continue
        assert torch.equal(p.detach(), base[name].detach()), name
    assert any(
        not torch.equal(p.detach(), base[n].detach()) for n, p in trainer.model.named_parameters() if n in trainable
    )


def test_loraplus_defaults_to_ratio_16(tmp_path, toy_data):
    from tunelab.training.optim import param_groups

    cfg = config(tmp_path, toy_data, "loraplus")
    trainer = Trainer(cfg, progress=False)
    lrs = {g["name"]: g["lr"] for g in param_groups(trainer.model, cfg, METHODS["loraplus"])}
    assert sorted(lrs.values()) == pytest.approx([cfg.train.lr, 16 * cfg.train.lr])


def test_qlora_counts_the_packed_base_and_shrinks_it(tmp_path, toy_data):
    lora = Trainer(config(tmp_path, toy_data, "lora"), progress=False)
    qlora = Trainer(config(tmp_path, toy_data, "qlora"), progress=False)
    assert count_params(qlora.model) == count_params(lora.model)
    assert any(p.__class__.__name__ == "Params4bit" for p in qlora.model.parameters())
    # linear weights are 4-bit; the (tied) embedding stays fp32, so the whole base shrinks less than 8x
    assert qlora.base_footprint["base_footprint_bytes"] < lora.base_footprint["base_footprint_bytes"]
    assert qlora.base_footprint["base_footprint_fp32_bytes"] == lora.base_footprint["base_footprint_fp32_bytes"]


def test_method_default_lr_fills_the_resolved_config():
    from tunelab.training.resolve import resolve_run_config

    def resolved_lr(cfg):
        return resolve_run_config(build_config(cfg), METHODS[cfg["method"]]).train.lr

    assert resolved_lr({"method": "prompt"}) == METHODS["prompt"].default_lr > METHODS["lora"].default_lr
    assert resolved_lr({"method": "lora", "train": {"lr": 1e-5}}) == 1e-5


def test_adapters_on_a_shared_base_switch_and_disable(tmp_path, write_jsonl, smol_tokenizer):
    from helpers import toy_rows

    runs = {}
    for task, seed in (("colours", 0), ("shuffled", 1)):
        rows = toy_rows(seed=seed)
        if task == "shuffled":
            rows = [{"instruction": r["output"], "output": r["instruction"]} for r in rows]
        cfg = config(tmp_path, write_jsonl(rows, f"{task}.jsonl"), "lora", max_steps=5)
        cfg.run_name, cfg.adapter_name = task, task
        runs[task] = tunelab.train(cfg, progress=False).run_dir
    model, _ = tunelab.load(runs["colours"], adapters={"shuffled": runs["shuffled"]})
    ids = smol_tokenizer("Repeat the word: red", return_tensors="pt")["input_ids"]
    model.set_adapter("colours")
    a = logits(model, ids)
    model.set_adapter("shuffled")
    b = logits(model, ids)
    assert (a - b).abs().max() > 1e-3
    with model.disable_adapter():
        base = logits(model, ids)
    from tunelab.models import load_causal_lm

    assert (base - logits(load_causal_lm("tiny-llama"), ids)).abs().max() < 1e-6
    # one base: the adapters share every base weight tensor
    n_base = sum(1 for n, _ in model.named_parameters() if "lora_" not in n)
    assert n_base == sum(1 for _ in load_causal_lm("tiny-llama").parameters())


def test_methods_command_lists_every_method_with_defaults_and_counts():
    from tunelab.methods.catalog import method_table

    rows = {r["method"]: r for r in method_table("tiny-llama")}
    assert set(rows) == set(METHODS)
    assert rows["lora"]["defaults"]["lora"]["r"] == 16 and rows["lora"]["defaults"]["lora"]["alpha"] == 32
    assert rows["lora"]["config_sections"] == ["lora", "quant"] and rows["full"]["config_sections"] == []
    assert rows["prefix"]["defaults"] == {"prefix": {"num_virtual_tokens": 20, "projection": False}}
    assert rows["prefix"]["default_lr"] > rows["lora"]["default_lr"] and "LR" in rows["prefix"]["summary"]
    assert rows["full"]["trainable_pct"] == 100.0
    assert rows["prefix"]["trainable_params"] == 20 * 2 * 2 * 32  # tokens x layers x (k, v) x kv width
    assert 0 < rows["ia3"]["trainable_params"] < rows["lora"]["trainable_params"]


def test_adalora_budget_schedule_runs_inside_our_loop(tmp_path, toy_data):
    trainer = Trainer(config(tmp_path, toy_data, "adalora"), progress=False)
    trainer.run()
    pattern = trainer.model.peft_config["default"].rank_pattern
    assert pattern, "update_and_allocate never reached the final budget"
    kept = sum(int(mask.sum()) for mask in (torch.tensor(v) for v in pattern.values()))
    init_r = trainer.cfg.adalora.init_r
    assert kept < init_r * len(pattern)  # ranks were pruned towards target_r


def test_rank_and_alpha_patterns_set_per_module_r_and_alpha(tmp_path, toy_data):
    cfg = config(tmp_path, toy_data, "lora")
    cfg.lora.rank_pattern = {"q_proj": 4}
    cfg.lora.alpha_pattern = {"q_proj": 2}
    trainer = Trainer(cfg, progress=False)
    layer = trainer.model.base_model.model.model.layers[0].self_attn
    assert layer.q_proj.lora_A["default"].out_features == 4 and layer.q_proj.scaling["default"] == 2 / 4
    assert layer.k_proj.lora_A["default"].out_features == 8 and layer.k_proj.scaling["default"] == 32 / 8
