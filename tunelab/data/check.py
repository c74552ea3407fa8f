"""`tunelab data check`: counts, token-length percentiles and problems of a data file."""

from __future__ import annotations

from collections import Counter

import numpy as np

from .encode import IGNORE_INDEX, encode_examples, resolve_chat_template
from .formats import NoValidRecords, load_examples


def check_file(
    path, tokenizer, fmt: str = "auto", max_length: int = 512, chat_template: str = "auto", loss_on: str = "completion"
) -> dict:
    """Validate every record (all problems are collected) and report lengths in tokens."""
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
    }
    if fmt == "classification":
        report["labels"] = dict(Counter(str(e.label) for e in examples).most_common())
        lengths = [len(tokenizer(e.text)["input_ids"]) for e in examples]
    else:
        template = resolve_chat_template(tokenizer, chat_template)
        encoded, stats = encode_examples(examples, tokenizer, template, max_length, loss_on, path=path)
        lengths = stats.lengths
        report["truncated_at_max_length"] = stats.truncated
        report["dropped_no_target"] = stats.dropped_no_target
        report["max_length"] = max_length
        targets = [sum(1 for x in e["labels"] if x != IGNORE_INDEX) for e in encoded]
        if targets:
            report["completion_tokens_mean"] = float(np.mean(targets))
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
    return report
