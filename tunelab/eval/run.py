"""`tunelab eval`: evaluate a run, a bare model, or an ensemble of runs (RUN1,RUN2,...).

Loss (token-weighted perplexity, or classification metrics), then for causal LMs generation metrics
(exact match, BLEU, ROUGE, an optional user scorer) with predictions.jsonl to read the failures, and
efficiency: latency per example (p50/p95), throughput, peak memory.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import torch

from ..config import apply_overrides, build_config, load_config
from ..data import prepare_data
from ..device import peak_memory
from ..errors import UserError
from ..io import atomic_write_json, atomic_write_jsonl
from .loss import evaluate_loss


class Ensemble(torch.nn.Module):
    """Averages members' class probabilities (classification) or next-token logits (LMs).
    For classification it returns log of the mean probabilities, so cross-entropy and argmax apply."""

    def __init__(self, members: list, classification: bool):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.classification = classification

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        outs = [m(input_ids=input_ids, attention_mask=attention_mask).logits.float() for m in self.members]
        if self.classification:
            logits = torch.stack([o.softmax(-1) for o in outs]).mean(0).log()
        else:
            logits = torch.stack(outs).mean(0)
        return type("Output", (), {"logits": logits})()


def _scorer(spec: str | None):
    if not spec:
        return None
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UserError(f"eval.scorer '{spec}': cannot import it ({exc}); use module:function") from None


def generation_eval(model, tokenizer, examples, cfg, run_dir: Path | None) -> dict:
    """Greedy answers for each held-out conversation, scored against its last assistant turn."""
    from ..generation import GenerationSettings, generate_batch
    from .metrics import generation_metrics, latency_stats, rouge

    items = [e for e in examples if e.messages and e.messages[-1]["role"] == "assistant"]
    items = items[: cfg.eval.max_examples] if cfg.eval.max_examples else items
    if not items:
        return {}
    settings = GenerationSettings.greedy(cfg.eval.max_new_tokens)
    predictions, seconds = [], []
    for e in items:  # one at a time: honest per-example latency
        t0 = time.perf_counter()
        predictions.extend(generate_batch(model, tokenizer, [e.messages[:-1]], settings))
        seconds.append(time.perf_counter() - t0)
    references = [e.messages[-1]["content"] for e in items]
    metrics = generation_metrics(predictions, references, cfg.eval.lang)
    scorer = _scorer(cfg.eval.scorer)
    rows = []
    for e, pred, ref in zip(items, predictions, references):
        row = {
            "line": e.line,
            "prompt": e.messages[-2]["content"] if len(e.messages) > 1 else "",
            "reference": ref,
            "prediction": pred,
            "exact_match": float(pred.strip() == ref.strip()),
            "rougeL": rouge([pred], [ref], cfg.eval.lang)["rougeL"],
        }
        if scorer is not None:
            row["score"] = float(scorer(pred, ref, e.source))
        rows.append(row)
    out = {f"eval_{k}": v for k, v in metrics.items() if k != "warnings"}
    if scorer is not None:
        out["eval_score"] = sum(r["score"] for r in rows) / len(rows)
    out["eval_generation_warnings"] = metrics.get("warnings", [])
    out.update({f"eval_latency_{k}": v for k, v in latency_stats(seconds).items()})
    out["eval_generated_examples"] = len(items)
    if run_dir is not None:
        atomic_write_jsonl(run_dir / "predictions.jsonl", rows)
    return out


def _classification_latency(model, examples, pad_id) -> dict:
    from ..data.collate import pad_batch
    from .metrics import latency_stats

    seconds = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for ex in examples[:200]:
            batch = {k: v.to(device) for k, v in pad_batch([ex], pad_id).items()}
            t0 = time.perf_counter()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            seconds.append(time.perf_counter() - t0)
    return {f"eval_latency_{k}": v for k, v in latency_stats(seconds).items()}


def evaluate_run(run_or_model: str, data: str | None = None, overrides: list[str] | None = None) -> dict:
    """Evaluate and return the metrics; a single run also gets RUN/eval.json (and predictions.jsonl)."""
    from ..loading import is_run_dir, load

    targets = [t for t in str(run_or_model).split(",") if t]
    runs = [Path(t) for t in targets if is_run_dir(t)]
    if len(targets) > 1 and len(runs) != len(targets):
        raise UserError("an ensemble (RUN1,RUN2,...) needs run directories only")
    is_run = bool(runs)
    if is_run:
        cfg = load_config(runs[0] / "config.yaml", overrides, saved_run=True)
    else:
        cfg = build_config(apply_overrides({"model": targets[0]}, overrides or []))
    if data:
        cfg = build_config(
            apply_overrides(cfg.to_dict(), [f"data.train={data}", "data.eval=null", "data.val_fraction=0"])
        )
    elif not is_run:
        raise UserError("evaluating a bare model needs --data FILE")
    # a bare model takes its opt-ins from the overrides (trust_remote_code=true, allow_pickle=true)
    loaded = [load(t, trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle) for t in targets]
    tokenizer = loaded[0][1]
    model = loaded[0][0] if len(loaded) == 1 else Ensemble([m for m, _ in loaded], cfg.task == "classification")
    prepared = prepare_data(cfg, tokenizer)
    examples, raw = (prepared.train, None) if data else (prepared.val, prepared.val_examples)
    if data:
        from ..data.formats import load_examples

        raw = load_examples(data, cfg.data.format, cfg.data.skip_invalid)[0]
    if not examples:
        raise UserError("the evaluation set is empty (the run has no validation split; pass --data FILE)")
    metrics = evaluate_loss(model, examples, tokenizer.pad_token_id, cfg.train.batch_size)
    if cfg.task == "classification":
        metrics.update(_classification_latency(model, examples, tokenizer.pad_token_id))
    elif cfg.eval.generate and len(loaded) == 1:
        metrics.update(generation_eval(model, tokenizer, raw, cfg, runs[0] if len(runs) == 1 else None))
    peak, kind = peak_memory(next(model.parameters()).device)
    metrics.update(
        {
            "peak_mem_bytes": peak,
            "peak_mem_kind": kind,
            "examples": len(examples),
            "data": data or "validation split",
            "models": targets,
        }
    )
    if len(runs) == 1:
        from .plots import write_plots

        atomic_write_json(runs[0] / "eval.json", metrics)
        write_plots(runs[0])
    return metrics
