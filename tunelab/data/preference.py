"""Preference data: records of a prompt with a chosen and a rejected answer -> encoded pairs.

Layouts (detected like the other formats, tunelab.data.formats):
  preference           {"prompt", "chosen", "rejected"} (+ optional "system"); the prompt is a string or a
                       message list (role/content), each answer a string or a message list
  sharegpt_preference  LLaMA-Factory's: {"conversations": [{from, value}, ...], "chosen": {from, value},
                       "rejected": {from, value}} (+ optional "system")

A pair encodes as two sequences, prompt + chosen and prompt + rejected, rendered with the chat template;
labels are the answer's tokens only (the prompt, even its assistant turns, is context).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import DataError
from .collate import pack_rows, packed_batch, pad_batch, varlen_batch
from .encode import IGNORE_INDEX, EncodeStats, encode_example
from .formats import _SHAREGPT_ROLES, ROLES, Example, Record, _string, _turns

ANSWERS = ("chosen", "rejected")


@dataclass
class PreferencePair:
    """One normalised preference record: the shared prompt turns and the two answers' turns."""

    line: int
    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    source: dict = field(default_factory=dict, repr=False)
    # the generation eval (tunelab eval) reads `messages`: the prompt and the preferred answer
    messages: list[dict] = field(default_factory=list, repr=False)
    text = None
    label = None


def _answer(record: Record, key: str, path, roles: tuple[str, str], role_map: dict) -> list[dict]:
    """An answer: a string (one assistant turn), one turn object, or a list of turns with an assistant turn."""
    value = record.data.get(key)
    if isinstance(value, dict):
        record = Record(record.line, {key: [value]})
        value = [value]
    if isinstance(value, list):
        return _turns(record, key, path, roles[0], roles[1], role_map)
    return [{"role": "assistant", "content": _string(record, key, path)}]


def to_pair(record: Record, fmt: str, path) -> PreferencePair:
    """Normalise one preference record; raises DataError naming the line and field."""
    if fmt == "preference":
        roles, role_map = ("role", "content"), {r: r for r in ROLES}
        if isinstance(record.data.get("prompt"), list):
            prompt = _turns(record, "prompt", path, "role", "content", role_map, need_assistant=False)
        else:
            prompt = [{"role": "user", "content": _string(record, "prompt", path)}]
    else:
        roles, role_map = ("from", "value"), _SHAREGPT_ROLES
        prompt = _turns(record, "conversations", path, "from", "value", role_map, need_assistant=False)
    system = _string(record, "system", path, required=False)
    if system and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}] + prompt
    chosen, rejected = (_answer(record, key, path, roles, role_map) for key in ANSWERS)
    if chosen == rejected:
        raise DataError(path, record.line, "is the same answer as chosen: a pair must differ", field="rejected")
    return PreferencePair(record.line, prompt, chosen, rejected, record.data, prompt + chosen)


def encode_pairs(
    pairs: list[PreferencePair],
    tokenizer,
    template: str,
    max_length: int,
    system_prompt: str | None = None,
    path="<data>",
) -> tuple[list[dict], EncodeStats]:
    """Encode pairs as {"chosen": {input_ids, labels}, "rejected": {...}, "line"}; a pair either of whose
    answers has no tokens left after truncation is dropped (and counted). Lengths: the pair's two sequences."""
    stats = EncodeStats()
    out = []
    for pair in pairs:
        encoded, truncated_any = {}, False
        for key in ANSWERS:
            example = Example(pair.line, messages=pair.prompt + getattr(pair, key))
            enc, truncated = encode_example(
                example,
                tokenizer,
                template,
                max_length,
                "completion",
                system_prompt,
                (path, pair.line),
                len(pair.prompt),
            )
            truncated_any |= truncated
            encoded[key] = enc
        stats.truncated += truncated_any
        if any(all(lab == IGNORE_INDEX for lab in encoded[k]["labels"][1:]) for k in ANSWERS):
            stats.dropped_no_target += 1
            continue
        encoded["line"] = pair.line
        out.append(encoded)
        stats.lengths.append(pair_length(encoded))
    stats.examples = len(out)
    return out, stats


def pair_length(pair: dict) -> int:
    """Tokens of both sequences of an encoded pair (what one pair costs a step)."""
    return sum(len(pair[k]["input_ids"]) for k in ANSWERS)


def pair_batches(
    pairs: list[dict], batch_size: int, pad_id: int, packing: bool = False, capacity: int = 512, layout=None
) -> list[dict]:
    """Micro-batches of `batch_size` pairs (packed: rows), each holding its pairs' sequences in the order
    chosen, rejected, chosen, ... with `seq_ids` (every token's sequence, -1 for padding), `n_seqs` and, where
    the pairs carry them, precomputed `ref_logps`. Packed, a pair's two sequences share a row (rows of up to
    2 x capacity tokens: a pair is two examples of up to `capacity`)."""
    if packing:
        rows = pack_rows([pair_length(p) for p in pairs], 2 * capacity)
        groups = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    else:
        order = sorted(range(len(pairs)), key=lambda i: -pair_length(pairs[i]))
        groups = [[[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
    batches = []
    for group in groups:
        members = [i for row in group for i in row]
        seqs = [pairs[i][key] for i in members for key in ANSWERS]
        lengths = [len(s["input_ids"]) for s in seqs]
        if not packing:
            batch = pad_batch(seqs, pad_id)
            seq_ids = torch.arange(len(seqs))[:, None].expand_as(batch["labels"]).clone()
        elif layout in ("varlen", "flash"):
            batch = varlen_batch(seqs)
            seq_ids = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(lengths))[None]
        else:
            seq_rows, start = [], 0
            for row in group:
                seq_rows.append(list(range(start, start + 2 * len(row))))
                start += 2 * len(row)
            batch = packed_batch(seqs, seq_rows, pad_id, layout)
            seq_ids = torch.full_like(batch["labels"], -1)
            for r, row in enumerate(seq_rows):
                at = 0
                for s in row:
                    seq_ids[r, at : at + lengths[s]] = s
                    at += lengths[s]
        batch["seq_ids"] = seq_ids
        batch["n_seqs"] = len(seqs)
        if "ref_logps" in pairs[members[0]]:
            batch["ref_logps"] = torch.tensor([v for i in members for v in pairs[i]["ref_logps"]])
        batches.append(batch)
    return batches
