"""`tunelab eval`: evaluate a run, a bare model, or an ensemble of runs (RUN1,RUN2,...).

Loss (token-weighted perplexity, or classification metrics), then for causal LMs generation metrics
(exact match, BLEU, ROUGE, an optional user scorer, all fractions in [0, 1]) with predictions.jsonl to read
the failures, and efficiency: latency per example (p50/p95), throughput, peak memory.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import torch

from ..config import apply_overrides, build_config, load_config
from ..data import prepare_data
from ..data.collate import pad_batch
from ..data.formats import load_examples
from ..device import peak_memory
from ..errors import UserError
from ..generation import GenerationSettings, generate_batch
from ..io import atomic_write_json, atomic_write_jsonl
from ..loading import is_run_dir, load
from ..log import log
from .loss import evaluate_loss
from .metrics import exact_match, generation_metrics, latency_stats, rouge
from .plots import plot_confusion_matrix, write_plots


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


def output_names(data: str | None) -> tuple[str, str]:
    """(eval file, predictions file) names inside the run: the run's own `eval.json` / `predictions.jsonl`
    for its validation split, `eval-<stem>.json` / `predictions-<stem>.jsonl` for `--data <stem>.ext`,
    which can never overwrite the run's own."""
    if not data:
        return "eval.json", "predictions.jsonl"
    stem = Path(data).stem
    return f"eval-{stem}.json", f"predictions-{stem}.jsonl"


def batched_answers(model, tokenizer, prompts: list, settings, batch_size: int, progress: bool = True) -> list[str]:
    """Answers in the prompts' order, generated in left-padded batches of similar length (less padding);
    greedy answers equal one-at-a-time ones (tested)."""
    from tqdm import tqdm

    order = sorted(range(len(prompts)), key=lambda i: sum(len(m["content"]) for m in prompts[i]))
    answers: list = [None] * len(prompts)
    # on stderr, and only on a terminal: logs and piped output stay clean
    with tqdm(
        total=len(prompts),
        desc="generate",
        unit="example",
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5,
        disable=not progress or not sys.stderr.isatty(),
    ) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for i, text in zip(
                chunk, generate_batch(model, tokenizer, [prompts[i] for i in chunk], settings, batch_size)
            ):
                answers[i] = text
            bar.update(len(chunk))
    return answers


def generation_eval(model, tokenizer, examples, cfg, predictions_path: Path | None, progress: bool = True) -> dict:
    """Greedy answers for each held-out conversation, scored against its last assistant turn; the
    per-example rows go to `predictions_path` when given."""
    items = [e for e in examples if e.messages and e.messages[-1]["role"] == "assistant"]
    items = items[: cfg.eval.max_examples] if cfg.eval.max_examples else items
    if not items:
        return {}
    settings = GenerationSettings.greedy(cfg.eval.max_new_tokens)
    predictions = batched_answers(
        model, tokenizer, [e.messages[:-1] for e in items], settings, cfg.eval.batch_size, progress
    )
    # latency: a separate sample answered one at a time (batching hides the per-request time)
    seconds = []
    for e in items[: cfg.eval.latency_examples]:
        t0 = time.perf_counter()
        generate_batch(model, tokenizer, [e.messages[:-1]], settings)
        seconds.append(time.perf_counter() - t0)
    references = [e.messages[-1]["content"] for e in items]
    metrics = generation_metrics(predictions, references, cfg.eval.lang)
    scorer = _scorer(cfg.eval.scorer)
    rows = []
    for e, pred, ref in zip(items, predictions, references):
        row = {
            "line": e.line,
            # the whole conversation the model answered (several turns in a multi-turn example)
            "prompt": e.messages[:-1],
            "reference": ref,
            "prediction": pred,
            "exact_match": exact_match([pred], [ref]),  # the aggregate's own definition, so rows add up to it
            "rougeL": rouge([pred], [ref], cfg.eval.lang)["rougeL"],
        }
        if scorer is not None:
            row["score"] = float(scorer(pred, ref, e.source))
        rows.append(row)
    out = {f"eval_{k}": v for k, v in metrics.items() if k not in ("warnings", "notes")}
    if scorer is not None:
        out["eval_score"] = sum(r["score"] for r in rows) / len(rows)
    out["eval_generation_warnings"] = metrics["warnings"]
    out["eval_generation_notes"] = metrics["notes"]
    if seconds:  # eval.latency_examples: 0 measures none
        out.update({f"eval_latency_{k}": v for k, v in latency_stats(seconds).items()})
    out["eval_generated_examples"] = len(items)
    if predictions_path is not None:
        atomic_write_jsonl(predictions_path, rows)
    return out


