"""The data doctor's findings on loaded records: duplicates and leaks, personal data, labels, generation
data problems, system prompts; and the report as a readable table. `check.py` composes them."""

from __future__ import annotations

import re
from collections import Counter

from .duplicates import find_duplicates, find_leaks
from .encode import IGNORE_INDEX, kept_positions, render_example, system_prompt_of, template_default_system
from .formats import Example, unknown_field_lines
from .pii import find_pii, string_fields

SHOWN = 20  # list entries kept per finding in the report (counts are always complete)
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")


def record_text(ex: Example) -> str:
    """What duplicates are compared on: every turn (role and content), or the text."""
    if ex.messages is not None:
        return "\n".join(f"{m['role']}: {m['content']}" for m in ex.messages)
    return ex.text or ""


def duplicate_findings(examples: list[Example], eval_examples: list[Example] | None = None) -> dict:
    lines, texts = [e.line for e in examples], [record_text(e) for e in examples]
    found = find_duplicates(lines, texts)
    out = {"exact_groups": len(found["exact"]), "near_pairs": len(found["near"])}
    out |= {"exact": found["exact"][:SHOWN], "near": found["near"][:SHOWN]}
    if eval_examples is not None:
        leaks = find_leaks(lines, texts, [e.line for e in eval_examples], [record_text(e) for e in eval_examples])
        out["leaks_into_eval"] = len(leaks)
        out["leaks"] = leaks[:SHOWN]
    return out


def pii_findings(examples: list[Example]) -> list[dict]:
    """[{line, field, kind, text}] for every personal-data match in any string field."""
    found = []
    for ex in examples:
        for name, value in string_fields(ex.source):
            for f in find_pii(value):
                found.append({"line": ex.line, "field": name, "kind": f.kind, "text": f.text})
    return found


def label_findings(examples: list[Example], features=None) -> dict:
    """Likely label errors (cleanlab), each with the label the out-of-fold model suggests."""
    from .label_errors import rank_label_issues

    ranked = rank_label_issues([e.text for e in examples], [str(e.label) for e in examples], features=features)
    out: dict = {"likely_label_errors": len(ranked["flagged"])}
    if "skipped" in ranked:
        out["label_errors_skipped"] = ranked["skipped"]
    out["label_errors"] = [
        {"line": examples[f["index"]].line, "label": f["label"], "suggested": f["suggested"], "quality": f["quality"]}
        for f in ranked["flagged"]
    ]
    return out


def language(text: str) -> str:
    cjk, latin = len(_CJK.findall(text)), len(_LATIN.findall(text))
    if not cjk and not latin:
        return "none"
    if cjk and latin and min(cjk, latin) / (cjk + latin) > 0.2:
        return "mixed"
    return "zh" if cjk > latin else "latin"


def generation_findings(
    examples: list[Example], tokenizer, template: str, max_length: int, loss_on: str, system_prompt, path
) -> dict:
    """Empty answers, answers truncation would cut, a prompt with conflicting answers, languages per role."""
    empty, cut, languages = [], [], {}
    answers: dict[str, dict[str, int]] = {}
    for ex in examples:
        if ex.messages is None:
            continue
        if any(m["role"] == "assistant" and not m.get("tool_calls") and not m["content"].strip() for m in ex.messages):
            empty.append(ex.line)
        for m in ex.messages:
            counts = languages.setdefault(m["role"], Counter())
            counts[language(m["content"])] += 1
        prompt = record_text(Example(ex.line, messages=ex.messages[:-1]))
        answers.setdefault(prompt, {}).setdefault(ex.messages[-1]["content"].strip(), ex.line)
        try:
            rendered = render_example(ex, tokenizer, template, loss_on, system_prompt, (path, ex.line))
        except Exception:  # already reported as a problem by encoding
            continue
        if len(rendered.labels) > max_length:
            kept = kept_positions(rendered.labels, max_length)
            supervised = sum(1 for lab in rendered.labels if lab != IGNORE_INDEX)
            if sum(1 for i in kept if rendered.labels[i] != IGNORE_INDEX) < supervised:
                cut.append(ex.line)
    conflicts = [sorted(by_answer.values()) for by_answer in answers.values() if len(by_answer) > 1]
    return {
        "empty_answers": len(empty),
        "empty_answer_lines": empty[:SHOWN],
        "answers_cut_at_max_length": len(cut),
        "answers_cut_lines": cut[:SHOWN],
        "conflicting_answers": len(conflicts),
        "conflicting_answer_lines": conflicts[:SHOWN],
        "languages": {role: dict(c.most_common()) for role, c in languages.items()},
    }


