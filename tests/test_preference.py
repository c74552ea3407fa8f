"""task: preference: data layouts and their errors, the config rules, one step's loss however it is split
(micro-batches, packing), and DPO runs on a tiny model that learn a toy preference."""

import json
import math
import random
import types

import pytest
import torch

from tunelab.config import build_config
from tunelab.data.formats import load_examples
from tunelab.errors import ConfigError, DataError, UserError


def test_preference_layouts_are_detected_and_normalised(write_jsonl):
    path = write_jsonl(
        [
            {"prompt": "2+2?", "chosen": "4", "rejected": "5", "system": "Be brief."},
            {
                "prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                "chosen": [{"role": "assistant", "content": "ok"}],
                "rejected": "no",
            },
        ]
    )
    pairs, fmt, _ = load_examples(path)
    assert fmt == "preference"
    assert pairs[0].prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert pairs[0].chosen == [{"role": "assistant", "content": "4"}]
    assert pairs[1].prompt[1]["role"] == "assistant" and pairs[1].rejected[0]["content"] == "no"
    sharegpt = write_jsonl(
        [
            {
                "conversations": [{"from": "human", "value": "2+2?"}],
                "chosen": {"from": "gpt", "value": "4"},
                "rejected": {"from": "gpt", "value": "5"},
                "system": "Be brief.",
            }
        ],
        "sharegpt.jsonl",
    )
    pairs, fmt, _ = load_examples(sharegpt)
    assert fmt == "sharegpt_preference"
    assert [m["role"] for m in pairs[0].prompt] == ["system", "user"] and pairs[0].rejected[0]["content"] == "5"


def test_a_pair_that_does_not_differ_is_an_error_naming_its_line(write_jsonl):
    path = write_jsonl(
        [{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "b", "chosen": "z", "rejected": "z"}]
    )
    with pytest.raises(DataError, match=r"data.jsonl:2: field 'rejected': is the same answer as chosen"):
        load_examples(path)


def test_the_answer_alone_is_learned(smol_tokenizer):
    from tunelab.data.encode import resolve_chat_template
    from tunelab.data.preference import PreferencePair, encode_pairs

    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    pair = PreferencePair(
        1, prompt, [{"role": "assistant", "content": "yes"}], [{"role": "assistant", "content": "no"}]
    )
    (encoded,), _ = encode_pairs([pair], smol_tokenizer, resolve_chat_template(smol_tokenizer), 64)
    for key, answer in (("chosen", "yes"), ("rejected", "no")):
        learned = [t for t in encoded[key]["labels"] if t != -100]
        assert smol_tokenizer.decode(learned) == answer + "<|im_end|>"  # not the prompt's assistant turn


def test_preference_config_rules():
    cfg = build_config({"task": "preference"})
    assert cfg.preference.beta == 0.1 and cfg.train.objective is None  # resolved to dpo by the run
    for data, message in [
        ({"train": {"objective": "dpo"}}, "train.objective: dpo needs task: preference"),
        ({"task": "preference", "train": {"objective": "sft"}}, "train.objective: sft needs task: causal_lm"),
        ({"preference": {"beta": 0.5}}, "the 'preference' section is for task: preference"),
        ({"task": "preference", "train": {"objective": "orpo", "precompute_ref": True}}, "train.precompute_ref"),
        ({"task": "preference", "train": {"objective": "simpo", "precompute_ref": True}}, "train.precompute_ref"),
        ({"task": "preference", "data": {"loss_on": "all"}}, "data.loss_on: all does not fit task: preference"),
        ({"task": "preference", "preference": {"label_smoothing": 0.5}}, "preference.label_smoothing"),
    ]:
        with pytest.raises(ConfigError, match=message):
            build_config(data)


def test_preference_data_needs_task_preference(tiny_config, write_jsonl):
    import tunelab

    tiny_config["data"]["train"] = str(write_jsonl([{"prompt": "a", "chosen": "x", "rejected": "y"}] * 4))
    with pytest.raises(ConfigError, match="preference data does not fit task: causal_lm"):
        tunelab.train(tiny_config, progress=False)


# --- one step's loss, however it is split ---------------------------------------------------------