def _classification_latency(model, examples, pad_id) -> dict:
    seconds = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for ex in examples[:200]:
            batch = {k: v.to(device) for k, v in pad_batch([ex], pad_id).items()}
            t0 = time.perf_counter()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            seconds.append(time.perf_counter() - t0)
    return {f"eval_latency_{k}": v for k, v in latency_stats(seconds).items()}


def evaluate_run(
    run_or_model: str, data: str | None = None, overrides: list[str] | None = None, progress: bool = True
) -> dict:
    """Evaluate and return the metrics. A single run also gets its files (see `output_names`): RUN/eval.json
    and predictions.jsonl for its validation split, RUN/eval-<stem>.json and predictions-<stem>.jsonl for
    `data`; `written` lists the paths. Scores are fractions in [0, 1] (`scale`)."""
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
        raw = load_examples(data, cfg.data.format, cfg.data.skip_invalid)[0]
    if not examples:
        raise UserError("the evaluation set is empty (the run has no validation split; pass --data FILE)")
    run_dir = runs[0] if len(runs) == 1 else None  # an ensemble or a bare model has no folder of its own
    eval_name, predictions_name = output_names(data)
    predictions_path = run_dir / predictions_name if run_dir is not None else None
    if cfg.task == "preference":
        if len(loaded) > 1:
            raise UserError("a preference model is evaluated alone (no ensemble)")
        from ..preference import evaluate_pairs
        from ..training.preference import eval_reference

        reference = eval_reference(model, cfg, run_dir, examples, own_split=not data)
        objective = cfg.train.objective or "dpo"
        metrics = evaluate_pairs(
            model, examples, objective, cfg.preference, reference, cfg.train.batch_size, tokenizer.pad_token_id
        )
    else:
        metrics = evaluate_loss(model, examples, tokenizer.pad_token_id, cfg.train.batch_size)
    if cfg.task == "classification":
        metrics.update(_classification_latency(model, examples, tokenizer.pad_token_id))
    elif cfg.eval.generate and len(loaded) == 1:
        # the adapter as trained, not merged: merged weights agree to ~1e-6 of the logits, yet flipped 2 (LoRA)
        # and 6 (IA3) of the 64 greedy date answers of the smollm2 comparison
        metrics.update(generation_eval(model, tokenizer, raw, cfg, predictions_path, progress))
    peak, kind = peak_memory(next(model.parameters()).device)
    written = []
    if run_dir is not None:
        written = [run_dir / eval_name] + ([predictions_path] if "eval_generated_examples" in metrics else [])
    metrics.update(
        {
            "scale": "0-1",  # exact match, BLEU, ROUGE and classification scores are all fractions
            "peak_mem_bytes": peak,
            "peak_mem_kind": kind,
            "examples": len(examples),
            "data": data or "validation split",
            "models": targets,
            "written": [str(p) for p in written],
        }
    )
    if run_dir is not None:
        atomic_write_json(run_dir / eval_name, metrics)
        _write_plots(run_dir, data)
    return metrics


def _write_plots(run_dir: Path, data: str | None) -> None:
    """The run's plots after its own evaluation; for `--data`, only that data's confusion matrix."""
    if not data:
        write_plots(run_dir)
        return
    try:
        plot_confusion_matrix(run_dir, Path(data).stem)
    except Exception as exc:  # noqa: BLE001 - the evaluation is already saved
        log(f"note: plots were not written: {exc}")
