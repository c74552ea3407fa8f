"""Does the export compute what the trained model computes? KL divergence of the next-token distributions
and greedy-token agreement on fixed conversations (teacher-forced: prompt and reference answer), the greedy
answers themselves, and the task metric (exact match) when the conversations have reference answers.

Each kind of export has a tolerance on the mean KL (nats per token): an export past it warns loudly."""

from __future__ import annotations

import sys
import time

import torch

from ..data.encode import render, with_system_prompt
from ..eval.metrics import exact_match
from ..generation import GenerationSettings, generate_batch
from ..log import log

# mean KL per token (nats) an export of each kind may drift by before it warns. Measured drifts are in the
# README; these leave headroom over them: fp32 merges differ by summation order only (~1e-9), f16 weights
# by their rounding (~1e-4 on smollm2), int8/q8_0 by quantization, and pruning changes the model by design
TOLERANCE = {
    "adapter": 1e-6,
    "merged": 1e-4,
    "merged-quantized-base": 0.05,  # against the 4-bit model (bf16 compute on some CPUs) it was trained with
    "gguf-f16": 2e-3,
    "gguf-q8_0": 2e-2,
    "int8": 0.1,
    "nf4": 0.2,
    "magnitude-pruned": 0.5,
    "layer-pruned": 2.0,
}


def conversations(examples, limit: int | None) -> list[list[dict]]:
    """The examples' conversations (those ending in an assistant answer are teacher-forced on it)."""
    convs = [list(e.messages) for e in examples if e.messages]
    return convs[:limit] if limit else convs


def _encode(tokenizer, template, conv, system):
    text = render(
        tokenizer, template, with_system_prompt(conv, system), add_generation_prompt=conv[-1]["role"] != "assistant"
    )
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


@torch.no_grad()
def logit_drift(reference, exported, tokenizer, convs, system) -> dict:
    kls, agree, positions, max_kl = 0.0, 0, 0, 0.0
    for conv in convs:
        ids = _encode(tokenizer, tokenizer.chat_template, conv, system)
        ref = torch.log_softmax(reference(input_ids=ids).logits[0].double(), -1)
        exp = torch.log_softmax(exported(input_ids=ids).logits[0].double(), -1)
        kl = (ref.exp() * (ref - exp)).sum(-1).clamp(min=0)
        kls += float(kl.sum())
        max_kl = max(max_kl, float(kl.max()))
        agree += int((ref.argmax(-1) == exp.argmax(-1)).sum())
        positions += ids.shape[1]
    return {
        "positions": positions,
        "mean_kl": kls / max(positions, 1),
        "max_kl": max_kl,
        "greedy_token_agreement": agree / max(positions, 1),
    }


def _answers(model, tokenizer, prompts, system, max_new_tokens) -> tuple[list[str], float]:
    t0 = time.perf_counter()
    answers = generate_batch(model, tokenizer, prompts, GenerationSettings.greedy(max_new_tokens), 8, system=system)
    seconds = time.perf_counter() - t0
    tokens = sum(len(tokenizer(a, add_special_tokens=False).input_ids) + 1 for a in answers)
    return answers, tokens / seconds if seconds > 0 else 0.0


def compare(reference, exported, tokenizer, convs, system, kind: str, max_new_tokens: int = 32) -> dict:
    """The parity report of `exported` against `reference` on `convs` (both models in eval mode)."""
    report = {"kind": kind, "conversations": len(convs), **logit_drift(reference, exported, tokenizer, convs, system)}
    prompts = [c[:-1] if c[-1]["role"] == "assistant" else c for c in convs]
    refs = [c[-1]["content"] for c in convs if c[-1]["role"] == "assistant"]
    ref_answers, ref_tps = _answers(reference, tokenizer, prompts, system, max_new_tokens)
    exp_answers, exp_tps = _answers(exported, tokenizer, prompts, system, max_new_tokens)
    report["same_greedy_answers"] = sum(a == b for a, b in zip(ref_answers, exp_answers))
    report["tokens_per_s"] = {"trained": round(ref_tps, 2), "export": round(exp_tps, 2)}
    if len(refs) == len(convs):
        report["exact_match"] = {"trained": exact_match(ref_answers, refs), "export": exact_match(exp_answers, refs)}
    tolerance = TOLERANCE[kind]
    report["tolerance_mean_kl"] = tolerance
    report["within_tolerance"] = report["mean_kl"] <= tolerance
    report["examples"] = [
        {"prompt": p[-1]["content"], "trained": a, "export": b}
        for p, a, b in list(zip(prompts, ref_answers, exp_answers))[:5]
    ]
    return report


def print_report(report: dict, file=None) -> None:
    file = file or sys.stderr
    n = report["conversations"]
    print(
        f"parity ({report['kind']}) against the trained model, {n} conversations, {report['positions']} positions:",
        file=file,
    )
    ok = "ok" if report["within_tolerance"] else "EXCEEDED"
    rows = [
        ("mean KL (nats/token)", f"{report['mean_kl']:.3g}  (tolerance {report['tolerance_mean_kl']:g}: {ok})"),
        ("max KL", f"{report['max_kl']:.3g}"),
        ("greedy-token agreement", f"{report['greedy_token_agreement']:.2%}"),
        ("same greedy answers", f"{report['same_greedy_answers']}/{n}"),
        ("tokens/s trained -> export", f"{report['tokens_per_s']['trained']} -> {report['tokens_per_s']['export']}"),
    ]
    if "exact_match" in report:
        em = report["exact_match"]
        rows.append(("exact match trained -> export", f"{em['trained']:.3f} -> {em['export']:.3f}"))
    for name, value in rows:
        print(f"  {name:32s} {value}", file=file)
    if not report["within_tolerance"]:
        bar = "!" * 72
        log(bar)
        log(
            f"WARNING: this {report['kind']} export drifts from the trained model by a mean KL of "
            f"{report['mean_kl']:.3g} nats/token, past the {report['tolerance_mean_kl']:g} expected of its kind: "
            "check it before you ship it (parity.json has the examples)"
        )
        log(bar)
