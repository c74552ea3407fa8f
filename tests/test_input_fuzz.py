"""Property-based fuzzing of four input surfaces beyond the data loaders: config files, command-line
overrides, adapter folders and run folders.

The contract (tunelab.errors): bad input raises UserError (or its ConfigError / DataError) with a
message. Any other exception (TypeError, KeyError, ValueError, yaml or json errors, pydantic's
ValidationError, RecursionError, ...) is a crash, so a failure here.

Properties:
  1. configs: load_config(FILE) returns a Config or raises a ConfigError naming the file. Inputs:
     arbitrary text and bytes (BOM, invalid UTF-8), YAML token soups, one hostile value placed at a
     real key (nan/inf, huge/negative numbers, bad dates, tags, anchors/aliases, deep nesting, NUL),
     and structured near-misses (real sections, wrong-typed values, misspelled and duplicate keys,
     tabs, anchors). A Config that loads must load again, unchanged, from its own to_yaml() (the
     config.yaml a run saves and `tunelab.load` reads).
  2. overrides: load_config(None, ["dotted.key=value", ...]) returns a Config or raises ConfigError,
     for real, misspelled, empty, dotted-garbage and unicode keys, hostile YAML values and items
     without '='.
  3. adapter folders: trust.check_adapter_folder returns None or raises UserError, for any mix of
     adapter_config.json / adapter_model.safetensors / pickle / other files, and never accepts a
     folder without weights, or with pickle weights only and no allow_pickle;
     methods.adapter._read_artifact_config returns a bottleneck-adapter dict or raises UserError;
     tunelab.load on a finished tiny LoRA run whose adapter/adapter_config.json is mutated (keys
     dropped, values of other types, the whole file replaced) returns (model, tokenizer) or raises
     UserError.
  4. run folders: runs.list_runs never raises and gives each run folder one row with a known status
     (running while locked, finished for a readable summary, broken with nothing to go on);
     checkpoint_dirs.latest_unfinished_run returns an unfinished checkpointed run or raises UserError
     exactly when there is none; tunelab.load on a run whose config.yaml is invalid raises UserError
     before any tokenizer or model loads; io.read_metrics on any bytes returns dicts with an int step
     and keeps every whole record, in order.

Every case runs with the recursion headroom a CLI call has (hypothesis raises the limit while a test
runs, which would hide RecursionErrors).

Budget (cases = calls of a property, counted per surface in `cases`):
  configs   450 text + 460 bytes + 450 hostile values + 600 structured + ~27 deep  ~ 1990
  overrides 850 structured + 1150 arbitrary strings + ~13 deep                    ~ 2010
  adapters  450 folders + 200 bottleneck configs + 60 full loads                  =  710
  runs      200 list_runs + 120 latest_unfinished_run + 100 load + 180 metrics    =  600
  (the 40 deep-nesting cases go to configs or overrides at random) total ~ 5310 (>= MIN_CASES = 5000);
  `test_generated_case_count` prints the counts and checks the total when the whole module ran and no
  fuzz test stopped at a failing case. About 40 s on two cores when nothing fails (a ~7 s tiny training
  run and ~4 s of imports included); a failing test adds its shrinking. Hypothesis' own generation and
  pyyaml's pure-Python loader take most of the time, so tokens come mostly from fixed pools (one draw
  each), deep nesting and full re-loads (the to_yaml() check: one valid config in 20) have small
  shares, and case folders go to tmpfs where there is one.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
import traceback
import typing
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from safetensors.torch import save as safetensors_bytes

import tunelab
import tunelab.loading
from tunelab.config import Config, load_config
from tunelab.errors import ConfigError, UserError
from tunelab.io import atomic_write_text, read_metrics
from tunelab.methods import METHODS
from tunelab.methods.adapter import _read_artifact_config
from tunelab.runs import list_runs
from tunelab.training.checkpoint_dirs import latest_unfinished_run
from tunelab.training.lock import RunLock
from tunelab.trust import PICKLE_SUFFIXES, check_adapter_folder

FUZZ = settings(
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
    report_multiple_bugs=False,  # one crash per test, shrunk: a red run stays short
)
MIN_CASES = 5000
STATUSES = {"finished", "running", "failed", "interrupted", "broken"}

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

cases = {"configs": 0, "overrides": 0, "adapters": 0, "runs": 0}
tests_run: set[str] = set()
tests_failed: set[str] = set()


# every case writes its files into a fresh folder: on tmpfs where there is one (on a disk mounted with
# `discard`, creating and removing a folder costs ~1.5 ms, a sixth of the whole budget)
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def scratch() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(dir=SCRATCH, prefix="tunelab-fuzz-")


CLI_HEADROOM = 950  # frames a CLI call has left under Python's default recursion limit (1000)


def _frames_left() -> int:
    """Nested Python calls that still fit under the recursion limit, measured: the interpreter also
    counts C calls that re-enter Python, which no frame walk sees."""
    count = 0

    def down():
        nonlocal count
        count += 1
        down()

    try:
        down()
    except RecursionError:
        pass
    return count


@contextmanager
def cli_recursion_limit():
    """Hypothesis raises the recursion limit while a test runs (by ~2000 frames), which would hide the
    RecursionError that deep nesting raises from the CLI: give the case a CLI's headroom instead,
    exactly (a shrunk case sits at the limit, so a frame more or less would make it flaky)."""
    frames, frame = 0, sys._getframe()
    while frame is not None:
        frames, frame = frames + 1, frame.f_back
    before = sys.getrecursionlimit()
    for above in (100, 400, 2000):  # a limit just above the real depth, so that measuring is quick
        try:
            sys.setrecursionlimit(frames + above)
            break
        except RecursionError:  # "the limit is too low" for the real depth
            continue
    depth = frames + above - _frames_left()
    sys.setrecursionlimit(depth + CLI_HEADROOM)
    try:
        yield
    finally:
        sys.setrecursionlimit(before)


def overflow_message(exc: RecursionError) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/tunelab/" in f.filename]
    where = f", last product frame {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    return f"RecursionError (a crash, not a UserError){where}: {exc}"


def fuzz_case(surface: str | None, name: str):
    """Decorate a fuzz test (under @given): each call is one case of `surface` (None: the test counts
    it), run with a CLI's recursion headroom; a RecursionError fails the case as an AssertionError."""

    def decorate(test):
        @functools.wraps(test)
        def case(*args, **kwargs):
            if surface is not None:
                cases[surface] += 1
            tests_run.add(name)
            overflow = None
            try:
                with cli_recursion_limit():
                    test(*args, **kwargs)
            except RecursionError as exc:
                overflow = overflow_message(exc)
            except Exception:  # not hypothesis' own control flow (StopTest is a BaseException)
                tests_failed.add(name)
                raise
            if overflow is not None:
                # raised here, after the except clause, so without the RecursionError as its context:
                # the line where the stack runs out can move by a frame between runs, which hypothesis
                # would report as a flaky test
                tests_failed.add(name)
                raise AssertionError(overflow)

        return case

    return decorate


# --- the config schema, read from the product's pydantic models ---------------------------------