def system_prompt_findings(examples: list[Example], tokenizer, template: str, system_prompt) -> list[dict]:
    """Which system prompt each record gets: [{source, text, records, lines}] (source: record /
    data.system_prompt / template / none)."""
    default = template_default_system(tokenizer, template)
    groups: dict[tuple, list[int]] = {}
    for ex in examples:
        if ex.messages is not None:
            groups.setdefault(system_prompt_of(ex, system_prompt, default), []).append(ex.line)
    return [
        {"source": source, "text": text, "records": len(lines), "lines": lines[:SHOWN]}
        for (source, text), lines in sorted(groups.items(), key=lambda kv: -len(kv[1]))
    ]


def unknown_field_findings(examples: list[Example]) -> dict:
    return {
        name: {"records": len(lines), "lines": lines[:SHOWN]} for name, lines in unknown_field_lines(examples).items()
    }


def _short(value, width: int = 70) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def format_report(report: dict) -> str:
    """The check report as aligned text for a terminal (`--json` prints the dict itself)."""
    rows = [f"{report['file']}: {report['format']}, {report['valid']} of {report['records']} records valid"]

    def add(label, value):
        rows.append(f"  {label:30s} {value}")

    if "tokens" in report:
        t = report["tokens"]
        add("tokens", f"total {t['total']}, min {t['min']}, p50 {t['p50']}, p90 {t['p90']}, max {t['max']}")
    for key in ("truncated_at_max_length", "dropped_no_target"):
        if key in report:
            add(key.replace("_", " "), report[key])
    for problem in report.get("problems", []):
        add("problem", problem)
    for name, info in report.get("unknown_fields", {}).items():
        add("ignored field", f"'{name}' in {info['records']} records (lines {_short(info['lines'], 40)})")
    for group in report.get("system_prompts", []):
        add(f"system prompt ({group['source']})", f"{group['records']} records: {_short(group['text'] or '-', 60)}")
    dup = report.get("duplicates")
    if dup:
        add("exact duplicate groups", f"{dup['exact_groups']} {_short(dup['exact'], 50) if dup['exact'] else ''}")
        add("near duplicate pairs", f"{dup['near_pairs']} {_short(dup['near'], 50) if dup['near'] else ''}")
        if "leaks_into_eval" in dup:
            pairs = [(x["eval_line"], x["train_line"]) for x in dup["leaks"]]
            add("eval records in train", f"{dup['leaks_into_eval']} (eval line, train line): {_short(pairs, 50)}")
    pii = report.get("pii")
    if pii is not None:
        kinds = Counter(f["kind"] for f in report["pii_findings"])
        add("personal data", f"{pii} matches" + (f": {dict(kinds)}" if kinds else ""))
        for f in report["pii_findings"][:10]:
            add("", f"line {f['line']} {f['field']}: {f['kind']} {f['text']}")
    if "labels" in report and isinstance(report["labels"], dict):
        add("labels", ", ".join(f"{k} {v}" for k, v in report["labels"].items()))
        add("imbalance ratio", report.get("imbalance_ratio"))
        if "likely_label_errors" in report:
            add("likely label errors", report["likely_label_errors"])
            for e in report["label_errors"][:10]:
                add("", f"line {e['line']}: {e['label']} -> {e['suggested']} (quality {e['quality']})")
    gen = report.get("generation")
    if gen:
        add("empty answers", f"{gen['empty_answers']} {gen['empty_answer_lines'] or ''}")
        add("answers cut at max_length", f"{gen['answers_cut_at_max_length']} {gen['answers_cut_lines'] or ''}")
        add("prompts, conflicting answers", f"{gen['conflicting_answers']} {gen['conflicting_answer_lines'] or ''}")
        for role, langs in gen["languages"].items():
            add(f"languages ({role})", ", ".join(f"{k} {v}" for k, v in langs.items()))
    return "\n".join(rows)
