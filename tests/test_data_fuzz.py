"""Property-based fuzzing of the data loaders (tunelab.data.formats).

Properties:
  * any file (.jsonl / .json / .csv), arbitrary bytes or structured near-misses, either loads into
    examples or raises DataError (message starting with FILE[:LINE]); never another exception;
  * valid alpaca records round-trip through JSONL, a JSON list and CSV with the exact strings and
    the line each record starts on;
  * a record missing `output` is reported at its own line, naming the field.

Budget: 500 + 600 bytes/text + 600 + 400 + 400 structured + 3 x 250 round-trip + 200 location = 3450
files (>= MIN_FILES = 3000); `test_generated_file_count` checks the count when the whole module ran.
About 35 s on two cores.
"""

from __future__ import annotations

import csv
import io
import json
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tunelab.data.formats import FORMATS, ROLES, load_examples
from tunelab.errors import DataError

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MIN_FILES = 3000
KEYS = ("instruction", "input", "output", "system", "target", "messages", "conversations", "text", "label")
SUFFIXES = (".jsonl", ".json", ".csv")

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")  # the long-token files

files_written = 0
tests_run: set[str] = set()


# --- helpers ---------------------------------------------------------------------------------------


def write(directory: str, name: str, data: bytes) -> Path:
    global files_written
    path = Path(directory) / name
    path.write_bytes(data)
    files_written += 1
    return path


def line_count(raw: bytes) -> int:
    """Lines in the file, counting \\r\\n, \\r and \\n as breaks (the csv reader's view; >= the \\n count)."""
    return len(re.split(rb"\r\n|\r|\n", raw))


def examples_or_data_error(path: Path, fmt: str = "auto", skip_invalid: bool = False):
    """The fuzz property: load_examples returns well-formed examples or raises DataError; never anything else."""
    raw = path.read_bytes()
    try:
        examples, got_fmt, problems = load_examples(path, fmt, skip_invalid)
    except DataError as exc:
        event("DataError")  # outcome shares: pytest --hypothesis-show-statistics
        message = str(exc)
        assert message.startswith(str(path)), message
        if exc.line is not None:
            assert message.startswith(f"{path}:{exc.line}"), message
            assert 1 <= exc.line <= line_count(raw), (exc.line, message)
        return None
    event(f"loaded ({got_fmt})")
    assert examples
    assert got_fmt in FORMATS
    assert all(isinstance(p, str) for p in problems)
    for ex in examples:
        assert isinstance(ex.line, int) and 1 <= ex.line <= line_count(raw)
        if ex.messages is not None:
            assert ex.messages
            for m in ex.messages:
                assert m["role"] in ROLES and isinstance(m["content"], str)
        else:
            assert isinstance(ex.text, str)
    return examples


def run_fuzz(name: str, data: bytes, fmt: str = "auto", skip_invalid: bool = False):
    with tempfile.TemporaryDirectory() as d:
        examples_or_data_error(write(d, name, data), fmt, skip_invalid)


# --- strategies ------------------------------------------------------------------------------------

odd_text = st.sampled_from(
    [
        "",
        " ",
        "\t",
        "\n",
        "\r\n",
        "你好，世界",
        "😀🎉",
        "\u2028",
        "\u0085",
        "\ufeff",
        "\x00",
        '"',
        ",",
        "a\r\nb",
        "  x  ",
    ]
)
texts = st.one_of(odd_text, st.text(max_size=30), st.text(alphabet='你好世界😀🎉 \n\r\t",', max_size=20))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.sampled_from(KEYS), children, max_size=4)
    ),
    max_leaves=20,
)
roles = st.one_of(
    st.sampled_from(["system", "user", "assistant", "human", "gpt", "bot", "", None]),
    json_values,  # includes unhashable lists/dicts
)
turn = st.fixed_dictionaries(
    {},
    optional={"role": roles, "content": json_values | texts, "from": roles, "value": json_values | texts},
)
field_values = st.one_of(scalars, json_values, st.lists(turn, max_size=4), st.lists(json_values, max_size=3))
records = st.fixed_dictionaries({}, optional={k: field_values for k in KEYS}) | st.dictionaries(
    st.sampled_from(KEYS) | st.text(max_size=6), field_values, max_size=6
)
# well-formed conversation records, so that deeper validation runs often
turns_records = st.one_of(
    st.builds(lambda ts: {"messages": ts}, st.lists(turn, min_size=1, max_size=4)),
    st.builds(lambda ts: {"conversations": ts}, st.lists(turn, min_size=1, max_size=4)),
)
# nearly valid records of each format (mostly strings, mostly known roles), so that files often load
solid_text = st.text(st.characters(blacklist_categories=("Zs", "Zl", "Zp", "Cc", "Cs")), min_size=1, max_size=20)
mostly_text = st.one_of(*[solid_text] * 8, texts, field_values)
good_roles = st.sampled_from(["system", "user", "assistant", "human", "gpt"])
mostly_turns = st.lists(
    st.one_of(
        st.fixed_dictionaries({"role": good_roles, "content": mostly_text}),
        st.fixed_dictionaries({"from": good_roles, "value": mostly_text}),
        turn,
    ),
    min_size=1,
    max_size=4,
)
PLAUSIBLE = (
    st.fixed_dictionaries(
        {"instruction": mostly_text, "output": mostly_text}, optional={"input": mostly_text, "system": mostly_text}
    ),
    st.fixed_dictionaries({"input": mostly_text, "target": mostly_text}),
    st.fixed_dictionaries({"messages": mostly_turns}),
    st.fixed_dictionaries({"conversations": mostly_turns}),
    st.fixed_dictionaries(
        {"text": mostly_text}, optional={"label": st.one_of(st.integers(-3, 9), texts, field_values)}
    ),
)
plausible_records = st.one_of(*PLAUSIBLE)
any_record = st.one_of(records, turns_records, plausible_records, plausible_records)