def _section_model(field) -> type | None:
    """The section class of a field (`X`, or a method section's `X | None`)."""
    for ann in typing.get_args(field.annotation) or (field.annotation,):
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            return ann
    return None


SECTIONS = {k: m.model_fields for k, f in Config.model_fields.items() if (m := _section_model(f)) is not None}
TOP_SCALARS = [k for k in Config.model_fields if k not in SECTIONS]
TOP_KEYS = list(Config.model_fields)
DOTTED = TOP_SCALARS + [f"{s}.{k}" for s, fields in SECTIONS.items() for k in fields]
FIELD_NAMES = sorted({k for fields in SECTIONS.values() for k in fields})
ALIASES = [
    "learning_rate",
    "num_epochs",
    "rank",
    "lora_r",
    "lora_alpha",
    "output_dir",
    "max_seq_length",
    "model_name_or_path",
    "per_device_train_batch_size",
    "warmup",
    "gradient_accumulation_steps",
]

# a config that loads (and would train tiny-llama on a toy file): the base for near-misses
VALID = {
    "model": "tiny-llama",
    "method": "lora",
    "out_dir": "runs",
    "run_name": "tiny",
    "seed": 0,
    "data": {"train": "toy.jsonl", "val_fraction": 0.0, "max_length": 64},
    "train": {"max_steps": 1, "batch_size": 4, "precision": "fp32", "lr": 0.001},
    "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
}


# --- YAML tokens ---------------------------------------------------------------------------------

# YAML values that break naive handling: special floats, huge ints, bad dates, tags (unknown, unsafe,
# empty), anchors/aliases (self-referencing too), unbalanced flow, NUL / surrogate escapes, indicators
HOSTILE = [
    ".nan",
    ".NaN",
    ".inf",
    "-.inf",
    "+.inf",
    "1e400",
    "-1e400",
    "1e-400",
    "-1",
    "0",
    "-0",
    "0.0",
    "1.5",
    "-7",
    "99999999999999999999999",
    "-99999999999999999999999",
    "0x1F",
    "0o17",
    "0b101",
    "1_000",
    "1:30",
    "0777",
    "+12",
    "~",
    "null",
    "Null",
    "NULL",
    "true",
    "True",
    "yes",
    "no",
    "on",
    "off",
    "y",
    "''",
    '""',
    "' '",
    '"\\0"',
    '"a\\0b"',
    '"\\ud800"',
    '"\\udcff"',
    '"\\x00"',
    '"\\t"',
    '"\\u2028"',
    '"\\e"',
    "2024-01-01",
    "2024-13-45",
    "2024-02-30",
    "0000-00-00",
    "2024-01-01 25:61:00",
    "2001-12-14t21:59:43.10-05:00",
    "2024-1-1T99:99:99",
    "!!int x",
    "!!int 0x",
    "!!int",
    "!!float x",
    "!!float",
    "!!bool maybe",
    "!!null x",
    "!!timestamp x",
    "!!timestamp 2024-13-45",
    "!!binary '%%%'",
    "!!binary aGk=",
    "!!str 3",
    "!!set {a, b}",
    "!!set [a]",
    "!!omap [a]",
    "!!omap [{a: 1}, {a: 2}]",
    "!!pairs [1]",
    "!!map [1]",
    "!!seq {a: 1}",
    "!!python/object:os.system",
    "!!python/name:os.system",
    "!!python/object/apply:os.system [ls]",
    "!!python/tuple [1]",
    "!<tag:yaml.org,2002:int> x",
    "!local x",
    "!!merge x",
    "!!value x",
    "&a [*a]",
    "&a {x: *a}",
    "&a {a: *a, b: *a}",
    "*undefined",
    "&a 1",
    "[1, 2",
    "{a: 1, a: 2}",
    "{a: 1",
    "{train: 1, train: 2}",
    "[",
    "]",
    "{",
    "}",
    ":",
    "-",
    "- a",
    "? a",
    "|",
    ">",
    "|-\n  x\n",
    ">+\n  y\n",
    "@x",
    "`x`",
    "%x",
    "#",
    "a: b",
    "a: b: c",
    "[a, [b, [c]]]",
    "{a: [1, {b: 2}]}",
    "[[1]]",
    "[{}]",
    "{}",
    "[]",
    "'unterminated",
    '"unterminated',
    "x\ty",
    "\t1",
    "[1,,2]",
    "{,}",
    "[1]]",
    "!",
    "&",
    "*",
    "? [1]: 2",
    "{? [1]: 2}",
    "{[1]: 2}",
    "{{a: 1}: 2}",
    "<<",
    "{<<: {a: 1}}",
    "{<<: [1]}",
    "'a''b'",
    '"\\""',
    "你好",
    "😀",
    "\ufeff",
    "\u0085",
    "a\rb",
    "q_proj",
    "all-linear",
    "lora",
    "auto",
    "cosine",
    "fp32",
]
# Long and deep tokens. pyyaml composes nested nodes recursively (past ~450 levels: RecursionError),
# and scans nesting in quadratic time (a 500-deep flow collection: ~0.1 s), so DEEP tokens have a test
# of their own with a small budget; elsewhere nesting stays shallow.
LONG = st.one_of(
    st.integers(1, 30).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 30).map(lambda n: "{a: " * n + "1" + "}" * n),
    st.integers(1, 60).map(lambda n: "- " * n + "x"),
    st.integers(4290, 4400).map(lambda n: "1" * n),  # around int()'s 4300-digit limit
    st.integers(4290, 4400).map(lambda n: "-" + "9" * n),
    st.integers(200, 1200).map(lambda n: "x" * n),  # run_name's limit is 200 bytes
    st.integers(200, 400).map(lambda n: '"' + "y" * n + '"'),
    # aliases fanning out (3**n leaves in the last list)
    st.integers(2, 7).map(
        lambda n: "[&l0 [1, 2, 3], " + ", ".join(f"&l{i} [*l{i - 1}, *l{i - 1}, *l{i - 1}]" for i in range(1, n)) + "]"
    ),
)
DEEP = st.one_of(
    st.integers(300, 700).map(lambda n: "- " * n + "x"),
    st.integers(300, 600).map(lambda n: "{a: " * n + "1" + "}" * n),
    st.integers(300, 550).map(lambda n: "[" * n + "]" * n),
    st.integers(300, 550).map(lambda n: "[" * n),
    st.integers(300, 550).map(lambda n: "[&a " * n + "1" + "]" * n),
)
odd_text = st.text(st.characters(codec="utf-8"), max_size=25)
py_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    odd_text,
    st.dates(),
    st.sampled_from(
        [
            "auto",
            "lora",
            "cosine",
            "fp32",
            "houlsby",
            "relu",
            "nf4",
            "default",
            "tiny-llama",
            "all-linear",
            "q_proj",
            "eval_loss",
            "completion",
            "",
            " ",
            ".",
        ]
    ),
)
py_values = st.recursive(
    py_scalars,
    lambda c: (
        st.lists(c, max_size=4) | st.dictionaries(odd_text | st.sampled_from(FIELD_NAMES + TOP_KEYS), c, max_size=4)
    ),
    max_leaves=8,
)


