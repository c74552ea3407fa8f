"""From the config's data section to encoded train / validation examples."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..errors import ConfigError
from .classification import encode_classification, label_names
from .encode import EncodeStats, encode_examples, resolve_chat_template
from .formats import PREFERENCE_FORMATS, load_examples
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
        if self.skipped:
            notes.append(f"{len(self.skipped)} invalid records skipped (data.skip_invalid); first: {self.skipped[0]}")
        return notes


def split_validation(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Seeded random split; at least one validation example when fraction > 0 and there are 2+ examples."""
    if fraction <= 0 or len(examples) < 2:
        return list(examples), []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    val_idx = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val_idx], [e for i, e in enumerate(examples) if i in val_idx]


def prepare_data(cfg, tokenizer) -> PreparedData:
    """Load, validate, split and encode the data named by the config (nothing is written)."""
    d = cfg.data
    if not d.train:
        raise ConfigError("data.train is not set: give a JSONL/JSON/CSV file (data.train=path/to/file.jsonl)")
    train_examples, fmt, skipped = load_examples(d.train, d.format, d.skip_invalid)
    if (fmt in PREFERENCE_FORMATS) != (cfg.task == "preference"):
        raise ConfigError(
            f"{d.train}: {fmt} data does not fit task: {cfg.task} "
            + (
                "(chosen/rejected pairs need task: preference)"
                if fmt in PREFERENCE_FORMATS
                else "(task: preference needs prompt/chosen/rejected or conversations/chosen/rejected records)"
            )
        )
    if (fmt == "classification") != (cfg.task == "classification"):
        raise ConfigError(
            f"{d.train}: {fmt} data does not fit task: {cfg.task} "
            + (
                "(text/label data needs task: classification)"
                if fmt == "classification"
                else "(classification needs text/label records)"
            )
        )
    if d.eval:
        val_examples, _, val_skipped = load_examples(d.eval, fmt, d.skip_invalid)
        skipped += val_skipped
    else:
        train_examples, val_examples = split_validation(train_examples, d.val_fraction, cfg.seed)
    if cfg.task == "classification":
        labels = d.labels or label_names(train_examples)  # saved with the resolved config: the run's label map
        if len(labels) < 2:
            raise ConfigError(f"{d.train}: classification needs at least 2 labels, found {labels}")
        train, train_stats = encode_classification(train_examples, tokenizer, d.max_length, labels, d.train)
        val, val_stats = encode_classification(val_examples, tokenizer, d.max_length, labels, d.eval or d.train)
        return PreparedData(train, val, fmt, "", train_stats, val_stats, skipped, val_examples, labels)
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
    return PreparedData(train, val, fmt, template, train_stats, val_stats, skipped, val_examples)