@pytest.fixture(scope="module")
def lora_pairs():
    from peft import LoraConfig, get_peft_model

    from tunelab.data.encode import resolve_chat_template
    from tunelab.data.formats import Record
    from tunelab.data.preference import encode_pairs, to_pair
    from tunelab.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer("tiny-llama")
    model = get_peft_model(
        load_causal_lm("tiny-llama"), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"])
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    rows = [("Repeat: red", "red", "blue, I think"), ("2+2?", "4", "5"), ("Hi", "Hello there, friend!", "Go away")]
    rows += [("Capital of Japan?", "Tokyo", "Kyoto is the answer you want")]
    records = [
        to_pair(Record(i, {"prompt": p, "chosen": c, "rejected": r}), "preference", "x")
        for i, (p, c, r) in enumerate(rows)
    ]
    pairs, _ = encode_pairs(records, tokenizer, resolve_chat_template(tokenizer), 64)
    return model, pairs


def _step(model, batches, objective, n_pairs, chosen_tokens, varlen=False):
    """Loss and gradients of one step from its micro-batches, as the loop accumulates them."""
    from tunelab.attention import varlen_attention
    from tunelab.preference import pair_terms, sequence_logps, step_loss_sum

    opts = types.SimpleNamespace(beta=0.2, label_smoothing=0.1, orpo_lambda=0.3, simpo_gamma=0.3)
    model.zero_grad()
    total = 0.0
    for batch in batches:
        with varlen_attention(model, varlen):
            logps, tokens = sequence_logps(model, batch)
            with torch.no_grad(), model.disable_adapter():
                ref = sequence_logps(model, batch)[0]
            s = step_loss_sum(pair_terms(objective, opts, logps, tokens, ref), n_pairs, chosen_tokens)
            (s / n_pairs).backward()
        total += float(s.detach())
    return total / n_pairs, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("objective", ["dpo", "orpo", "simpo"])
def test_micro_batches_and_packing_give_the_same_step(lora_pairs, objective):
    """One padded micro-batch, four accumulated ones of one pair, and both sequences of every pair packed in
    one row: the same loss and gradients (fp32; only summation order differs, hence 1e-5 relative)."""
    from tunelab.training.preference import pair_batches

    model, pairs = lora_pairs
    n, chosen_tokens = len(pairs), sum(sum(1 for x in p["chosen"]["labels"][1:] if x != -100) for p in pairs)
    one_loss, one_grads = _step(model, pair_batches(pairs, n, 0), objective, n, chosen_tokens)
    for batches, varlen in [
        (pair_batches(pairs, 1, 0), False),
        (pair_batches(pairs, n, 0, packing=True, capacity=64, layout="varlen"), True),
    ]:
        loss, grads = _step(model, batches, objective, n, chosen_tokens, varlen)
        assert loss == pytest.approx(one_loss, rel=1e-5)
        for name, grad in one_grads.items():
            assert torch.allclose(grads[name], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()))
    packed = pair_batches(pairs, n, 0, packing=True, capacity=64, layout="varlen")
    assert len(packed) == 1 and packed[0]["input_ids"].shape[0] == 1  # every sequence in one forward


# --- training runs -------------------------------------------------------------------------------


def _toy_preferences(n=48, seed=0):
    """Learnable: the word alone (chosen) over a sentence around it (rejected), whatever the word."""
    rng = random.Random(seed)
    colours = ["red", "green", "blue", "yellow", "black", "white", "红色", "蓝色"]
    wordy = ["The word is {}.", "Sure! Here it is: {}", "You asked me to repeat {}, so: {}"]
    rows = []
    for _ in range(n):
        c = rng.choice(colours)
        rows.append({"prompt": f"Repeat the word: {c}", "chosen": c, "rejected": rng.choice(wordy).format(c, c)})
    return rows


def _pref_config(tmp_path, write_jsonl, **train):
    return {
        "model": "tiny-llama",
        "task": "preference",
        "out_dir": str(tmp_path / "runs"),
        "seed": 0,
        "data": {"train": str(write_jsonl(_toy_preferences())), "val_fraction": 0.25, "max_length": 64},
        "train": {"batch_size": 4, "lr": 1e-2, "precision": "fp32", "warmup_ratio": 0.0} | train,
    }


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dpo_learns_a_toy_preference(tmp_path, write_jsonl):
    import tunelab

    cfg = _pref_config(tmp_path, write_jsonl, max_steps=12, eval_every=6, batch_size=6, lr=2e-2)
    result = tunelab.train(cfg, progress=False)
    records = _metrics(result.run_dir)
    assert records[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)  # LoRA starts as the reference
    assert records[0]["reward_accuracy"] == 0.0  # every margin exactly 0
    for key in ("reward_accuracy", "rewards_chosen", "rewards_rejected", "rewards_margin", "logps_chosen"):
        assert all(key in r for r in records)
    final = result.summary["eval"]
    assert final["eval_reward_accuracy"] >= 0.8 and final["eval_rewards_margin"] > 0
    assert final["eval_loss"] < math.log(2) - 0.05
    assert (result.run_dir / "config.yaml").read_text().count("objective: dpo") == 1