def weighted(*choices):
    """one_of with weights: (weight, strategy), ... (one_of itself drops repeated branches)."""
    return st.sampled_from([s for weight, s in choices for _ in range(weight)]).flatmap(lambda s: s)


DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's: generating is then not the slow part


def flow(value) -> str:
    """One value as a single-line YAML flow token."""
    text = yaml.dump(value, Dumper=DUMPER, default_flow_style=True, allow_unicode=True, width=10**9)
    return text.removesuffix("\n...\n").strip()


def random_value(rng: random.Random, depth: int = 0):
    """A random YAML-representable value (for the token pool: one draw instead of dozens)."""
    kind = rng.randrange(12 if depth < 2 else 9)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 1, 2, 7, 8, 64, 512, -(2**31), 2**63, -(2**64), 10**30, rng.randrange(-999, 999)])
    if kind == 2:
        return rng.choice(
            [
                0.0,
                -0.0,
                0.5,
                1.0,
                1e-9,
                -0.25,
                0.999999,
                1.0000001,
                1e308,
                float("nan"),
                float("inf"),
                -float("inf"),
                rng.uniform(-2, 2),
            ]
        )
    if kind in (3, 4, 5):
        alphabet = "abcxyz_-./: 0123456789'\"#&*!|>%@`{}[],\t你好😀\u2028\x85é"
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
    if kind == 6:
        return rng.choice(
            FIELD_NAMES
            + TOP_KEYS
            + [
                "auto",
                "lora",
                "cosine",
                "fp32",
                "houlsby",
                "relu",
                "nf4",
                "default",
                "tiny-llama",
                "all-linear",
                "q_proj",
                "eval_loss",
                "",
                " ",
                ".",
            ]
        )
    if kind == 7:
        return datetime.date(rng.randrange(1, 9999), rng.randrange(1, 13), rng.randrange(1, 29))
    if kind == 8:
        return rng.choice(sorted(METHODS))
    if kind in (9, 10):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {
        random_value(rng, 2) if rng.random() < 0.2 else rng.choice(FIELD_NAMES + ["a", ""]): random_value(
            rng, depth + 1
        )
        for _ in range(rng.randrange(0, 4))
    }


_rng = random.Random(20240)  # a fixed seed: the same pools in every run, so a failure replays
VALUE_POOL = [random_value(_rng) for _ in range(600)]
TOKEN_POOL = HOSTILE + [flow(v) for v in VALUE_POOL]
# most values and tokens come from the pools (one draw each); hypothesis' own keep the search open-ended
some_values = weighted((4, st.sampled_from(VALUE_POOL)), (1, py_values))
yaml_tokens = weighted((10, st.sampled_from(TOKEN_POOL)), (1, py_values.map(flow)), (1, odd_text), (1, LONG))


TYPOS = st.sampled_from(["same", "drop", "double", "swap", "upper", "plural", "space", "dash", "alias", "unicode"])
SPACES = st.sampled_from([" ", "\u3000", "\u00a0"])
LOOKALIKES = st.sampled_from(["ı", "é", "ſ", "\u200b", "你"])


@functools.cache  # strategies are built once: building them per draw is slow
def misspelled(words: tuple):
    """A real key with a typo, an alias another tool uses, or the key itself."""
    chosen = st.sampled_from(words)

    @st.composite
    def typo(draw):
        word = draw(chosen)
        op = draw(TYPOS)
        if op == "drop" and len(word) > 1:
            i = draw(st.integers(0, len(word) - 1))
            return word[:i] + word[i + 1 :]
        if op == "double" and word:
            i = draw(st.integers(0, len(word) - 1))
            return word[:i] + word[i] + word[i:]
        if op == "swap" and len(word) > 1:
            i = draw(st.integers(0, len(word) - 2))
            return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
        if op == "upper":
            return word.upper()
        if op == "plural":
            return word + "s"
        if op == "space":
            return draw(SPACES) + word
        if op == "dash":
            return word.replace("_", "-")
        if op == "alias":
            return draw(st.sampled_from(ALIASES))
        if op == "unicode":
            return word[:-1] + draw(LOOKALIKES)
        return word

    return typo()


ALL_KEYS = tuple(TOP_KEYS + FIELD_NAMES)
RAW_KEYS = [
    "1",
    "null",
    "~",
    ".nan",
    "true",
    "'quoted'",
    '"dq"',
    "<<",
    "[1, 2]",
    "{a: 1}",
    "*a",
    "&k seed",
    "a b",
    "''",
    "-1",
    "你好",
    "😀",
    "? seed",
    "!!str seed",
    "!!int seed",
    "'seed'",
    '"train"',
]
yaml_keys = weighted(
    (4, misspelled(ALL_KEYS)),
    (1, st.sampled_from(RAW_KEYS)),
    (1, st.text(st.characters(codec="utf-8", exclude_characters=":#\n\r"), min_size=1, max_size=10)),
)


def block_value(key: str, token: str, pad: str) -> str:
    """`key: token` at indentation `pad`, as a block below the key when the token needs its own lines."""
    if "\n" in token or token.startswith(("- ", "? ")):
        inner = "\n".join(pad + "  " + line for line in token.splitlines() or [""])
        return f"{pad}{key}:\n{inner}"
    return f"{pad}{key}: {token}"


@functools.cache
def section_keys(section: str):
    fields = tuple(SECTIONS.get(section, {})) or tuple(FIELD_NAMES)
    return st.lists(weighted((6, st.sampled_from(fields)), (1, misspelled(fields)), (1, yaml_keys)), max_size=3)


@st.composite
def section_pairs(draw, section: str):
    """(key, YAML) lines of one section: mostly its real fields, some typos, repeats and garbage."""
    return [(k, draw(field_token(section, k))) for k in draw(section_keys(section))]


def _literal_choices(annotation) -> list:
    """The choices of a Literal[...] (inside Optional[...] too)."""
    found = []
    for arg in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arg) is typing.Literal:
            found += list(typing.get_args(arg))
    return found


@functools.cache
def field_token(section: str, key: str):
    """A YAML token for section.key: often of the field's type (near-valid), else hostile."""
    field = SECTIONS.get(section, {}).get(key) or Config.model_fields.get(key)
    plausible = [st.integers(-3, 70).map(str), st.floats(-0.5, 1.5).map(repr), st.booleans().map(str)]
    if field is not None:
        choices = _literal_choices(field.annotation)
        if choices:
            plausible.append(st.sampled_from(choices).map(flow))
            plausible.append(misspelled(tuple(str(c) for c in choices)).map(flow))
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = None
        if default is not None:
            plausible.append(st.just(flow(default)))
    if key in ("target_modules", "modules_to_save", "labels", "feedforward_modules", "trainable_layers"):
        plausible.append(st.lists(st.sampled_from(["q_proj", "v_proj", "a", "a", "", "-1", "1"]), max_size=3).map(flow))
    if key in ("lr_groups", "rank_pattern", "alpha_pattern"):
        plausible.append(
            st.dictionaries(
                st.sampled_from(["q_proj", "*", "lm_head", ""]), st.one_of(st.integers(-2, 9), st.floats()), max_size=2
            ).map(flow)
        )
    return weighted((1, st.one_of(*plausible)), (1, yaml_tokens))


