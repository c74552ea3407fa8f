"""A seeded date-normalisation task: free-form dates (English and Chinese) -> ISO 8601.

The base model answers verbosely or wrongly; a short LoRA run learns the mapping and to stop.
"""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

from ..io import atomic_write_jsonl

INSTRUCTION = "Convert the date to ISO 8601 format (YYYY-MM-DD). Reply with the date only."
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# every style is unambiguous (no 03/04/2021)
STYLES = [
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"the {_ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",
    lambda d: f"{MONTHS[d.month - 1][:3]} {_ordinal(d.day)} {d.year}",
    lambda d: f"{WEEKDAYS[d.weekday()]}, {d.day} {MONTHS[d.month - 1][:3]} {d.year}",
    lambda d: f"{d.year}年{d.month}月{d.day}日",
    lambda d: f"{d.day:02d}.{d.month:02d}.{d.year} (day.month.year)",
    lambda d: f"{d.year}/{d.month}/{d.day}",
]


def random_date(rng: random.Random) -> dt.date:
    start = dt.date(1950, 1, 1).toordinal()
    return dt.date.fromordinal(rng.randint(start, dt.date(2049, 12, 31).toordinal()))


def make_examples(n: int, seed: int, exclude: set | None = None) -> list[dict]:
    """n examples {instruction, input, output}; dates in `exclude` are never used."""
    rng = random.Random(seed)
    exclude = exclude or set()
    rows = []
    while len(rows) < n:
        d = random_date(rng)
        if d in exclude:
            continue
        style = STYLES[len(rows) % len(STYLES)]
        rows.append({"instruction": INSTRUCTION, "input": style(d), "output": d.isoformat()})
    return rows


def write_dataset(folder: Path, n_train: int = 800, n_test: int = 64, seed: int = 1234) -> tuple[Path, Path]:
    """Write dates-train.jsonl / dates-test.jsonl (test dates never appear in training)."""
    folder.mkdir(parents=True, exist_ok=True)
    test = make_examples(n_test, seed + 1)
    test_dates = {dt.date.fromisoformat(r["output"]) for r in test}
    train = make_examples(n_train, seed, exclude=test_dates)
    atomic_write_jsonl(folder / "dates-train.jsonl", train)
    atomic_write_jsonl(folder / "dates-test.jsonl", test)
    return folder / "dates-train.jsonl", folder / "dates-test.jsonl"