# tokens that stress the parsers: long strings, numbers past int-string limits, deep nesting
long_tokens = st.one_of(
    st.integers(100, 200_000).map(lambda n: json.dumps("x" * n)),
    st.integers(4000, 6000).map(lambda n: "1" * n),
    st.integers(4000, 6000).map(lambda n: "-" + "9" * n),
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.integers(100, 3000).map(lambda n: "[" * n),
)


@st.composite
def json_line(draw, main=any_record):
    kind = draw(st.sampled_from(["main"] * 8 + ["record"] * 4 + ["value", "garbage", "blank", "blank", "long"]))
    if kind in ("main", "record"):
        return json.dumps(draw(main if kind == "main" else any_record), ensure_ascii=draw(st.booleans()))
    if kind == "value":
        return json.dumps(draw(json_values), ensure_ascii=draw(st.booleans()))
    if kind == "garbage":
        return draw(st.text(alphabet='{}[]":,0123456789.eE-+ truefalsnil\\\tx你😀', max_size=40))
    if kind == "blank":
        return draw(st.sampled_from(["", " ", "\t", "\r", " \t ", "\u3000"]))
    key = draw(st.sampled_from(KEYS))
    other = draw(st.sampled_from(KEYS))
    return '{"%s": %s, "%s": "ok"}' % (key, draw(long_tokens), other)


def frame(draw, body: str) -> bytes:
    """Optional BOM, encoded as UTF-8."""
    return (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + body.encode("utf-8", "surrogatepass")


@st.composite
def jsonl_files(draw):
    main = draw(st.sampled_from(PLAUSIBLE))  # most lines of one format, as in a real file
    lines = draw(st.lists(json_line(main), min_size=1, max_size=6))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    body = newline.join(lines) + (newline if draw(st.booleans()) else "")
    return frame(draw, body)


@st.composite
def json_files(draw):
    main = draw(st.sampled_from(PLAUSIBLE))
    items = draw(st.lists(st.one_of(*[main] * 6, any_record, json_values), max_size=6))
    indent = draw(st.sampled_from([None, 0, 1, 2, 4, "\t"]))
    ascii_ = draw(st.booleans())
    shape = draw(st.sampled_from(["list", "list", "wrapped", "single", "lines", "value"]))
    if shape == "list":
        body = json.dumps(items, indent=indent, ensure_ascii=ascii_)
    elif shape == "wrapped":
        body = json.dumps(
            {draw(st.sampled_from(["data", "examples", "records", "x"])): items}, indent=indent, ensure_ascii=ascii_
        )
    elif shape == "single":
        body = json.dumps(draw(any_record), indent=indent, ensure_ascii=ascii_)
    elif shape == "lines":  # JSON Lines saved as .json
        body = "\n".join(json.dumps(r, ensure_ascii=ascii_) for r in draw(st.lists(any_record, min_size=1, max_size=4)))
    else:
        body = json.dumps(draw(json_values), indent=indent, ensure_ascii=ascii_)
    damage = draw(st.sampled_from(["none"] * 4 + ["truncate", "insert", "long", "crlf", "crlf"]))
    if damage == "truncate" and body:
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif damage == "insert":
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.text(alphabet='{}[]",:\n 1x', min_size=1, max_size=5)) + body[at:]
    elif damage == "long":
        body = "[" + ",\n".join([body or "1", '{"text": %s}' % draw(long_tokens)]) + "]"
    elif damage == "crlf":
        body = body.replace("\n", "\r\n")
    return frame(draw, draw(st.sampled_from(["", "\n", "  \n\n"])) + body)