TOP_LEVEL_KEYS = st.lists(weighted((6, st.sampled_from(TOP_KEYS)), (1, yaml_keys)), max_size=4)
ONE_IN_5 = st.integers(0, 4).map(lambda k: k == 0)
PADS = st.sampled_from(["  ", "  ", "  ", "    ", " ", "\t"])
NEWLINES = st.sampled_from(["\n", "\n", "\r\n", "\r"])
DAMAGES = st.sampled_from(["none"] * 6 + ["truncate", "insert", "tab", "doc", "comment", "repeat"])


@st.composite
def structured_yaml(draw) -> str:
    """A config file written by hand: sections of real and misspelled keys with near-valid or hostile
    values, anchors/aliases, duplicate keys, and text-level damage (tabs, CRLF, BOM, truncation)."""
    lines: list[str] = []
    anchors = 0
    for key in draw(TOP_LEVEL_KEYS):
        if key in SECTIONS and not draw(ONE_IN_5):  # a section block (4 in 5)
            anchor = ""
            if draw(ONE_IN_5):
                anchors += 1
                anchor = f" &s{anchors}"
            lines.append(f"{key}:{anchor}")
            pad = draw(PADS)
            lines += [block_value(k, tok, pad) for k, tok in draw(section_pairs(key))]
        elif anchors and draw(ONE_IN_5):
            lines.append(f"{key}: *s{draw(st.integers(1, anchors + 1))}")  # an alias, maybe to an undefined anchor
        else:
            lines.append(block_value(key, draw(field_token("", key)), ""))
    newline = draw(NEWLINES)
    text = newline.join(lines) + (newline if draw(st.booleans()) else "")
    damage = draw(DAMAGES)
    if damage == "truncate" and text:
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif damage == "insert":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(HOSTILE)) + text[at:]
    elif damage == "tab":
        text = text.replace("  ", "\t")
    elif damage == "doc":
        text = (
            draw(st.sampled_from(["---\n", "%YAML 1.1\n---\n", "%YAML 2.0\n---\n", "%TAG ! tag:x,2000:\n---\n"])) + text
        )
        text += draw(st.sampled_from(["", "\n...\n", "\n---\n", "\n--- x\n"]))
    elif damage == "comment":
        text = "# " + draw(odd_text) + "\n" + text.replace(newline, " # c" + newline, 1)
    elif damage == "repeat" and lines:
        text = text + newline + draw(st.sampled_from(lines))
    return text


@st.composite
def dumped_yaml(draw) -> str:
    """A config dict (the valid one with changes, or random) written by a YAML dumper."""
    if draw(st.booleans()):
        data = json.loads(json.dumps(VALID))
        for _ in range(draw(st.integers(0, 3))):
            section = draw(st.sampled_from(list(SECTIONS) + [""]))
            key = draw(st.sampled_from(list(SECTIONS[section]) if section else TOP_SCALARS))
            target = data.setdefault(section, {}) if section else data
            if not isinstance(target, dict):
                continue
            if draw(st.integers(0, 4)) == 0:
                target.pop(key, None)
            else:
                target[key] = draw(some_values)
    else:
        keys = st.one_of(st.sampled_from(TOP_KEYS), misspelled(tuple(TOP_KEYS)))
        data = draw(st.dictionaries(keys, some_values, max_size=6))
    return yaml.dump(
        data,
        Dumper=DUMPER,
        default_flow_style=draw(st.sampled_from([None, True, False])),
        allow_unicode=draw(st.booleans()),
        sort_keys=draw(st.booleans()),
    )


@st.composite
def hostile_yaml(draw) -> str:
    """One hostile value at a real key (top level or in its section), in block or flow style."""
    path = draw(st.sampled_from(DOTTED))
    token = draw(yaml_tokens)
    parts = path.split(".")
    if len(parts) == 1:
        body = block_value(parts[0], token, "")
    elif draw(st.booleans()) and "\n" not in token and not token.startswith(("- ", "? ")):
        body = f"{parts[0]}: {{{parts[1]}: {token}}}"
    else:
        body = f"{parts[0]}:\n" + block_value(parts[1], token, "  ")
    if draw(st.booleans()):  # among otherwise valid settings
        base = yaml.dump({k: v for k, v in VALID.items() if k != parts[0]}, Dumper=DUMPER, sort_keys=False)
        body = base + body if draw(st.booleans()) else body + "\n" + base
    return body


yaml_soup = st.lists(
    st.one_of(
        st.sampled_from(
            TOP_KEYS
            + FIELD_NAMES
            + [
                ":",
                ": ",
                " ",
                "  ",
                "\n",
                "\n  ",
                "- ",
                "[",
                "]",
                "{",
                "}",
                ",",
                "&a ",
                "*a",
                "!!int ",
                "'",
                '"',
                "#",
                "\t",
                "|",
                ">",
                "---",
                "...",
                "? ",
                "~",
                "<<: ",
                "%YAML 1.1",
                "\ufeff",
                "\x00",
                "\x85",
                "\u2028",
            ]
        ),
        st.sampled_from(HOSTILE),
    ),
    max_size=40,
).map("".join)


# --- 1. configs ----------------------------------------------------------------------------------


def check_resaved(cfg: Config) -> None:
    """A loaded config, saved as a run saves it, loads again to the same settings."""
    with scratch() as d:
        saved = Path(d) / "config.yaml"
        atomic_write_text(saved, cfg.to_yaml())
        again = load_config(saved)
    first, second = cfg.to_dict(), again.to_dict()
    for settings_ in (first, second):  # relative data paths resolve against the config's folder
        settings_["data"].pop("train"), settings_["data"].pop("eval")
    assert first == second


def config_or_config_error(path=None, overrides=None, resave=True):
    """The property of surfaces 1 and 2: a Config (that survives a save) or a ConfigError with a message.
    `resave`: check the save and re-load too (~0.1 s: done for a share of the cases)."""
    try:
        cfg = load_config(path, overrides)
    except ConfigError as exc:
        event("ConfigError")
        message = str(exc)
        assert message.strip()
        if path is not None:
            assert str(path) in message, message
        return None
    event("Config")
    assert isinstance(cfg, Config)
    if resave:
        check_resaved(cfg)
    return cfg


def run_config_file(data: bytes, resave: bool = True) -> None:
    with scratch() as d:
        path = Path(d) / "config.yaml"
        path.write_bytes(data)
        config_or_config_error(path, resave=resave)


# about one case in 20 (more where the other arguments run out of new values); shrinks to True
sometimes = st.integers(0, 19).map(lambda k: k == 0)


def encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


@settings(FUZZ, max_examples=450)
@given(text=st.one_of(st.text(max_size=300), yaml_soup), bom=st.booleans())
@fuzz_case("configs", "config_text")
def test_config_arbitrary_text(text, bom):
    run_config_file((b"\xef\xbb\xbf" if bom else b"") + encode(text))


