"""Training on tiny-llama: the run directory, adapter portability, accumulation, resume, losses."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

import tunelab
from tunelab.config import build_config
from tunelab.data.encode import IGNORE_INDEX
from tunelab.errors import UserError
from tunelab.io import created_mode
from tunelab.training.loop import Trainer

SPEC_FILES = ["config.yaml", "metrics.jsonl", "summary.json", "adapter", "checkpoints", "tb", "eval.json"]
SUMMARY_FIELDS = [
    "method",
    "model",
    "trainable_params",
    "total_params",
    "trainable_pct",
    "artifact_bytes",
    "train_wall_s",
    "train_tokens",
    "train_tokens_per_s",
    "peak_mem_bytes",
    "peak_mem_kind",
    "final_train_loss",
    "eval",
    "device",
    "precision",
    "versions",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from helpers import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("run"), lr=1e-2)


def test_run_directory_has_every_spec_file(tiny_run):
    run = tiny_run.run_dir
    for name in SPEC_FILES:
        assert (run / name).exists(), name
    summary = json.loads((run / "summary.json").read_text())
    for key in SUMMARY_FIELDS:
        assert key in summary, key
    assert summary["steps"] == 5
    assert summary["peak_mem_bytes"] > 50 * 2**20 and summary["peak_mem_kind"] == "rss"
    assert summary["train_tokens"] > 0 and summary["train_tokens_per_s"] > 0
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["artifact_bytes"] > 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5]
    for r in lines:
        assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(r)
    assert (run / "checkpoints" / "step-5" / "COMPLETE").exists()
    assert list((run / "tb").iterdir())
    assert (run / "plots" / "loss.png").read_bytes().startswith(b"\x89PNG")
    # the saved config is complete and loads back
    cfg = tunelab.config.load_config(run / "config.yaml")
    assert cfg.model == "tiny-llama" and cfg.train.max_steps == 5
    # readable as any file the user writes: not tempfile's or safetensors' private 0600 / 0700
    for path in [run, *run.rglob("*")]:
        assert path.stat().st_mode & 0o777 == created_mode(directory=path.is_dir()), path


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapter_loads_in_plain_peft_with_same_logits(tiny_run):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    adapter = tiny_run.run_dir / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert not config.get("modules_to_save")
    model, tok = tunelab.load(tiny_run.run_dir)
    ids = tok("Repeat the word: 红色", return_tensors="pt")["input_ids"]
    ours = _logits(model, ids)

    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    plain = PeftModel.from_pretrained(base, adapter).eval()
    assert torch.allclose(_logits(plain, ids), ours, atol=1e-5)
    auto = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()  # base path from adapter_config, offline
    assert torch.allclose(_logits(auto, ids), ours, atol=1e-5)
    # and the adapter really changed something
    with plain.disable_adapter():
        assert not torch.allclose(_logits(plain, ids), ours, atol=1e-4)


def _grads(tmp_path, toy_data, batch_size, grad_accum, packing=False, checkpointing=False):
    cfg = build_config(
        {
            "model": "tiny-llama",
            "out_dir": str(tmp_path / f"g{batch_size}{packing}"),
            "data": {"train": str(toy_data), "val_fraction": 0, "max_length": 64},
            "train": {
                "batch_size": batch_size,
                "grad_accum": grad_accum,
                "precision": "fp32",
                "packing": packing,
                "gradient_checkpointing": checkpointing,
            },
            "lora": {"dropout": 0.0, "init": "gaussian"},
        }
    )
    trainer = Trainer(cfg, progress=False)
    window = list(range(8))
    counts = [sum(1 for x in trainer.data.train[i]["labels"][1:] if x != IGNORE_INDEX) for i in range(8)]
    assert len(set(counts)) > 1, "the test needs examples with different numbers of loss tokens"
    loss, _ = trainer.accumulate_gradients(window)
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss, grads


def test_grad_accumulation_equals_large_batch(tmp_path, toy_data):
    loss_a, grads_a = _grads(tmp_path, toy_data, 2, 4)
    loss_b, grads_b = _grads(tmp_path, toy_data, 8, 1)
    assert abs(loss_a - loss_b) < 1e-5
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5, rtol=0), name
    assert any(g.abs().sum() > 0 for g in grads_a.values())


@pytest.mark.parametrize("batch_size,grad_accum,checkpointing", [(8, 1, False), (1, 4, False), (8, 1, True)])
def test_packed_step_equals_padded_step(tmp_path, toy_data, batch_size, grad_accum, checkpointing):
    """Packing changes only the layout: loss and every gradient match the padded batch (also when
    gradient checkpointing re-runs the packed forward during backward)."""
    loss_a, grads_a = _grads(tmp_path, toy_data, 8, 1)
    loss_b, grads_b = _grads(tmp_path, toy_data, batch_size, grad_accum, packing=True, checkpointing=checkpointing)
    assert abs(loss_a - loss_b) < 1e-5
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5, rtol=0), name


def test_every_training_example_ends_with_eos_in_the_loss(tiny_config):
    trainer = Trainer(build_config(tiny_config), progress=False)
    eos = trainer.tokenizer.eos_token_id
    for example in trainer.data.train + trainer.data.val:
        supervised = [x for x in example["labels"] if x != IGNORE_INDEX]
        assert supervised[-1] == eos


def test_resume_reaches_the_same_final_loss(tmp_path, tiny_config):
    tiny_config["train"].update(max_steps=6, save_every=3)
    tiny_config["lora"] = {"dropout": 0.1}  # dropout draws from the RNG: resume must restore it
    full = tunelab.train(tiny_config, progress=False)
    from helpers import interrupted_copy

    interrupted = interrupted_copy(full.run_dir, tmp_path / "interrupted", last_step=6)  # killed after step 3
    resumed = tunelab.train(None, resume=interrupted, progress=False)
    assert resumed.summary["steps"] == 6
    assert abs(resumed.summary["final_train_loss"] - full.summary["final_train_loss"]) < 1e-4
    a = [json.loads(x)["loss"] for x in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x)["loss"] for x in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert len(b) == 6 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    # fewer steps than the checkpoint has taken: refused, the run's record untouched (was: accepted, config
    # rewritten to max_steps 3, a new hash, the run its own parent)
    before = (interrupted / "config.yaml").read_bytes()
    with pytest.raises(
        UserError, match="6 steps are taken .* stops at 3: train.max_steps / train.epochs can only grow"
    ):
        tunelab.train(None, resume=interrupted, overrides=["train.max_steps=3"], progress=False)
    assert (interrupted / "config.yaml").read_bytes() == before
    assert not (interrupted / "resumes.jsonl").exists()  # the resume above changed nothing; this one never ran


def test_incomplete_checkpoint_is_ignored_and_corrupt_one_is_a_clear_error(tmp_path, tiny_config):
    from tunelab.errors import UserError
    from tunelab.training.checkpoint import load_checkpoint
    from tunelab.training.checkpoint_dirs import MARKER, latest_checkpoint

    tiny_config["train"].update(max_steps=4, save_every=2)
    result = tunelab.train(tiny_config, progress=False)
    ckpts = result.run_dir / "checkpoints"
    (ckpts / "step-4" / MARKER).unlink()
    assert latest_checkpoint(ckpts).name == "step-2"
    weights = ckpts / "step-2" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    trainer = Trainer(build_config(tiny_config), progress=False)
    with pytest.raises(UserError, match="corrupted or truncated"):
        load_checkpoint(ckpts / "step-2", trainer.model, trainer.optimizer, trainer.scheduler)


def test_loss_decreases_on_learnable_task(tiny_config):
    tiny_config["train"].update(max_steps=30, lr=1e-2, batch_size=8, log_every=1)
    tiny_config["lora"] = {"target_modules": "all-linear", "r": 8}
    result = tunelab.train(tiny_config, progress=False)
    losses = [json.loads(x)["loss"] for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_epochs_set_the_number_of_steps(tiny_config):
    tiny_config["train"].pop("max_steps")
    tiny_config["train"].update(epochs=2, batch_size=4, grad_accum=2)
    trainer = Trainer(build_config(tiny_config), progress=False)
    n = len(trainer.data.train)
    assert trainer.total_steps == 2 * math.ceil(math.ceil(n / 4) / 2)


def test_lr_groups_and_loraplus_set_group_lrs(tiny_config):
    from tunelab.methods import get_method
    from tunelab.training.optim import param_groups

    tiny_config["lora"] = {"lr_ratio": 16}
    tiny_config["train"]["lr_groups"] = {"*q_proj*": 0.1}
    cfg = build_config(tiny_config)
    trainer = Trainer(cfg, progress=False)
    by_name = {}
    for group in param_groups(trainer.model, cfg, get_method("lora")):
        for p in group["params"]:
            by_name[id(p)] = group["lr"]
    lr = cfg.train.lr
    for name, p in trainer.model.named_parameters():
        if not p.requires_grad:
            continue
        expected = lr * (16 if ".lora_B." in name else 1) * (0.1 if "q_proj" in name else 1)
        assert by_name[id(p)] == pytest.approx(expected), name


def test_eval_command_reproduces_the_final_eval(tiny_run):
    from tunelab.eval.run import evaluate_run

    metrics = evaluate_run(str(tiny_run.run_dir))
    assert metrics["eval_loss"] == pytest.approx(tiny_run.summary["eval"]["eval_loss"], abs=1e-5)
    assert json.loads((tiny_run.run_dir / "eval.json").read_text())["eval_loss"] == pytest.approx(metrics["eval_loss"])


def _oom_over(rows, monkeypatch):
    """Make any micro-batch of more than `rows` rows fail like the CPU allocator does."""
    import tunelab.training.loop as loop

    real = loop.loss_sum

    def limited(model, batch):
        if batch["input_ids"].shape[0] > rows:
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"
            )
        return real(model, batch)

    monkeypatch.setattr(loop, "loss_sum", limited)


def test_out_of_memory_gives_advice(tiny_config, monkeypatch, tmp_path):
    from tunelab.errors import UserError

    tiny_config["train"].update(packing=False)
    _oom_over(2, monkeypatch)
    with pytest.raises(
        UserError,
        match=r"out of memory with a micro-batch of 4.*train.batch_size=2 train.grad_accum=2.*gradient_checkpointing",
    ):
        tunelab.train(tiny_config, progress=False)


def test_auto_batch_size_halves_the_micro_batch_and_keeps_the_numbers(tiny_config, monkeypatch):
    tiny_config["train"].update(packing=False)
    tiny_config["lora"] = {"dropout": 0.0}
    plain = tunelab.train(tiny_config | {"run_name": "plain"}, progress=False)
    _oom_over(1, monkeypatch)
    tiny_config["train"].update(auto_batch_size=True)
    auto = tunelab.train(tiny_config | {"run_name": "auto"}, progress=False)
    assert auto.summary["micro_batch_size"] == 1 and plain.summary["micro_batch_size"] == 4
    a = [json.loads(x)["loss"] for x in (plain.run_dir / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x)["loss"] for x in (auto.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 5 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5


def test_the_config_is_resolved_once_and_saved_as_used(tiny_config, tmp_path):
    """One resolve step fills what the run derives (method LR, packing, absolute data paths); the result is
    read-only, config.yaml is exactly it, and the caller's config is left as it was."""
    from tunelab.config import load_config

    del tiny_config["train"]["lr"]
    tiny_config["data"]["train"] = os.path.relpath(tiny_config["data"]["train"])
    cfg = build_config(tiny_config)
    before = cfg.to_dict()
    trainer = Trainer(cfg, progress=False)
    try:
        assert cfg.to_dict() == before and cfg.train.lr is None and cfg.train.packing is None
        resolved = trainer.cfg
        assert resolved.read_only and resolved.train.read_only
        assert resolved.train.lr == trainer.method.default_lr and resolved.train.packing is True
        assert Path(resolved.data.train).is_absolute()
        with pytest.raises(TypeError, match="read-only"):
            resolved.train.lr = 1.0
        saved = load_config(trainer.run_dir / "config.yaml", saved_run=True)
        assert saved.to_dict() == resolved.to_dict()
        assert set(saved.to_dict()) >= {"lora", "quant"} and "adapter" not in saved.to_dict()
    finally:
        trainer.close()