csv_cells = st.one_of(
    *[solid_text] * 6,
    texts,
    st.text(alphabet='a,"\n\r 你😀\t', max_size=15),
    st.integers().map(str),
)
long_cell = st.integers(131_000, 140_000).map(lambda n: "y" * n)  # around csv's field size limit
csv_headers = st.one_of(
    st.sampled_from(
        [
            ["instruction", "output"],
            ["instruction", "input", "output", "system"],
            ["input", "target"],
            ["text"],
            ["text", "label"],
            ["label", "text", "extra"],
            ["messages"],
            [" instruction ", "output "],
        ]
    ),
    st.sampled_from([["instruction", "output"], ["text"], ["input", "target"]]),
    st.lists(st.sampled_from(KEYS) | st.text(alphabet='ab ,"\n', max_size=5), min_size=0, max_size=5),
)


@st.composite
def csv_files(draw):
    header = draw(csv_headers)
    width = len(header)
    rows = draw(
        st.lists(
            st.one_of(
                *[st.lists(csv_cells, min_size=width, max_size=width)] * 15,  # right column count
                st.lists(csv_cells, max_size=width + 2),  # random column count
            ),
            min_size=1,
            max_size=6,
        )
    )
    if rows and draw(st.integers(0, 9)) == 0:
        row = draw(st.sampled_from(rows))
        if row:
            row[draw(st.integers(0, len(row) - 1))] = draw(long_cell)
    newline = draw(st.sampled_from(["\r\n", "\n", "\r"]))
    if draw(st.integers(0, 3)):
        buf = io.StringIO()
        # QUOTE_MINIMAL only quotes newlines that are in the lineterminator: "\r\n" or else QUOTE_ALL
        quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL])) if newline == "\r\n" else csv.QUOTE_ALL
        writer = csv.writer(buf, lineterminator=newline, quoting=quoting)
        for row in [header, *rows]:
            writer.writerow(row)
        body = buf.getvalue()
    else:  # hand-joined: unbalanced quotes, stray newlines, blank lines
        sep = draw(st.sampled_from([newline, newline + newline, newline + " " + newline]))
        body = sep.join(",".join(row) for row in [header, *rows])
    if draw(st.integers(0, 3)) == 0 and body:
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.sampled_from(['"', '""', "\x00", "\n", '"\n"', ",", "\ufeff"])) + body[at:]
    return frame(draw, body)


load_options = st.tuples(st.sampled_from(("auto",) * 12 + FORMATS), st.booleans())


# --- 1. arbitrary bytes --------------------------------------------------------------------------


@settings(FUZZ, max_examples=500)
@given(data=st.binary(max_size=2000), suffix=st.sampled_from(SUFFIXES), options=load_options)
def test_arbitrary_bytes_load_or_data_error(data, suffix, options):
    tests_run.add("bytes")
    run_fuzz("data" + suffix, data, *options)


syntax_text = st.text(
    alphabet=st.sampled_from('{}[]",:\n\r\t \\0123456789.eE+-truefalsnxy你😀\ufeff') | st.characters(), max_size=400
)