@settings(FUZZ, max_examples=460)
@given(
    data=st.one_of(
        st.binary(max_size=500), st.builds(lambda a, b: a + b, st.binary(max_size=20), yaml_soup.map(encode))
    )
)
@fuzz_case("configs", "config_bytes")
def test_config_arbitrary_bytes(data):
    run_config_file(data)


@settings(FUZZ, max_examples=450)
@given(text=hostile_yaml(), bom=st.booleans(), resave=sometimes)
@fuzz_case("configs", "config_hostile")
def test_config_hostile_values(text, bom, resave):
    run_config_file((b"\xef\xbb\xbf" if bom else b"") + encode(text), resave)


@settings(FUZZ, max_examples=600)
@given(text=st.one_of(structured_yaml(), structured_yaml(), dumped_yaml()), bom=st.booleans(), resave=sometimes)
@fuzz_case("configs", "config_structured")
def test_config_structured_near_misses(text, bom, resave):
    run_config_file((b"\xef\xbb\xbf" if bom else b"") + encode(text), resave)


@settings(FUZZ, max_examples=40)  # ~0.1 s each: pyyaml scans deep nesting slowly
@given(path=st.sampled_from(DOTTED), token=DEEP, where=st.sampled_from(["file", "file", "override"]))
@fuzz_case(None, "deep")
def test_deeply_nested_values(path, token, where):
    """A value nested past Python's recursion limit, in a config file or an override."""
    cases["configs" if where == "file" else "overrides"] += 1
    if where == "override":
        config_or_config_error(None, [f"{path}={token}"])
        return
    section, _, key = path.rpartition(".")
    text = block_value(key, token, "  " if section else "")
    run_config_file(encode(f"{section}:\n{text}" if section else text))


# --- 2. overrides --------------------------------------------------------------------------------

ODD_PATHS = [
    "",
    ".",
    "..",
    "a..b",
    ".seed",
    "seed.",
    "train..lr",
    "train.lr.x",
    "seed.x",
    "data.train.x",
    "__class__",
    "model_config",
    "model_fields",
    "data.__dict__",
    " seed ",
    "SEED",
    "train.LR",
    "lora.r.r.r",
    "train.lr_groups.q_proj",
    "lora.rank_pattern.x",
    "data.labels.0",
    "train.",
    ".train.lr",
    "…",
    "你好.世界",
    "data\x00train",
    "seed\n",
    "a=b",
    "train.lr_groups..x",
    "lora.target_modules.0",
    "eval.eval",
]
segment = st.one_of(
    st.sampled_from(TOP_KEYS + FIELD_NAMES + ["", " ", "0", "-1", "你好", "😀"]),
    misspelled(ALL_KEYS),
    st.text(max_size=6),
)
override_paths = weighted(
    (5, st.sampled_from(DOTTED)),
    (
        1,
        st.builds(
            lambda parts, edit: ".".join(parts[:-1] + [edit]),
            st.sampled_from(DOTTED).map(lambda p: p.split(".")),
            misspelled(ALL_KEYS),
        ),
    ),
    (1, st.lists(segment, min_size=1, max_size=4).map(".".join)),
    (1, st.sampled_from(ODD_PATHS)),
)
override_values = weighted(
    (6, yaml_tokens),
    (1, st.sampled_from(["", " ", "=", "==", "a=b", "x\ny", "1\n2", "- 1\n- 2"])),
    (1, st.text(max_size=30)),
)
override_items = weighted(
    (
        9,
        st.builds(
            lambda p, sep, v: p + sep + v,
            override_paths,
            st.sampled_from(["=", "=", "=", "=", " = ", "==", "= ", ":", ": ", ""]),
            override_values,
        ),
    ),
    (1, override_paths),  # no '=' at all
)


@settings(FUZZ, max_examples=850)
@given(items=st.lists(override_items, max_size=5), resave=sometimes)
@fuzz_case("overrides", "overrides_structured")
def test_overrides_structured(items, resave):
    config_or_config_error(None, items, resave)


@settings(FUZZ, max_examples=1150)
@given(
    items=st.lists(
        st.one_of(st.text(max_size=40), st.text(alphabet="=.:[]{}&*!-_ ,#'\"\n\tabdlrsx01你\x00", max_size=30)),
        max_size=4,
    )
)
@fuzz_case("overrides", "overrides_arbitrary")
def test_overrides_arbitrary_strings(items):
    config_or_config_error(None, items)


# --- 3. adapter folders --------------------------------------------------------------------------

TENSOR_NAME = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
VALID_SAFETENSORS = safetensors_bytes(
    {TENSOR_NAME: torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.float16)}, metadata={"format": "pt"}
)
LORA_KEYS = [
    "peft_type",
    "task_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "base_model_name_or_path",
    "inference_mode",
    "bias",
    "modules_to_save",
    "init_lora_weights",
    "use_dora",
    "rank_pattern",
    "fan_in_fan_out",
]
wild = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 64),
    st.sampled_from(
        [
            -1,
            0,
            1,
            2,
            8,
            16,
            -(2**63),
            2**64,
            10**12,
            1.5,
            -0.5,
            0.0,
            1e308,
            float("nan"),
            float("inf"),
            "",
            "16",
            "x",
            "all-linear",
            "q_proj",
            ".*",
            "[",
            "LORA",
            "IA3",
            "ADALORA",
            "PREFIX_TUNING",
            "lora",
            "CAUSAL_LM",
            "SEQ_CLS",
            "TOKEN_CLS",
            "gaussian",
            "pissa",
            "olora",
            "loftq",
            "eva",
            "corda",
            "none",
            "all",
            "lora_only",
            "megatron.core",
            "os",
            "tiny-llama",
            "/nonexistent",
            "你好",
        ]
    ),
    st.lists(st.sampled_from(["q_proj", "v_proj", "k_proj", "o_proj", "nope", "", 1, None]), max_size=3),
    st.dictionaries(
        st.sampled_from(["q_proj", "v_proj", "a", "", "r"]), st.sampled_from([1, -1, "x", None, 0, 2.5]), max_size=2
    ),
)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), odd_text)
json_values = st.recursive(
    json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(odd_text, c, max_size=3), max_leaves=10
)
json_damage = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * (n % 3 == 0) * n),
    st.integers(1, 200_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.integers(4000, 6000).map(lambda n: b"1" * n),
    st.integers(4000, 6000).map(lambda n: b'{"r": ' + b"9" * n + b"}"),
    st.sampled_from(
        [
            b"",
            b"\xef\xbb\xbf{}",
            b"{}",
            b"[]",
            b"NaN",
            b"-Infinity",
            b'"\\ud800"',
            b'{"a": 1,}',
            b"\xff\xfe{\x00}\x00",
            b'{"a": 1, "a": 2}',
            b'{"tunelab_method": "adapter"}\x00',
            b"null",
        ]
    ),
)


