"""Text classification data: the label map and encoding of text/label records."""

from __future__ import annotations

from ..errors import DataError
from .encode import EncodeStats
from .formats import Example


def label_names(examples: list[Example]) -> list[str]:
    """Label names in class-id order: integers numerically, strings alphabetically."""
    names = {str(e.label) for e in examples}
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def encode_classification(
    examples: list[Example], tokenizer, max_length: int, labels: list[str], path
) -> tuple[list[dict], EncodeStats]:
    """{input_ids, label} per example; a label missing from `labels` is an error naming its line."""
    index = {name: i for i, name in enumerate(labels)}
    stats = EncodeStats()
    out = []
    for ex in examples:
        label = str(ex.label)
        if label not in index:
            raise DataError(
                path, ex.line, f"label {label!r} does not occur in the training data (labels: {labels})", field="label"
            )
        ids = tokenizer(ex.text, truncation=False, add_special_tokens=True)["input_ids"]
        if len(ids) > max_length:
            stats.truncated += 1
            ids = ids[: max_length - 1] + ids[-1:]  # keep the closing special token ([SEP] / EOS)
        out.append({"input_ids": ids, "label": index[label], "line": ex.line})
        stats.lengths.append(len(ids))
    stats.examples = len(out)
    return out, stats
