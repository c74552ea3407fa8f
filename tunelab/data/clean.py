"""`tunelab data clean`: a cleaned copy of a data file and CLEAN.report.json naming every removed, changed or
added line and why. The input is never changed. JSON Lines input is edited line by line, so every line
kept is byte-identical except for the personal data replaced in it; JSON and CSV input is written as JSON Lines.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..errors import UserError
from ..io import atomic_write_bytes, atomic_write_json
from .doctor import record_text
from .duplicates import find_duplicates, find_leaks
from .formats import is_table, load_examples
from .pii import PLACEHOLDERS, find_pii, string_fields


def _scrub_line(raw: str, source: dict) -> tuple[str, list[dict]]:
    """The raw JSON line with every personal-data match replaced by its placeholder, the rest unchanged.

    Matches are found in the decoded values and replaced where they stand in the raw text: they hold no
    character JSON escapes, so they appear there verbatim."""
    changes, literals = [], {}
    for name, value in string_fields(source):
        for f in find_pii(value):
            changes.append({"field": name, "kind": f.kind})
            literals[f.text] = PLACEHOLDERS[f.kind]
    for text in sorted(literals, key=len, reverse=True):  # longest first: a match inside another stays whole
        raw = raw.replace(text, literals[text])
    return raw, changes


def report_path(out) -> Path:
    """clean.jsonl -> clean.report.json"""
    return Path(out).with_suffix(".report.json")


def clean_file(
    path,
    out,
    dedup: bool = False,
    scrub_pii: bool = False,
    drop_label_errors: bool = False,
    balance: str | None = None,
    eval_path=None,
    seed: int = 0,
) -> dict:
    """Write the cleaned file to `out` and `out`.report.json; returns the report."""
    path, out = Path(path), Path(out)
    if out.resolve() == path.resolve():
        raise UserError(f"{out}: data clean never writes over its input; choose another --out")
    examples, fmt, _ = load_examples(path)
    jsonl = path.suffix.lower() not in (".json", ".csv") and not is_table(path)
    raw_lines = path.read_bytes().decode("utf-8").split("\n") if jsonl else None
    removed: dict[int, str] = {}
    if dedup:
        found = find_duplicates([e.line for e in examples], [record_text(e) for e in examples])
        for group in found["exact"]:
            for line in group[1:]:
                removed.setdefault(line, f"exact duplicate of line {group[0]}")
        for first, second, score in found["near"]:
            if first not in removed:
                removed.setdefault(second, f"near duplicate of line {first} (Jaccard {score})")
        if eval_path:
            kept = [e for e in examples if e.line not in removed]
            eval_examples = load_examples(eval_path, fmt)[0]
            texts = [record_text(e) for e in kept]
            for leak in find_leaks(
                [e.line for e in kept], texts, [e.line for e in eval_examples], [record_text(e) for e in eval_examples]
            ):
                removed.setdefault(leak["train_line"], f"also in {eval_path} line {leak['eval_line']} (leak)")
    if drop_label_errors:
        if fmt != "classification":
            raise UserError(f"{path}: --drop-label-errors needs classification (text/label) data, this is {fmt}")
        from .doctor import label_findings

        for e in label_findings(examples)["label_errors"]:
            removed.setdefault(e["line"], f"likely label error: {e['label']} (suggested: {e['suggested']})")
    kept = [e for e in examples if e.line not in removed]
    added: list[tuple[int, str]] = []
    if balance:
        if fmt != "classification":
            raise UserError(f"{path}: --balance needs classification (text/label) data, this is {fmt}")
        from .dataset import balance_classes

        balanced = balance_classes(kept, balance, seed)
        chosen = Counter(e.line for e in balanced)
        for e in kept:
            if e.line not in chosen:
                removed[e.line] = f"balance: undersampled class {e.label}"
        for line, copies in chosen.items():
            added += [(line, "balance: oversampled copy")] * (copies - 1)
        kept = [e for e in kept if e.line in chosen]
    changed = []
    rows = []
    for e in kept:
        raw = raw_lines[e.line - 1] if jsonl else json.dumps(e.source, ensure_ascii=False)
        if scrub_pii:
            raw, changes = _scrub_line(raw, e.source)
            if changes:
                changed.append({"line": e.line, "reason": "personal data replaced", "fields": changes})
        rows.append(raw)
    by_line = {e.line: rows[i] for i, e in enumerate(kept)}
    rows += [by_line[line] for line, _ in added]
    atomic_write_bytes(out, ("\n".join(r.rstrip("\n") for r in rows) + "\n").encode("utf-8"))
    report = {
        "input": str(path),
        "output": str(out),
        "format": fmt,
        "records_in": len(examples),
        "records_out": len(rows),
        "removed": [{"line": line, "reason": why} for line, why in sorted(removed.items())],
        "changed": changed,
        "added": [{"copy_of_line": line, "reason": why} for line, why in added],
    }
    if not jsonl:
        report["note"] = "the input is not JSON Lines: its records were written as JSON Lines"
    atomic_write_json(report_path(out), report)
    return report


def format_clean_report(report: dict) -> str:
    rows = [
        f"{report['input']} -> {report['output']}: {report['records_in']} records in, {report['records_out']} out "
        f"({len(report['removed'])} removed, {len(report['changed'])} changed, {len(report['added'])} added)"
    ]
    rows += [f"  removed line {r['line']:<6} {r['reason']}" for r in report["removed"]]
    for c in report["changed"]:
        fields = ", ".join(sorted({f"{f['field']} ({f['kind']})" for f in c["fields"]}))
        rows.append(f"  changed line {c['line']:<6} {c['reason']}: {fields}")
    rows += [f"  added copy of line {a['copy_of_line']}: {a['reason']}" for a in report["added"]]
    if "note" in report:
        rows.append(f"  note: {report['note']}")
    return "\n".join(rows)