@st.composite
def safetensors_files(draw):
    """None (absent), "dir", or bytes: valid, truncated, flipped, random, or a header of random JSON."""
    kind = draw(
        st.sampled_from(
            ["absent", "valid", "valid", "truncated", "flipped", "random", "header", "header", "lie", "empty", "dir"]
        )
    )
    if kind == "absent":
        return None
    if kind == "dir":
        return "dir"
    if kind == "valid":
        return VALID_SAFETENSORS
    if kind == "truncated":
        return VALID_SAFETENSORS[: draw(st.integers(0, len(VALID_SAFETENSORS) - 1))]
    if kind == "flipped":
        data = bytearray(VALID_SAFETENSORS)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "random":
        return draw(st.binary(max_size=200))
    if kind == "empty":
        return b""
    if kind == "lie":  # a header length that does not match the file
        n = draw(st.sampled_from([0, 1, 7, 8, 2**31, 2**63 - 1, 2**64 - 1, 100_000_000]))
        return n.to_bytes(8, "little") + draw(st.binary(max_size=40))
    tensor = st.fixed_dictionaries(
        {},
        optional={
            "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "U8", "F8_E4M3", "XX", "", 1, None]),
            "shape": st.lists(st.integers(-2, 2**40) | st.sampled_from([0, 1, 2, 3]), max_size=3),
            "data_offsets": st.lists(st.integers(-1, 64) | st.sampled_from([2**64, 2**63]), max_size=3),
        },
    )
    header = draw(
        st.dictionaries(
            st.sampled_from([TENSOR_NAME, "b", "", "__metadata__"]) | odd_text, tensor | json_values, max_size=3
        )
    )
    raw = json.dumps(header).encode()
    pad = draw(st.integers(0, 8))
    return len(raw + b" " * pad).to_bytes(8, "little") + raw + b" " * pad + draw(st.binary(max_size=64))


adapter_config_files = st.one_of(
    st.none(),
    st.just("dir"),
    json_damage,
    st.dictionaries(st.sampled_from(LORA_KEYS) | odd_text, wild | json_values, max_size=8).map(
        lambda d: json.dumps(d).encode()
    ),
)
OTHER_FILES = [
    "model.pt",
    "x.ckpt",
    "weights.pth",
    "a.pkl",
    "b.pickle",
    "training_args.bin",
    "optimizer.pt",
    "scheduler.pt",
    "README.md",
    "config.json",
    "adapter_model.safetensors.bak",
    "model.safetensors",
    ".bin",
]


def write_node(path: Path, content) -> None:
    """Write bytes at path, or make a folder for "dir"; None writes nothing."""
    if content is None:
        return
    if content == "dir":
        path.mkdir()
        (path / "x").write_bytes(b"1")
    else:
        path.write_bytes(content)


@settings(FUZZ, max_examples=450)
@given(
    config=adapter_config_files,
    weights=safetensors_files(),
    pickle_bin=st.one_of(st.none(), st.binary(max_size=50), st.just("dir")),
    others=st.lists(
        st.tuples(st.sampled_from(OTHER_FILES), st.binary(max_size=20)), max_size=3, unique_by=lambda t: t[0]
    ),
    folder_kind=st.sampled_from(["dir"] * 8 + ["missing", "file"]),
    allow_pickle=st.booleans(),
)
@fuzz_case("adapters", "adapter_folder")
def test_check_adapter_folder(config, weights, pickle_bin, others, folder_kind, allow_pickle):
    with scratch() as d:
        folder = Path(d) / "adapter"
        if folder_kind == "file":
            folder.write_bytes(b"not a folder")
        elif folder_kind == "dir":
            folder.mkdir()
            write_node(folder / "adapter_config.json", config)
            write_node(folder / "adapter_model.safetensors", weights)
            write_node(folder / "adapter_model.bin", pickle_bin)
            for name, data in others:
                (folder / name).write_bytes(data)
        try:
            result = check_adapter_folder(folder, allow_pickle)
        except UserError as exc:
            event("UserError")
            assert str(exc).strip()
            return
        event("accepted")
        assert result is None
        has_weights = (folder / "adapter_model.safetensors").is_file()
        pickles = [
            p
            for p in folder.iterdir()
            if p.is_file()
            and p.name.endswith(PICKLE_SUFFIXES)
            and p.name not in ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt")
        ]
        assert has_weights or pickles, "accepted an adapter folder without weights"
        assert has_weights or allow_pickle, "accepted pickle-only adapter weights without allow_pickle"


