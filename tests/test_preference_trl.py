"""tunelab's DPO, IPO, ORPO and SimPO against TRL's own loss code (the anchor), on a fixed batch of a tiny model.

The same LoRA model (B randomised, so policy and reference differ) and the same token sequences go
through TRL's DPOTrainer._compute_loss / ORPOTrainer / CPOTrainer.get_batch_loss_metrics (on a minimal trainer object:
the methods read only a few attributes) and through tunelab's pair batches, sequence log-probs and losses.
Losses and every LoRA gradient agree within 1e-5 relative: both are fp32 sums over the same few hundred
terms, differing only in summation order (TRL's tiled log-softmax vs ours).
"""

import types
from collections import defaultdict

import pytest
import torch

trl = pytest.importorskip("trl")

from tunelab.data.encode import IGNORE_INDEX, resolve_chat_template  # noqa: E402
from tunelab.data.preference import PreferencePair, encode_pairs  # noqa: E402
from tunelab.preference import pair_terms, sequence_logps, step_loss_sum  # noqa: E402
from tunelab.training.preference import pair_batches  # noqa: E402

RTOL = 1e-5

PAIRS = [
    ("Capital of France?", "Paris.", "I believe the capital of France is Lyon, a big city."),
    ("2+2?", "4", "It is 5."),
    ("Name a colour.", "Blue is a colour I like a lot.", "Dog"),
    ("Say hi in Chinese.", "你好", "Bonjour!"),
]


@pytest.fixture(scope="module")
def tiny_lora():
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from tunelab.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer("tiny-llama")
    base = load_causal_lm("tiny-llama")
    # TRL's DPO reads per-token log-probs from its fused head (the same numbers as a log-softmax of the logits)
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 2.0)
    model.train()
    template = resolve_chat_template(tokenizer)
    records = [
        PreferencePair(i, [{"role": "user", "content": p}], [_a(c)], [_a(r)]) for i, (p, c, r) in enumerate(PAIRS)
    ]
    pairs, _ = encode_pairs(records, tokenizer, template, 64)
    return model, tokenizer, pairs


def _a(text):
    return {"role": "assistant", "content": text}


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _close(a, b):
    assert torch.allclose(a, b, rtol=RTOL, atol=RTOL * float(b.abs().max())), (a, b)


def _ours(model, pairs, objective, **options):
    defaults = {"beta": 0.1, "label_smoothing": 0.0, "orpo_lambda": 0.1, "simpo_gamma": 0.5}
    opts = types.SimpleNamespace(**(defaults | options))
    model.zero_grad()
    batch = pair_batches(pairs, len(pairs), 0)[0]
    logps, tokens = sequence_logps(model, batch)
    ref = None
    if objective in ("dpo", "ipo"):
        with torch.no_grad(), model.disable_adapter():
            ref = sequence_logps(model, batch)[0]
    chosen_tokens = int(tokens[0::2].sum())
    loss = step_loss_sum(pair_terms(objective, opts, logps, tokens, ref), len(pairs), chosen_tokens) / len(pairs)
    loss.backward()
    return loss.detach(), _grads(model)


def _rows(seqs, pad_id):
    """Right-padded ids, attention and answer masks of sequences (TRL's collated layout)."""
    width = max(len(s["input_ids"]) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    answer = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX)
    for i, s in enumerate(seqs):
        n = len(s["input_ids"])
        ids[i, :n] = torch.tensor(s["input_ids"])
        attention[i, :n] = 1
        lab = torch.tensor(s["labels"])
        labels[i, :n] = lab
        answer[i, :n] = (lab != IGNORE_INDEX).long()
    return ids, attention, answer, labels


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def unwrap_model(model):
        return model

    @staticmethod
    def gather_for_metrics(x):
        return x

    gather = gather_for_metrics


def _trl_dpo(model, pairs, loss_type="sigmoid", beta=0.1):
    from trl import DPOTrainer

    trainer = types.SimpleNamespace(
        model=model,
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=False,
        ref_model=None,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    seqs = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]  # TRL's batch: chosen rows, then rejected
    ids, attention, answer, _ = _rows(seqs, 0)
    model.zero_grad()
    loss = DPOTrainer._compute_loss(
        trainer, model, {"input_ids": ids, "attention_mask": attention, "completion_mask": answer}, False
    )
    loss.backward()
    return loss.detach(), _grads(model), trainer._metrics["train"]


