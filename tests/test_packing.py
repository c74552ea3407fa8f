"""Padding-free packing: several examples per row must compute exactly what they compute alone."""

import random

import pytest
import torch

from tunelab.attention import varlen_attention
from tunelab.config import build_config
from tunelab.data.collate import count_loss_tokens, pack_rows, packed_batch, pad_batch, varlen_batch
from tunelab.data.encode import IGNORE_INDEX
from tunelab.losses import model_inputs, plain_loss_sum, selected_loss_sum
from tunelab.models import load_causal_lm
from tunelab.training.batching import epoch_windows, step_batches


def _examples(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]})
    return out


def test_pack_rows_places_every_example_once_within_capacity():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 50) for _ in range(rng.randint(1, 30))]
        rows = pack_rows(lengths, 50)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= 50 for row in rows)
        assert len(rows) <= 2 * sum(lengths) / 50 + 1  # first-fit decreasing is never worse than 2x optimal


def _check_packed_equals_alone(model, examples, capacity, layout):
    """layout "varlen": one unpadded row, attention per example; None (bool, sdpa) or a float dtype
    (eager): rows with a block-diagonal mask."""
    rows = pack_rows([len(e["input_ids"]) for e in examples], capacity)
    assert any(len(row) > 1 for row in rows), "the test needs rows holding several examples"
    if layout == "varlen":
        order = [i for row in rows for i in row]
        batch = varlen_batch([examples[i] for i in order])
        rows = [order]
    else:
        batch = packed_batch(examples, rows, 0, layout)
    with torch.no_grad(), varlen_attention(model, layout == "varlen"):
        packed = model(input_ids=batch["input_ids"], **model_inputs(batch)).logits
        padded = pad_batch(examples, 0)
        assert count_loss_tokens(batch) == count_loss_tokens(padded)
        losses = [float(plain_loss_sum(model, batch, suffix=False)), float(selected_loss_sum(model, batch))]
        losses = [x / count_loss_tokens(batch) for x in losses]
    with torch.no_grad():
        worst = 0.0  # the largest logit error relative to the example's largest logit
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                n = len(examples[i]["input_ids"])
                alone = model(input_ids=torch.tensor([examples[i]["input_ids"]])).logits[0]
                error = float((alone - packed[r, start : start + n]).abs().max())
                worst = max(worst, error / float(alone.abs().max()))
                start += n
        # fp32 GEMM kernels sum in a different order on each CPU kind (AVX2, AVX512, AMX blockings): smollm2's
        # logits (~20) legitimately differ by ~2e-4 absolute, ~1e-5 relative; a leak across examples is
        # ~1e-1 absolute (test_position_ids_alone_do_not_isolate_sequences)
        print(f"worst relative logit error {worst:.2e}")
        assert worst < 5e-5
        reference = float(plain_loss_sum(model, padded, suffix=False)) / count_loss_tokens(padded)
    assert max(abs(x - reference) for x in losses) < 1e-5


@pytest.mark.parametrize("attn,layout", [("sdpa", "varlen"), ("sdpa", None), ("eager", torch.float32)])
def test_packed_logits_and_loss_equal_unpacked_tiny_llama(attn, layout):
    model = load_causal_lm("tiny-llama").eval()
    model.config._attn_implementation = attn
    _check_packed_equals_alone(model, _examples(model.config.vocab_size, [5, 17, 9, 30, 3, 12, 24, 2]), 40, layout)


@pytest.mark.parametrize("layout", ["varlen", None])
def test_packed_logits_and_loss_equal_unpacked_smollm2(layout):
    model = load_causal_lm("smollm2-135m-instruct").eval()
    _check_packed_equals_alone(model, _examples(model.config.vocab_size, [40, 7, 90, 23, 61, 12], seed=1), 128, layout)


def test_varlen_micro_batches_hold_every_token_once_without_padding():
    examples = _examples(1000, [30, 5, 64, 17, 40, 8, 50, 22, 9])
    batches = step_batches(examples, batch_size=2, pad_id=0, packing=True, capacity=64, layout="varlen")
    assert sum(b["input_ids"].numel() for b in batches) == sum(len(e["input_ids"]) for e in examples)
    assert all(b["input_ids"].shape[1] <= 2 * 64 for b in batches)
    assert all(int(b["cu_seq_lens_q"][-1]) == b["input_ids"].shape[1] for b in batches)


def test_position_ids_alone_do_not_isolate_sequences():
    """Why packed batches carry a block-diagonal mask: without it the second example sees the first."""
    model = load_causal_lm("tiny-llama").eval()
    a, b = _examples(model.config.vocab_size, [10, 8])
    ids = torch.tensor([a["input_ids"] + b["input_ids"]])
    positions = torch.tensor([list(range(10)) + list(range(8))])
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([b["input_ids"]])).logits[0]
        leaky = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions).logits[0, 10:]
    assert (alone - leaky).abs().max() > 1e-3


def test_group_by_length_keeps_every_example_and_batches_similar_lengths():
    rng = random.Random(0)
    lengths = [rng.choice([10, 200]) + rng.randint(0, 5) for _ in range(400)]
    cfg = build_config(
        {
            "model": "tiny-llama",
            "seed": 3,
            "train": {"batch_size": 8, "grad_accum": 1, "group_by_length": True, "packing": False},
        }
    )
    windows = epoch_windows(lengths, cfg, 0)
    assert sorted(i for w in windows for i in w) == list(range(400))
    assert windows == epoch_windows(lengths, cfg, 0)  # a pure function of (seed, epoch)
    spread = sum(max(lengths[i] for i in w) - min(lengths[i] for i in w) for w in windows) / len(windows)
    assert spread < 20  # random batches would mix 10- and 200-token examples almost always
    assert max(lengths[i] for i in windows[0]) == max(lengths)  # the longest step comes first