@settings(FUZZ, max_examples=200)
@given(
    data=st.one_of(
        json_damage,
        st.builds(
            lambda d, m: json.dumps({"tunelab_method": m, **d}).encode(),
            st.dictionaries(
                st.sampled_from(
                    [
                        "kind",
                        "reduction",
                        "non_linearity",
                        "dropout",
                        "targets",
                        "hidden_size",
                        "base_model_name_or_path",
                    ]
                )
                | odd_text,
                wild | json_values,
                max_size=5,
            ),
            st.sampled_from(["adapter", "adapter", "lora", "", None, 1, ["adapter"]]),
        ),
    ),
    kind=st.sampled_from(["file"] * 10 + ["missing", "dir"]),
)
@fuzz_case("adapters", "adapter_config")
def test_bottleneck_adapter_config_reader(data, kind):
    with scratch() as d:
        path = Path(d) / "adapter_config.json"
        write_node(path, {"file": data, "dir": "dir", "missing": None}[kind])
        try:
            config = _read_artifact_config(path)
        except UserError as exc:
            event("UserError")
            assert str(exc).strip()
            return
        event("dict")
        assert isinstance(config, dict) and config.get("tunelab_method") == "adapter"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A finished tiny-llama LoRA run (1 step, no validation split) and its adapter config."""
    from helpers import train_tiny_run

    run_dir = Path(train_tiny_run(tmp_path_factory.mktemp("fz"), val_fraction=0, max_steps=1).run_dir)
    return run_dir, json.loads((run_dir / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))


HOT_KEYS = [
    "r",
    "lora_alpha",
    "target_modules",
    "lora_dropout",
    "peft_type",
    "task_type",
    "init_lora_weights",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "use_dora",
    "bias",
    "layers_to_transform",
]


@st.composite
def adapter_config_mutations(draw, real: dict) -> bytes:
    """The real adapter_config.json with keys dropped / retyped / added, or replaced as a whole."""
    whole = draw(st.sampled_from(["edit"] * 7 + ["list", "number", "string", "null", "bytes", "truncated", "empty"]))
    text = json.dumps(real, indent=2)
    if whole == "list":
        return json.dumps(draw(st.lists(json_values, max_size=3)) + [real]).encode()
    if whole == "number":
        return json.dumps(draw(st.integers() | st.floats())).encode()
    if whole == "string":
        return json.dumps(text).encode()
    if whole == "null":
        return b"null"
    if whole == "bytes":
        return draw(st.binary(max_size=200))
    if whole == "truncated":
        return text.encode()[: draw(st.integers(0, len(text) - 1))]
    if whole == "empty":
        return b""
    config = dict(real)
    keys = sorted(real)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["drop", "set", "set", "set", "add"]))
        if op == "drop":
            config.pop(draw(st.sampled_from(HOT_KEYS + keys)), None)
        elif op == "set":
            config[draw(st.sampled_from(HOT_KEYS * 3 + keys))] = draw(wild)
        else:
            config[draw(odd_text)] = draw(wild)
    return json.dumps(config, indent=draw(st.sampled_from([None, 2]))).encode()


_load_tokenizer = tunelab.loading.load_tokenizer
_tokenizers: dict = {}


def cached_tokenizer(*args):
    """The run's tokenizer, loaded once: adapter_config.json does not touch it, and it is 3/4 of a load's time."""
    if args not in _tokenizers:
        _tokenizers[args] = _load_tokenizer(*args)
    return _tokenizers[args]


@settings(FUZZ, max_examples=60)  # a full load each (~0.15 s)
@given(data=st.data())
@fuzz_case("adapters", "adapter_load")
def test_load_run_with_mutated_adapter_config(lora_run, data):
    run_dir, real = lora_run
    with scratch() as d:
        run = Path(
            shutil.copytree(run_dir, Path(d) / "run", ignore=shutil.ignore_patterns("checkpoints", "tb", "plots"))
        )
        raw = data.draw(adapter_config_mutations(real), label="adapter_config.json")
        (run / "adapter" / "adapter_config.json").write_bytes(raw)
        try:
            with mock.patch.object(tunelab.loading, "load_tokenizer", cached_tokenizer):
                loaded = tunelab.load(run)
        except UserError as exc:
            event("UserError")
            assert str(exc).strip()
            return
        event("loaded")
        assert isinstance(loaded, tuple) and len(loaded) == 2
        model, tokenizer = loaded
        assert isinstance(model, torch.nn.Module) and tokenizer is not None


# --- 4. run folders ------------------------------------------------------------------------------

summary_fields = st.dictionaries(
    st.sampled_from(["method", "model", "final_train_loss", "eval", "config_hash", "steps", "run_name", "error"])
    | odd_text,
    st.one_of(wild, json_values, st.dictionaries(st.sampled_from(["eval_loss", "exact_match", ""]), wild, max_size=2)),
    max_size=6,
)
summary_files = st.one_of(
    st.none(),
    st.just("dir"),
    json_damage,
    summary_fields.map(lambda d: json.dumps(d).encode()),
    st.sampled_from(
        [
            b"{}",
            b'{"eval": 3, "final_train_loss": "x"}',
            b'{"method": 3, "model": ["x"]}',
            b'{"eval": {"eval_loss": NaN}, "final_train_loss": Infinity}',
            b'{"eval": [1]}',
            b'{"method": ""}',
            b'{"method": "lora", "final_train_loss": 1e999}',
            b'{"eval": null}',
            b'{"method"',
        ]
    ),
)
config_texts = weighted(
    (
        30,
        st.one_of(
            st.none(),
            st.just("dir"),
            yaml_soup.map(encode),
            hostile_yaml().map(encode),
            st.binary(max_size=100),
            st.just(encode(yaml.safe_dump(VALID))),
        ),
    ),
    (1, DEEP.map(lambda token: encode(block_value("method", token, "")))),  # 1 in 31 (slow to scan)
)
STEP_NAMES = [
    "step-1",
    "step-2",
    "step-10",
    "step-0",
    "step-03",
    "step-x",
    "step--1",
    "step-",
    "step-\u0663",
    ".step-3.tmp",
    "step-1 ",
    "Step-4",
    "step-99999999999999999999",
]
checkpoint_dirs = st.one_of(
    st.none(),
    st.just("file"),
    st.lists(
        st.tuples(
            st.sampled_from(STEP_NAMES), st.sampled_from(["complete", "complete", "partial", "marker-dir", "file"])
        ),
        max_size=3,
        unique_by=lambda t: t[0],
    ),
)
run_specs = st.fixed_dictionaries(
    {
        "summary": summary_files,
        "config": config_texts,
        "failure": st.one_of(st.none(), st.none(), json_damage, summary_fields.map(lambda d: json.dumps(d).encode())),
        "checkpoints": checkpoint_dirs,
        "lock": st.sampled_from([None, None, "file", "held", "dir"]),
        "metrics": st.one_of(st.none(), st.binary(max_size=60)),
    }
)
RUN_NAMES = ["tiny", "run-1", "2024-01-01", "你好", "a b", ".hidden", "runs", "x" * 100, "-", "summary.json"]


def make_checkpoints(run: Path, spec) -> None:
    if spec is None:
        return
    if spec == "file":
        (run / "checkpoints").write_bytes(b"x")
        return
    root = run / "checkpoints"
    root.mkdir()
    for name, state in spec:
        if state == "file":
            (root / name).write_bytes(b"x")
            continue
        (root / name).mkdir()
        (root / name / "trainable.safetensors").write_bytes(b"\x00" * 8)
        if state == "complete":
            (root / name / "COMPLETE").write_text("1\n")
        elif state == "marker-dir":
            (root / name / "COMPLETE").mkdir()


def make_run(run: Path, spec: dict, stack: ExitStack) -> None:
    run.mkdir()
    write_node(run / "summary.json", spec["summary"])
    write_node(run / "config.yaml", spec["config"])
    write_node(run / "failure.json", spec["failure"])
    write_node(run / "metrics.jsonl", spec["metrics"])
    make_checkpoints(run, spec["checkpoints"])
    if spec["lock"] == "dir":
        (run / ".lock").mkdir()
    elif spec["lock"] in ("file", "held"):
        if spec["lock"] == "held":  # as a training process holds it
            stack.callback(RunLock(run).acquire().release)
        else:
            (run / ".lock").write_text("123\n")


def json_object_file(path: Path) -> bool:
    """A JSON object within tunelab's documented nesting limit (io.JSON_MAX_DEPTH levels)."""
    from tunelab.io import JSON_MAX_DEPTH

    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: far deeper than the limit
        return False
    deepest, stack = 0, [(obj, 1)]
    while stack:  # nesting counted without recursion
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, depth)
            stack += [(v, depth + 1) for v in (value.values() if isinstance(value, dict) else value)]
    return isinstance(obj, dict) and deepest <= JSON_MAX_DEPTH


def has_complete_checkpoint(run: Path) -> bool:
    root = run / "checkpoints"
    return root.is_dir() and any(
        re.fullmatch(r"step-\d+", p.name) and (p / "COMPLETE").exists() for p in root.iterdir()
    )


@settings(FUZZ, max_examples=200)
@given(
    runs=st.lists(st.tuples(st.sampled_from(RUN_NAMES), run_specs), max_size=3, unique_by=lambda t: t[0]),
    strays=st.lists(
        st.sampled_from(["notes.txt", "config.yaml", "summary.json", ".DS_Store"]), max_size=2, unique=True
    ),
)
@fuzz_case("runs", "list_runs")
def test_list_runs(runs, strays):
    with scratch() as d, ExitStack() as stack:
        root = Path(d) / "runs"
        root.mkdir()
        for name in strays:
            if not (root / name).exists():
                (root / name).write_bytes(b"x: 1\n")
        for name, spec in runs:
            if not (root / name).exists():
                make_run(root / name, spec, stack)
        rows = list_runs(root)
        assert isinstance(rows, list)
        want = sorted(
            p.name
            for p in root.iterdir()
            if p.is_dir() and ((p / "config.yaml").exists() or (p / "summary.json").exists())
        )
        assert sorted(r["run"] for r in rows) == want
        spec_of = dict(runs)
        for row in rows:
            assert isinstance(row, dict), row
            event(row["status"])
            assert row["status"] in STATUSES, row
            for key in ("method", "model", "config_hash"):
                assert row.get(key) is None or isinstance(row[key], str), row
            for key in ("final_train_loss", "eval_loss"):
                assert row.get(key) is None or isinstance(row[key], (int, float)), row
            assert isinstance(row.get("detail", ""), str), row
            run = root / row["run"]
            locked = spec_of[row["run"]]["lock"] == "held"
            if locked:
                assert row["status"] == "running", row
            elif json_object_file(run / "summary.json"):
                assert row["status"] == "finished", row
            elif not any((run / n).exists() for n in ("summary.json", "failure.json")) and not has_complete_checkpoint(
                run
            ):
                assert row["status"] == "broken", row