def _swapped(pairs):
    return [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]


def test_dpo_loss_gradients_and_rewards_equal_trl(tiny_lora):
    model, _, pairs = tiny_lora
    ours, our_grads = _ours(model, pairs, "dpo", beta=0.1)
    theirs, trl_grads, metrics = _trl_dpo(model, pairs, beta=0.1)
    assert abs(float(ours) - 0.6931) > 1e-3  # policy and reference differ: not the trivial point
    _close(ours, theirs)
    for name in trl_grads:
        _close(our_grads[name], trl_grads[name])
    # the logged rewards are TRL's too
    opts = types.SimpleNamespace(beta=0.1, label_smoothing=0.0, orpo_lambda=0.1)
    with torch.no_grad():
        batch = pair_batches(pairs, len(pairs), 0)[0]
        logps, tokens = sequence_logps(model, batch)
        with model.disable_adapter():
            ref = sequence_logps(model, batch)[0]
        sums = pair_terms("dpo", opts, logps, tokens, ref).metric_sums()
    # a margin is beta x a difference of log-prob sums that mostly cancel: the sums agree to RTOL of their size
    # (up to 159 here), so the margin does to RTOL x beta x that, not to RTOL of itself (an AVX2 CPU: 1.1e-6
    # apart on a margin of 0.0199, 5.7e-5 of it; a wrong beta or reference would move it by 10% or more)
    margin_atol = RTOL * 0.1 * float(torch.cat([logps, ref]).abs().max())
    for ours_key, trl_key in [("rewards_margin", "rewards/margins"), ("reward_accuracy", "rewards/accuracies")]:
        assert sums[ours_key] / len(pairs) == pytest.approx(metrics[trl_key][0], rel=RTOL, abs=margin_atol)


def test_conservative_dpo_is_trl_on_the_pair_and_its_swap(tiny_lora):
    """label_smoothing eps: (1 - eps) x DPO(pairs) + eps x DPO(the pairs with chosen and rejected swapped)."""
    model, _, pairs = tiny_lora
    eps = 0.2
    ours, our_grads = _ours(model, pairs, "dpo", label_smoothing=eps)
    straight, straight_grads, _ = _trl_dpo(model, pairs)
    flipped, flipped_grads, _ = _trl_dpo(model, _swapped(pairs))
    _close(ours, (1 - eps) * straight + eps * flipped)
    for name in straight_grads:
        _close(our_grads[name], (1 - eps) * straight_grads[name] + eps * flipped_grads[name])


def test_ipo_loss_and_gradients_equal_trl(tiny_lora):
    model, _, pairs = tiny_lora
    ours, our_grads = _ours(model, pairs, "ipo", beta=0.5)
    theirs, trl_grads, _ = _trl_dpo(model, pairs, loss_type="ipo", beta=0.5)
    _close(ours, theirs)
    for name in trl_grads:
        _close(our_grads[name], trl_grads[name])


def _trl_orpo_trainer(lam):
    from trl.experimental.orpo import ORPOTrainer

    trainer = types.SimpleNamespace(
        accelerator=_Accelerator(), is_encoder_decoder=False, padding_value=0, aux_loss_enabled=False, beta=lam
    )
    for name in ("concatenated_forward", "odds_ratio_loss"):
        setattr(trainer, name, types.MethodType(getattr(ORPOTrainer, name), trainer))
    trainer.concatenated_inputs = ORPOTrainer.concatenated_inputs
    trainer.get_batch_logps = ORPOTrainer.get_batch_logps
    return trainer, ORPOTrainer