@settings(FUZZ, max_examples=600)
@given(text=syntax_text, bom=st.booleans(), suffix=st.sampled_from(SUFFIXES), options=load_options)
def test_syntax_heavy_text_load_or_data_error(text, bom, suffix, options):
    tests_run.add("syntax")
    run_fuzz("data" + suffix, (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8", "surrogatepass"), *options)


# --- 2. structured near-misses -----------------------------------------------------------------


@settings(FUZZ, max_examples=600)
@given(data=jsonl_files(), options=load_options)
def test_structured_jsonl_load_or_data_error(data, options):
    tests_run.add("jsonl")
    run_fuzz("data.jsonl", data, *options)


@settings(FUZZ, max_examples=400)
@given(data=json_files(), options=load_options)
def test_structured_json_load_or_data_error(data, options):
    tests_run.add("json")
    run_fuzz("data.json", data, *options)


@settings(FUZZ, max_examples=400)
@given(data=csv_files(), options=load_options)
def test_structured_csv_load_or_data_error(data, options):
    tests_run.add("csv")
    run_fuzz("data.csv", data, *options)


# --- 3. round trip -------------------------------------------------------------------------------

required_text = st.text(min_size=1).filter(lambda s: s.strip())
alpaca_records = st.fixed_dictionaries(
    {"instruction": required_text, "output": required_text},
    optional={"input": st.text(), "system": st.text()},
)


def expected_messages(record: dict) -> list[tuple[str, str]]:
    extra = record.get("input", "")
    user = record["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
    system = [("system", record["system"])] if record.get("system") else []
    return system + [("user", user), ("assistant", record["output"])]


def jsonl_text(draw, rows):
    """JSONL with random blank lines, CRLF and BOM; returns (bytes, line of each record)."""
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    lines, starts = [], []
    for row in rows:
        lines += [draw(st.sampled_from(["", " ", "\t", "\r"])) for _ in range(draw(st.integers(0, 2)))]
        lines.append(json.dumps(row, ensure_ascii=False))
        starts.append(len(lines))
    lines += [""] * draw(st.integers(0, 2))
    return frame(draw, newline.join(lines)), starts


def json_list_text(draw, rows):
    """A (pretty-printed or compact) JSON list; returns (bytes, line each record's '{' is on)."""
    indent = draw(st.sampled_from([None, 2, 4]))
    body, starts = "[" + draw(st.sampled_from(["", "\n", "\n\n  "])), []
    for i, row in enumerate(rows):
        if i:
            body += "," + draw(st.sampled_from(["", " ", "\n", "\n\n", "\r\n  "]))
        starts.append(body.count("\n") + 1)
        body += json.dumps(row, ensure_ascii=False, indent=indent)
    body += draw(st.sampled_from(["]", "\n]", "\n]\n"]))
    return frame(draw, body), starts


def csv_text(draw, rows):
    """CSV via the csv module; returns (bytes, physical line each row starts on, counting \\n)."""
    columns = ["instruction", "input", "output", "system"]
    buf = io.StringIO(newline="")
    # QUOTE_MINIMAL quotes a field only for the characters of its own lineterminator, so with "\n" a
    # field holding a bare "\r" would be written unquoted (an ambiguous file): QUOTE_ALL there.
    terminator, quoting = draw(
        st.sampled_from([("\r\n", csv.QUOTE_MINIMAL), ("\n", csv.QUOTE_ALL), ("\r\n", csv.QUOTE_ALL)])
    )
    writer = csv.writer(buf, lineterminator=terminator, quoting=quoting)
    writer.writerow(columns)
    starts = []
    for row in rows:
        starts.append(buf.getvalue().count("\n") + 1)
        writer.writerow([row.get(c, "") for c in columns])
    return frame(draw, buf.getvalue()), starts


@settings(FUZZ, max_examples=250)  # three files each
@given(data=st.data(), rows=st.lists(alpaca_records, min_size=1, max_size=5))
def test_alpaca_round_trip(data, rows):
    tests_run.add("roundtrip")
    want = [expected_messages(r) for r in rows]
    with tempfile.TemporaryDirectory() as d:
        for name, build in (("data.jsonl", jsonl_text), ("data.json", json_list_text), ("data.csv", csv_text)):
            raw, starts = build(data.draw, rows)
            examples, fmt, problems = load_examples(write(d, name, raw))
            assert fmt == "alpaca" and problems == []
            assert [[(m["role"], m["content"]) for m in ex.messages] for ex in examples] == want, name
            assert [ex.line for ex in examples] == starts, name


def test_csv_line_numbers_with_bare_cr():
    """A bare \\r inside a quoted CSV field is not a line break: line numbers count \\n, as editors do."""
    raw = b'instruction,output\r\n"a\rb",x\r\nc,y\r\n'
    with tempfile.TemporaryDirectory() as d:
        examples, _, _ = load_examples(write(d, "data.csv", raw))
    assert [ex.line for ex in examples] == [2, 3]


# --- 4. error location ---------------------------------------------------------------------------


@settings(FUZZ, max_examples=200)
@given(data=st.data(), rows=st.lists(alpaca_records, min_size=2, max_size=8))
def test_missing_output_reported_at_its_line(data, rows):
    tests_run.add("location")
    bad = data.draw(st.integers(0, len(rows) - 1))
    rows = [dict(r) for r in rows]
    del rows[bad]["output"]
    raw, starts = jsonl_text(data.draw, rows)
    k = starts[bad]
    with tempfile.TemporaryDirectory() as d:
        path = write(d, "data.jsonl", raw)
        try:
            load_examples(path)
        except DataError as exc:
            message = str(exc)
            assert f":{k}:" in message and "output" in message, (k, message)
            assert exc.line == k and exc.field == "output"
        else:
            raise AssertionError(f"no DataError for the record without output on line {k}")


# --- budget --------------------------------------------------------------------------------------

ALL_FUZZ = {"bytes", "syntax", "jsonl", "json", "csv", "roundtrip", "location"}


def test_generated_file_count():
    """At least MIN_FILES files were loaded when the whole module ran (skipped for a partial run)."""
    if tests_run != ALL_FUZZ:
        pytest.skip(f"only {sorted(tests_run)} ran")
    print(f"\nfuzz files written and loaded: {files_written}")
    assert files_written >= MIN_FILES, files_written