@settings(FUZZ, max_examples=120)
@given(
    runs=st.lists(
        st.tuples(st.sampled_from(RUN_NAMES), checkpoint_dirs, st.sampled_from([None, None, b"{}", b"x", "dir"])),
        max_size=4,
        unique_by=lambda t: t[0],
    ),
    out_kind=st.sampled_from(["dir"] * 8 + ["missing", "file"]),
)
@fuzz_case("runs", "latest_unfinished")
def test_latest_unfinished_run(runs, out_kind):
    with scratch() as d:
        out = Path(d) / "runs"
        if out_kind == "file":
            out.write_bytes(b"x")
        elif out_kind == "dir":
            out.mkdir()
            for name, ckpts, summary in runs:
                run = out / name
                if run.exists():
                    continue
                run.mkdir()
                make_checkpoints(run, ckpts)
                write_node(run / "summary.json", summary)
        unfinished = (
            {
                p
                for p in out.glob("*")
                if p.is_dir() and has_complete_checkpoint(p) and not (p / "summary.json").exists()
            }
            if out.is_dir()
            else set()
        )
        try:
            found = latest_unfinished_run(out)
        except UserError as exc:
            event("UserError")
            assert str(exc).strip()
            assert not unfinished, f"UserError although {sorted(unfinished)} are unfinished: {exc}"
            return
        event("found")
        assert isinstance(found, Path) and found in unfinished, (found, unfinished)


def _no_model_load(*args, **kwargs):
    raise AssertionError("a tokenizer or model loaded for a run whose config is invalid")


@settings(FUZZ, max_examples=100)
@given(
    config=st.one_of(hostile_yaml(), structured_yaml(), dumped_yaml(), yaml_soup, st.text(max_size=100)).map(encode),
    summary=st.sampled_from([b"{}", b'{"method": "lora"}', b"x"]),
    artifact=st.booleans(),
)
@fuzz_case("runs", "load_invalid")
def test_load_run_with_invalid_config(config, summary, artifact):
    with scratch() as d:
        run = Path(d) / "run"
        run.mkdir()
        (run / "config.yaml").write_bytes(config)
        (run / "summary.json").write_bytes(summary)
        if artifact:
            (run / "adapter").mkdir()
        try:
            load_config(run / "config.yaml", saved_run=True)  # as a run's config is read
        except UserError:
            pass
        else:
            event("valid config: not loaded")  # only invalid configs here: no model loads
            return
        start = time.monotonic()
        with (
            mock.patch.object(tunelab.loading, "load_tokenizer", _no_model_load),
            mock.patch.object(tunelab.loading, "load_causal_lm", _no_model_load),
            pytest.raises(UserError) as err,
        ):
            tunelab.loading.load(run)
        assert str(err.value).strip()
        assert time.monotonic() - start < 5, "an invalid config took over 5 s to refuse"


good_records = st.fixed_dictionaries(
    {"step": st.integers(-5, 10**6) | st.integers()},
    optional={
        "loss": st.floats(allow_nan=False, allow_infinity=False),
        "lr": st.floats(0, 1),
        "split": st.sampled_from(["train", "eval"]),
    },
)
bad_metric_lines = st.one_of(
    st.sampled_from(
        [
            b'{"step": "1"}',
            b'{"step": true}',
            b'{"step": 1.0}',
            b'{"step": null}',
            b"{}",
            b"[1]",
            b"1",
            b'"x"',
            b"",
            b" ",
            b"\r",
            b'{"loss": 1}',
            b'{"step": 1',
            b"NaN",
            b'{"step": 1e999}',
            b"\x00",
            b"\xff\xfe",
            b'{"step": []}',
            b'{"step": {"a": 1}}',
            b'\xef\xbb\xbf{"step": 4}',
        ]
    ),
    st.binary(max_size=80).filter(lambda b: b"\n" not in b and b"\r" not in b),
    st.integers(1, 200_000).map(lambda n: b"[" * n),
    st.integers(4000, 6000).map(lambda n: b'{"step": ' + b"1" * n + b"}"),
    good_records.map(lambda r: json.dumps(r).encode()).flatmap(  # a record torn by a kill
        lambda raw: st.integers(0, len(raw) - 1).map(lambda k: raw[:k])
    ),
)
metric_lines = weighted(  # (kind, line, the record a good line holds)
    (1, good_records.map(lambda r: ("good", json.dumps(r).encode(), r))),
    (1, bad_metric_lines.map(lambda raw: ("bad", raw, None))),
)


def is_subsequence(small: list, big: list) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


@settings(FUZZ, max_examples=180)
@given(
    lines=st.lists(metric_lines, max_size=8),
    newline=st.sampled_from([b"\n", b"\r\n"]),
    tail=st.booleans(),
    kind=st.sampled_from(["file"] * 12 + ["missing"]),
)
@fuzz_case("runs", "metrics")
def test_read_metrics(lines, newline, tail, kind):
    with scratch() as d:
        path = Path(d) / "metrics.jsonl"
        if kind == "file":
            path.write_bytes(newline.join(raw for _, raw, _ in lines) + (newline if tail else b""))
        records = read_metrics(path)
        assert isinstance(records, list)
        for r in records:
            assert isinstance(r, dict) and isinstance(r.get("step"), int) and not isinstance(r["step"], bool), r
        good = [r for what, _, r in lines if what == "good"] if kind == "file" else []
        assert is_subsequence(good, records), (good, records)


# --- budget --------------------------------------------------------------------------------------

ALL_FUZZ = {
    "config_text",
    "config_bytes",
    "config_hostile",
    "config_structured",
    "deep",
    "overrides_structured",
    "overrides_arbitrary",
    "adapter_folder",
    "adapter_config",
    "adapter_load",
    "list_runs",
    "latest_unfinished",
    "load_invalid",
    "metrics",
}


def test_generated_case_count():
    """At least MIN_CASES cases were generated when the whole module ran (skipped for a partial run)."""
    print(f"\nfuzz cases per surface: {cases} (total {sum(cases.values())})")
    if tests_run != ALL_FUZZ:
        pytest.skip(f"only {sorted(tests_run)} ran")
    if tests_failed:
        pytest.skip(f"{sorted(tests_failed)} stopped at a failing case: the count is not the budget")
    assert sum(cases.values()) >= MIN_CASES, cases