def test_orpo_loss_and_gradients_equal_trl(tiny_lora):
    """TRL's ORPOTrainer takes its NLL over prompt and answer; the ORPO paper's SFT term (and tunelab's) is on
    the answer. With a one-token prompt (never a target) the two coincide, so the whole loss is compared."""
    model, _, encoded = tiny_lora
    pairs = []
    for p in encoded:
        one = {}
        for key in ("chosen", "rejected"):
            ids = p[key]["input_ids"][-12:]  # the answer and the end of the template: a one-token "prompt"
            one[key] = {"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]}
        pairs.append(one)
    ours, our_grads = _ours(model, pairs, "orpo", orpo_lambda=0.25)
    trainer, orpo = _trl_orpo_trainer(0.25)
    batch = {}
    for key in ("chosen", "rejected"):
        ids, attention, _, labels = _rows([p[key] for p in pairs], 0)
        batch |= {f"{key}_input_ids": ids, f"{key}_attention_mask": attention, f"{key}_labels": labels}
    model.zero_grad()
    theirs, metrics = orpo.get_batch_loss_metrics(trainer, model, batch)
    theirs.backward()
    _close(ours, theirs.detach())
    for name, grad in _grads(model).items():
        _close(our_grads[name], grad)


def test_orpo_odds_ratio_on_chat_prompts_equals_trl(tiny_lora):
    """With real chat prompts: TRL's per-token mean log-probs and odds-ratio term, our NLL on the answers."""
    model, _, pairs = tiny_lora
    trainer, orpo = _trl_orpo_trainer(0.1)
    seqs = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    ids, attention, _, labels = _rows(seqs, 0)
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=attention).logits
    means = orpo.get_batch_logps(logits, labels, average_log_prob=True)
    n = len(pairs)
    odds, *_ = trainer.odds_ratio_loss(means[:n], means[n:])
    nll = torch.nn.functional.cross_entropy(logits[:n, :-1].reshape(-1, logits.size(-1)), labels[:n, 1:].reshape(-1))
    theirs = nll - odds.mean()
    theirs.backward()
    trl_grads = _grads(model)
    ours, our_grads = _ours(model, pairs, "orpo", orpo_lambda=0.1)
    _close(ours, theirs.detach())
    for name in trl_grads:
        _close(our_grads[name], trl_grads[name])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_simpo_loss_gradients_and_rewards_equal_trl(tiny_lora, label_smoothing):
    """SimPO is TRL's CPOTrainer with loss_type="simpo" and cpo_alpha=0 (no NLL term): mean per-token log-probs,
    no reference model; with real chat prompts, loss, rewards and every LoRA gradient compared."""
    from trl.experimental.cpo import CPOTrainer

    model, _, pairs = tiny_lora
    beta, gamma = 2.0, 0.8
    trainer = types.SimpleNamespace(
        accelerator=_Accelerator(),
        is_encoder_decoder=False,
        pad_token_id=0,
        aux_loss_enabled=False,
        loss_type="simpo",
        beta=beta,
        simpo_gamma=gamma,
        label_smoothing=label_smoothing,
        alpha=0.0,  # AlphaPO's reward transform off
        cpo_alpha=0.0,
    )
    for name in ("concatenated_forward", "cpo_loss"):
        setattr(trainer, name, types.MethodType(getattr(CPOTrainer, name), trainer))
    trainer.concatenated_inputs = CPOTrainer.concatenated_inputs
    trainer.get_batch_logps = CPOTrainer.get_batch_logps
    batch = {}
    for key in ("chosen", "rejected"):
        ids, attention, _, labels = _rows([p[key] for p in pairs], 0)
        batch |= {f"{key}_input_ids": ids, f"{key}_attention_mask": attention, f"{key}_labels": labels}
    model.zero_grad()
    theirs, metrics = CPOTrainer.get_batch_loss_metrics(trainer, model, batch)
    theirs.backward()
    trl_grads = _grads(model)
    ours, our_grads = _ours(model, pairs, "simpo", beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing)
    _close(ours, theirs.detach())
    for name in trl_grads:
        _close(our_grads[name], trl_grads[name])
    batch = pair_batches(pairs, len(pairs), 0)[0]
    with torch.no_grad():
        logps, tokens = sequence_logps(model, batch)
    opts = types.SimpleNamespace(beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing)
    sums = pair_terms("simpo", opts, logps, tokens).metric_sums()
    n = len(pairs)
    assert sums["rewards_chosen"] / n == pytest.approx(metrics["rewards/chosen"], rel=RTOL)
    assert sums["rewards_margin"] / n == pytest.approx(metrics["rewards/margins"], rel=RTOL)
    assert sums["reward_accuracy"] / n == metrics["rewards/accuracies"]
