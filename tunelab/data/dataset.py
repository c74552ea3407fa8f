"""From the config's data section to encoded train / validation examples."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..errors import ConfigError, Row
from .classification import encode_classification, label_names
from .encode import EncodeStats, encode_examples, resolve_chat_template
from .formats import PREFERENCE_FORMATS, load_examples, unknown_field_lines
from .preference import encode_pairs


@dataclass
class PreparedData:
    train: list[dict]
    val: list[dict]
    format: str
    template: str
    train_stats: EncodeStats
    val_stats: EncodeStats
    skipped: list[str] = field(default_factory=list)
    val_examples: list = field(default_factory=list)  # the raw validation records (for generation eval)
    labels: list[str] | None = None  # classification: the label names in class-id order (the run's label map)
    unknown_fields: dict = field(default_factory=dict)  # field -> lines: fields no format reads (ignored)
    balance_note: str | None = None

    def notes(self) -> list[str]:
        """Human-readable warnings about what happened to the data."""
        notes = []
        for name, s in (("train", self.train_stats), ("eval", self.val_stats)):
            if s.truncated:
                notes.append(
                    f"{s.truncated} {name} examples were longer than data.max_length: their prompts lost "
                    "their middle so the answer fits (answers longer than half of it were cut)"
                )
            if s.dropped_no_target:
                notes.append(f"{s.dropped_no_target} {name} examples had no completion tokens left and were dropped")
        if self.unknown_fields:
            listed = ", ".join(f"'{k}' ({_lines(v)})" for k, v in self.unknown_fields.items())
            notes.append(f"warning: fields ignored (no data format reads them): {listed}")
        if self.balance_note:
            notes.append(self.balance_note)
        if self.skipped:
            notes.append(f"{len(self.skipped)} invalid records skipped (data.skip_invalid); first: {self.skipped[0]}")
        return notes


def _lines(lines: list[int]) -> str:
    shown = ", ".join(map(str, lines[:5]))
    unit = "row" if isinstance(lines[0], Row) else "line"
    return (
        f"{unit} {shown}"
        if len(lines) == 1
        else f"{len(lines)} records, {unit}s {shown}{', ...' if len(lines) > 5 else ''}"
    )


def balance_classes(examples: list, mode: str, seed: int) -> list:
    """data.balance: every class repeated (oversample) or cut (undersample, seeded) to the same count."""
    by_label: dict[str, list] = {}
    for ex in examples:
        by_label.setdefault(str(ex.label), []).append(ex)
    target = (max if mode == "oversample" else min)(len(v) for v in by_label.values())
    rng = random.Random(seed)
    out = []
    for group in by_label.values():
        if len(group) >= target:
            out += rng.sample(group, target) if len(group) > target else group
        else:  # whole copies, then a seeded sample for the remainder
            out += group * (target // len(group)) + rng.sample(group, target % len(group))
    rng.shuffle(out)
    return out


def class_weights(encoded: list[dict], n_classes: int) -> list[float]:
    """Balanced weights n / (n_classes * n_c) per class id (sklearn's 'balanced'); 0 for an absent class."""
    counts = [0] * n_classes
    for e in encoded:
        counts[e["label"]] += 1
    return [len(encoded) / (n_classes * c) if c else 0.0 for c in counts]


def split_validation(examples: list, fraction: float, seed: int, strata: list | None = None) -> tuple[list, list]:
    """Seeded random split; at least one validation example when fraction > 0 and there are 2+ examples.
    With `strata` (an example's class): where that draw takes a class whole into validation, which left training
    without it (an error on a small, uneven set, that named a line of the training file), each class gives its
    share instead and keeps at least one example in training (none held out when every class has one)."""
    if fraction <= 0 or len(examples) < 2:
        return list(examples), []
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    n_val = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    val_idx = set(order[:n_val])
    if strata is not None and set(strata) != {strata[i] for i in order[n_val:]}:
        groups: dict = {}
        for i in order:
            groups.setdefault(strata[i], []).append(i)
        val_idx = {
            i for members in groups.values() for i in members[: min(round(len(members) * fraction), len(members) - 1)]
        }
        largest = max(groups.values(), key=len)
        if not val_idx and len(largest) > 1:  # too few of every class for its share: one from the largest
            val_idx.add(largest[0])
    return [e for i, e in enumerate(examples) if i not in val_idx], [e for i, e in enumerate(examples) if i in val_idx]


def _check_fits_task(path, fmt: str, task: str) -> None:
    if (fmt in PREFERENCE_FORMATS) != (task == "preference"):
        raise ConfigError(
            f"{path}: {fmt} data does not fit task: {task} "
            + (
                "(chosen/rejected pairs need task: preference)"
                if fmt in PREFERENCE_FORMATS
                else "(task: preference needs prompt/chosen/rejected or conversations/chosen/rejected records)"
            )
        )
    if (fmt == "classification") != (task == "classification"):
        raise ConfigError(
            f"{path}: {fmt} data does not fit task: {task} "
            + (
                "(text/label data needs task: classification)"
                if fmt == "classification"
                else "(classification needs text/label records)"
            )
        )


def prepare_data(cfg, tokenizer) -> PreparedData:
    """Load, validate, split and encode the data named by the config (nothing is written)."""
    d = cfg.data
    if not d.train:
        raise ConfigError(
            "data.train is not set: give a JSONL/JSON/CSV/Parquet file or a saved dataset folder (data.train=path/to/file.jsonl)"
        )
    train_examples, fmt, skipped = load_examples(d.train, d.format, d.skip_invalid)
    _check_fits_task(d.train, fmt, cfg.task)
    unknown = unknown_field_lines(train_examples)
    if d.eval:
        # its own format (auto-detected unless data.format names one): ShareGPT training, OpenAI messages held out
        val_examples, val_fmt, val_skipped = load_examples(d.eval, d.format, d.skip_invalid)
        _check_fits_task(d.eval, val_fmt, cfg.task)
        skipped += val_skipped
        for name, lines in unknown_field_lines(val_examples).items():
            unknown.setdefault(f"{name} in data.eval", lines)
    else:
        strata = [str(e.label) for e in train_examples] if cfg.task == "classification" else None
        train_examples, val_examples = split_validation(train_examples, d.val_fraction, cfg.seed, strata)
    if cfg.distill is not None and cfg.distill.prompts:  # the teacher's answers: training only
        from ..distill.answers import answered_examples

        train_examples = train_examples + answered_examples(cfg)
    if cfg.task == "classification":
        labels = d.labels or label_names(train_examples)  # saved with the resolved config: the run's label map
        if len(labels) < 2:
            raise ConfigError(f"{d.train}: classification needs at least 2 labels, found {labels}")
        balance_note = None
        if d.balance != "none":
            before = len(train_examples)
            train_examples = balance_classes(train_examples, d.balance, cfg.seed)
            balance_note = f"data.balance: {d.balance}: {before} -> {len(train_examples)} training examples"
        train, train_stats = encode_classification(train_examples, tokenizer, d.max_length, labels, d.train)
        val, val_stats = encode_classification(val_examples, tokenizer, d.max_length, labels, d.eval or d.train)
        if cfg.train.class_weights == "auto":
            weights = class_weights(train, len(labels))
            for e in train:
                e["weight"] = weights[e["label"]]
            balance_note = (
                (balance_note + "; " if balance_note else "")
                + "class weights: "
                + ", ".join(f"{name} {w:.2f}" for name, w in zip(labels, weights))
            )
        return PreparedData(
            train, val, fmt, "", train_stats, val_stats, skipped, val_examples, labels, unknown, balance_note
        )
    for key, value in (("data.balance", d.balance), ("train.class_weights", cfg.train.class_weights)):
        if value != "none":
            raise ConfigError(f"{key}: {value} is for task: classification (this run is {cfg.task})")
    template = resolve_chat_template(tokenizer, d.chat_template)
    if cfg.task == "preference":
        train, train_stats = encode_pairs(train_examples, tokenizer, template, d.max_length, d.system_prompt, d.train)
        val, val_stats = encode_pairs(
            val_examples, tokenizer, template, d.max_length, d.system_prompt, d.eval or d.train
        )
    else:
        train, train_stats = encode_examples(
            train_examples, tokenizer, template, d.max_length, d.loss_on, d.system_prompt, d.train
        )
        val, val_stats = encode_examples(
            val_examples, tokenizer, template, d.max_length, d.loss_on, d.system_prompt, d.eval or d.train
        )
    if not train:
        raise ConfigError(
            f"{d.train}: no training examples left after encoding (all truncated away?); raise data.max_length"
        )
    return PreparedData(train, val, fmt, template, train_stats, val_stats, skipped, val_examples, None, unknown)
