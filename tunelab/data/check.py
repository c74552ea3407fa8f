"""`tunelab data check`: counts, token lengths and problems of a data file, and the data doctor's findings
(unknown fields, system prompts, duplicates and train/eval leaks, personal data, labels, answers)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from . import doctor
from .encode import IGNORE_INDEX, encode_examples, resolve_chat_template
from .formats import NoValidRecords, load_examples

MIN_RECORDS_FOR_LABEL_ERRORS = 20  # fewer: cross-validated probabilities say little


def check_file(
    path,
    tokenizer,
    fmt: str = "auto",
    max_length: int = 512,
    chat_template: str = "auto",
    loss_on: str = "completion",
    system_prompt: str | None = None,
    eval_path=None,
    label_features=None,
) -> dict:
    """Validate every record (all problems are collected), report lengths in tokens and the doctor's findings.

    `label_features(texts) -> array`: the representation for label-error finding (default TF-IDF)."""
    requested = fmt  # the eval file is read in it too: its own format when auto
    try:
        examples, fmt, problems = load_examples(path, fmt, skip_invalid=True)
    except NoValidRecords as exc:  # still a report: every problem, not only the first
        return {
            "file": str(path),
            "format": fmt,
            "records": len(exc.problems),
            "valid": 0,
            "invalid": len(exc.problems),
            "problems": exc.problems[:20],
        }
    report: dict = {
        "file": str(path),
        "format": fmt,
        "records": len(examples) + len(problems),
        "valid": len(examples),
        "invalid": len(problems),
        "problems": problems[:20],
        "unknown_fields": doctor.unknown_field_findings(examples),
    }
    if fmt == "classification":
        report["labels"] = dict(Counter(str(e.label) for e in examples).most_common())
        lengths = [len(tokenizer(e.text)["input_ids"]) for e in examples]
    else:
        template = resolve_chat_template(tokenizer, chat_template)
        encoded, stats = encode_examples(examples, tokenizer, template, max_length, loss_on, system_prompt, path=path)
        lengths = stats.lengths
        report["truncated_at_max_length"] = stats.truncated
        report["dropped_no_target"] = stats.dropped_no_target
        report["max_length"] = max_length
        targets = [sum(1 for x in e["labels"] if x != IGNORE_INDEX) for e in encoded]
        if targets:
            report["completion_tokens_mean"] = float(np.mean(targets))
        report["system_prompts"] = doctor.system_prompt_findings(examples, tokenizer, template, system_prompt)
        report["generation"] = doctor.generation_findings(
            examples, tokenizer, template, max_length, loss_on, system_prompt, path
        )
    if lengths:
        arr = np.array(lengths)
        report["tokens"] = {
            "total": int(arr.sum()),
            "min": int(arr.min()),
            "mean": round(float(arr.mean()), 1),
            "p50": int(np.percentile(arr, 50)),
            "p90": int(np.percentile(arr, 90)),
            "p99": int(np.percentile(arr, 99)),
            "max": int(arr.max()),
        }
    empty = [e.line for e in examples if e.messages and any(not m["content"].strip() for m in e.messages)]
    if empty:
        report["empty_turns_at_lines"] = empty[:20]
    eval_examples = load_examples(eval_path, requested)[0] if eval_path else None
    report["duplicates"] = doctor.duplicate_findings(examples, eval_examples)
    pii = doctor.pii_findings(examples)
    report["pii"], report["pii_findings"] = len(pii), pii[: doctor.SHOWN * 5]
    if fmt == "classification" and len(report["labels"]) >= 2:
        report["imbalance_ratio"] = round(max(report["labels"].values()) / min(report["labels"].values()), 2)
        if len(examples) >= MIN_RECORDS_FOR_LABEL_ERRORS:
            features = label_features([e.text for e in examples]) if label_features else None
            report |= doctor.label_findings(examples, features)
    return report