def test_precomputed_reference_and_frozen_copy_match_the_adapter_switched_off(tmp_path, write_jsonl):
    """LoRA's reference is the base: precomputed (cached in the run) it gives the same steps; `full` keeps a
    frozen copy, so its first step compares the model with itself (loss ln 2)."""
    import tunelab

    runs = {}
    for name, extra in [("off", {}), ("pre", {"precompute_ref": True})]:
        cfg = _pref_config(tmp_path, write_jsonl, max_steps=3) | {"run_name": name}
        cfg["train"] |= extra
        runs[name] = tunelab.train(cfg, progress=False)
    losses = {k: [r["loss"] for r in _metrics(v.run_dir)] for k, v in runs.items()}
    assert losses["pre"] == pytest.approx(losses["off"], rel=1e-5)
    from safetensors.torch import load_file

    cache = runs["pre"].run_dir / "reference_logps.safetensors"
    cached = load_file(cache)
    assert cached["train"].shape == (36, 2) and cached["val"].shape == (12, 2)
    resumed = tunelab.train(None, ["train.max_steps=4"], resume=runs["pre"].run_dir, progress=False)
    assert resumed.summary["steps"] == 4  # the resumed run reads the cache: the model is no longer the initial one
    cache.unlink()
    with pytest.raises(UserError, match="reference log-probs cannot be recomputed"):
        tunelab.train(None, ["train.max_steps=5"], resume=runs["pre"].run_dir, progress=False)
    cfg = _pref_config(tmp_path, write_jsonl, max_steps=1, lr=1e-4) | {"run_name": "full", "method": "full"}
    cfg["data"]["val_fraction"] = 0.0
    full = tunelab.train(cfg, progress=False)
    assert _metrics(full.run_dir)[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)


def test_hints_read_the_reward_curves():
    from tunelab.training.hints import curve_hints

    def run(accuracy, margin, fall=0.5):
        return [
            {"step": i + 1, "loss": 0.5, "reward_accuracy": a, "rewards_margin": m, "logps_chosen": -20 - fall * i}
            for i, (a, m) in enumerate(zip(accuracy, margin))
        ]

    exploding = " ".join(curve_hints(run([0.7] * 20, [0.2 * 1.3**i for i in range(20)])))
    assert "reward margins grew" in exploding and "over-optimisation" in exploding
    assert "log-probability fell" in exploding  # -20 -> -29.5
    assert "near chance" in " ".join(curve_hints(run([0.5] * 20, [0.01] * 20, fall=0.0)))
    healthy = run([0.5 + 0.025 * i for i in range(20)], [0.1 * i for i in range(20)], fall=0.0)
    assert not [h for h in curve_hints(healthy) if "reward" in h or "log-prob" in h]
    assert curve_hints([{"step": 1, "loss": 1.0}]) == []  # not a preference run


def test_preference_demo_data(tmp_path):
    """Seeded, held-out dates never trained on, every rejected answer a real slip (never the ISO date)."""
    from tunelab.demo.preference import ISO_DATE, write_dataset

    paths = write_dataset(tmp_path)
    read = {k: [json.loads(line) for line in p.read_text().splitlines()] for k, p in paths.items()}
    assert (len(read["sft"]), len(read["pairs"]), len(read["test"])) == (96, 320, 64)
    test_dates = {r["chosen"] for r in read["test"]}
    assert not test_dates & ({r["chosen"] for r in read["pairs"]} | {r["output"] for r in read["sft"]})
    for pair in read["pairs"] + read["test"]:
        assert ISO_DATE.fullmatch(pair["chosen"]) and pair["rejected"] != pair["chosen"]
    assert load_examples(paths["pairs"])[1] == "preference"
    assert write_dataset(tmp_path / "again")["pairs"].read_text() == paths["pairs"].read_text()


def test_orpo_run_with_accumulation_equals_one_big_batch(tmp_path, write_jsonl):
    """Through the loop: 2 pairs x 2 accumulated micro-batches is the 4-pair step (loss and reward metrics)."""
    import tunelab

    records = {}
    for name, train in [("big", {"batch_size": 4}), ("accum", {"batch_size": 2, "grad_accum": 2})]:
        cfg = _pref_config(tmp_path, write_jsonl, max_steps=3, objective="orpo", **train) | {"run_name": name}
        cfg["data"]["val_fraction"] = 0.0
        cfg["lora"] = {"dropout": 0.0}  # dropout masks depend on the micro-batch shapes
        records[name] = _metrics(tunelab.train(cfg, progress=False).run_dir)
    for big, accum in zip(records["big"], records["accum"]):
        for key in ("loss", "grad_norm", "reward_accuracy", "rewards_margin", "logps_chosen"):
            assert accum[key] == pytest.approx(big[key], rel=1e-4, abs=1e-6), key
