"""Reading data files (JSONL, JSON list, CSV) and turning records into conversations.

Every record keeps the line it started on, so an error names file, line and field.
Formats (auto-detected from the first record's fields):
  alpaca        instruction, output (+ optional input, system)
  input_target  input, target
  messages      messages: [{role, content}, ...]
  sharegpt      conversations: [{from, value}, ...]
  text          text (plain language modelling)
  classification text, label
  preference    prompt, chosen, rejected (+ optional system): answer pairs (tunelab.data.preference)
  sharegpt_preference  conversations + chosen/rejected turns (LLaMA-Factory's preference layout)
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError, did_you_mean

PREFERENCE_FORMATS = ("preference", "sharegpt_preference")
FORMATS = ("alpaca", "input_target", "messages", "sharegpt", "text", "classification", *PREFERENCE_FORMATS)
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
MAX_JSON_DEPTH = 64  # deeper nesting than any real record; guards the parser's recursion


@dataclass
class Example:
    """One normalised record: a conversation, plain text, or text with a label."""

    line: int
    messages: list[dict] | None = None
    text: str | None = None
    label: object | None = None
    source: dict = field(default_factory=dict, repr=False)


class NoValidRecords(DataError):
    """Every record was invalid (with skip_invalid): the message gives the first reason, `problems` all."""

    def __init__(self, path, problems: list[str]):
        first = problems[0] if problems else "no records"
        super().__init__(path, None, f"no valid records ({len(problems)} invalid; the first: {first})")
        self.problems = problems


@dataclass
class Record:
    line: int
    data: dict


def _decode(path: Path, raw: bytes, line: int) -> str:
    """Decode one line (line > 0) or the whole file (line 0: the error names the line of the bad byte)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if line:
            raise DataError(path, line, f"not valid UTF-8 ({exc.reason} at byte {exc.start} of the line)") from None
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        raise DataError(
            path,
            raw.count(b"\n", 0, exc.start) + 1,
            f"not valid UTF-8 ({exc.reason} at byte {exc.start - line_start} of the line)",
        ) from None


def _check_depth(obj, path, line, depth=0):
    if depth > MAX_JSON_DEPTH:
        raise DataError(path, line, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(obj, dict):
        for v in obj.values():
            _check_depth(v, path, line, depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            _check_depth(v, path, line, depth + 1)


def _parse_json(text: str, path: Path, line: int):
    try:
        return json.loads(text)
    except RecursionError:
        raise DataError(path, line, f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise DataError(path, line + exc.lineno - 1, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except ValueError as exc:  # not a JSONDecodeError: an integer past Python's 4300-digit str->int limit
        raise DataError(path, line, f"invalid JSON: {str(exc).split(';')[0]}") from None


def _read_jsonl(path: Path, raw: bytes, problems: list | None = None) -> list[Record]:
    """With a `problems` list, lines that do not parse are recorded there and skipped (skip_invalid)."""
    records = []
    for number, line_bytes in enumerate(raw.split(b"\n"), start=1):
        try:
            text = _decode(path, line_bytes, number)
            if number == 1:
                text = text.removeprefix("\ufeff")
            text = text.strip()
            if not text:
                continue
            obj = _parse_json(text, path, number)
            if not isinstance(obj, dict):
                raise DataError(path, number, f"each line must be a JSON object, got {type(obj).__name__}")
            _check_depth(obj, path, number)
        except DataError as exc:
            if problems is None:
                raise
            problems.append(str(exc))
            continue
        records.append(Record(number, obj))
    return records


def _read_json(path: Path, raw: bytes) -> list[Record]:
    text = _decode(path, raw, 0).removeprefix("\ufeff")
    stripped = text.lstrip()
    if not stripped.startswith("["):
        if stripped.startswith("{") and "\n{" in text:
            return _read_jsonl(path, raw)  # JSON Lines saved with a .json name
        obj = _parse_json(text, path, 1)
        if isinstance(obj, dict):  # a single object, or {"data": [...]}
            for key in ("data", "examples", "records"):
                if isinstance(obj.get(key), list):
                    return [Record(1, r) for r in obj[key] if isinstance(r, dict)]
            return [Record(1, obj)]
        raise DataError(path, 1, "expected a JSON list of objects")
    # walk the list element by element so each record knows its line
    decoder = json.JSONDecoder()
    records = []
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise DataError(path, text.count("\n", 0, pos) + 1, "invalid JSON: the list is not closed with ']'")
        if text[pos] == "]":
            break
        line = text.count("\n", 0, pos) + 1
        try:
            obj, end = decoder.raw_decode(text, pos)
        except RecursionError:
            raise DataError(path, line, f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
        except json.JSONDecodeError as exc:
            raise DataError(path, exc.lineno, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
        except ValueError as exc:  # an integer past Python's 4300-digit str->int limit
            raise DataError(path, line, f"invalid JSON: {str(exc).split(';')[0]}") from None
        if not isinstance(obj, dict):
            raise DataError(path, line, f"each list item must be a JSON object, got {type(obj).__name__}")
        _check_depth(obj, path, line)
        records.append(Record(line, obj))
        pos = end
    return records


def _read_csv(path: Path, raw: bytes) -> list[Record]:
    text = _decode(path, raw, 0).removeprefix("\ufeff")
    # feed csv lines split on "\n" only, so reader.line_num counts lines as editors and the JSON loaders do
    # (io.StringIO would also break at a bare "\r" inside a quoted field)
    reader = csv.reader(line + "\n" for line in text.split("\n"))
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as exc:
        raise DataError(path, 1, f"invalid CSV: {exc}") from None
    header = [h.strip() for h in header]
    records = []
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataError(path, start, f"invalid CSV: {exc}") from None
        if row and any(cell.strip() for cell in row):
            if len(row) != len(header):
                raise DataError(path, start, f"expected {len(header)} columns ({', '.join(header)}), got {len(row)}")
            records.append(Record(start, dict(zip(header, row))))
        start = reader.line_num + 1
    return records


def read_records(path: str | Path, problems: list | None = None) -> list[Record]:
    """Read a JSONL / JSON / CSV file into records with their line numbers.

    With a `problems` list, unparseable JSONL lines are skipped and described there."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, None, "file not found") from None
    except IsADirectoryError:
        raise DataError(path, None, "is a directory, expected a data file") from None
    except OSError as exc:  # no permission, a symlink loop, an I/O error
        raise DataError(path, None, f"cannot read the file: {exc.strerror or exc}") from None
    # checked first: an empty .json would otherwise be reported as invalid JSON
    if not raw.removeprefix(b"\xef\xbb\xbf").strip():
        raise DataError(path, None, "no records found (the file is empty)")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        records = _read_csv(path, raw)
    elif suffix == ".json":
        records = _read_json(path, raw)
    else:
        records = _read_jsonl(path, raw, problems)
    if not records:
        if problems:
            raise NoValidRecords(path, problems)
        raise DataError(path, None, "no records found")
    return records


def _format_of(keys: set) -> str | None:
    if "chosen" in keys and "rejected" in keys:
        if "conversations" in keys:
            return "sharegpt_preference"
        if "prompt" in keys:
            return "preference"
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "input" in keys and "target" in keys:
        return "input_target"
    if "text" in keys and "label" in keys:
        return "classification"
    if "text" in keys:
        return "text"
    return None


def detect_format(records: list[Record], path) -> str:
    """The format of the first record whose fields fit one (the first record may be the malformed one)."""
    for record in records:
        fmt = _format_of(set(record.data))
        if fmt:
            return fmt
    record = records[0]
    keys = set(record.data)
    raise DataError(
        path,
        record.line,
        f"cannot detect the data format from fields {sorted(keys)}; expected one of: "
        "instruction/output (alpaca), input/target, messages, conversations (sharegpt), text, text/label, "
        "prompt/chosen/rejected (preference), conversations/chosen/rejected (sharegpt_preference)",
    )


def _string(record: Record, key: str, path, required=True, allow_empty=False) -> str | None:
    if key not in record.data or record.data[key] is None:
        if required:
            raise DataError(path, record.line, "missing", field=key)
        return None
    value = record.data[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(path, record.line, f"expected a string, got {type(value).__name__}", field=key)
    if required and not allow_empty and not value.strip():
        raise DataError(path, record.line, "is empty", field=key)
    return value


def _turns(
    record: Record, key: str, path, role_key: str, content_key: str, role_map: dict, need_assistant: bool = True
) -> list[dict]:
    turns = record.data.get(key)
    if not isinstance(turns, list) or not turns:
        raise DataError(path, record.line, "expected a non-empty list of turns", field=key)
    messages = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(path, record.line, f"expected an object, got {type(turn).__name__}", field=where)
        role = turn.get(role_key)
        if not isinstance(role, str) or role not in role_map:  # a list/dict role is unhashable: TypeError on `in`
            raise DataError(
                path,
                record.line,
                f"unknown role {role!r}; expected one of {sorted(role_map)}",
                field=f"{where}.{role_key}",
            )
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise DataError(path, record.line, "missing or not a string", field=f"{where}.{content_key}")
        messages.append({"role": role_map[role], "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(path, record.line, "no assistant turn to learn from", field=key)
    return messages


def to_example(record: Record, fmt: str, path) -> Example:
    """Normalise one record of a known format; raises DataError naming the field."""
    d = record.data
    if fmt in PREFERENCE_FORMATS:
        from .preference import to_pair  # preference.py builds on this module

        return to_pair(record, fmt, path)
    if fmt == "alpaca":
        instruction = _string(record, "instruction", path)
        extra = _string(record, "input", path, required=False)
        output = _string(record, "output", path)
        system = _string(record, "system", path, required=False)
        user = instruction + (f"\n\n{extra}" if extra and extra.strip() else "")
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user},
            {"role": "assistant", "content": output},
        ]
        return Example(record.line, messages=messages, source=d)
    if fmt == "input_target":
        return Example(
            record.line,
            messages=[
                {"role": "user", "content": _string(record, "input", path)},
                {"role": "assistant", "content": _string(record, "target", path)},
            ],
            source=d,
        )
    if fmt == "messages":
        roles = {r: r for r in ROLES}
        return Example(record.line, messages=_turns(record, "messages", path, "role", "content", roles), source=d)
    if fmt == "sharegpt":
        return Example(
            record.line, messages=_turns(record, "conversations", path, "from", "value", _SHAREGPT_ROLES), source=d
        )
    if fmt == "text":
        return Example(record.line, text=_string(record, "text", path), source=d)
    if fmt == "classification":
        if "label" not in d or d["label"] is None or (isinstance(d["label"], str) and not d["label"].strip()):
            raise DataError(path, record.line, "missing", field="label")
        if not isinstance(d["label"], (str, int)) or isinstance(d["label"], bool):
            raise DataError(
                path, record.line, f"expected a string or integer, got {type(d['label']).__name__}", field="label"
            )
        return Example(record.line, text=_string(record, "text", path), label=d["label"], source=d)
    raise DataError(path, None, f"unknown data format '{fmt}'; choose from auto, {', '.join(FORMATS)}")


def load_examples(
    path: str | Path, fmt: str = "auto", skip_invalid: bool = False
) -> tuple[list[Example], str, list[str]]:
    """Read and normalise a data file. Returns (examples, format, problems skipped)."""
    path = Path(path)
    if fmt != "auto" and fmt not in FORMATS:
        hint = did_you_mean(fmt, FORMATS)
        raise DataError(path, None, f"unknown data format '{fmt}'{hint}; choose from auto, {', '.join(FORMATS)}")
    problems: list[str] = []
    records = read_records(path, problems if skip_invalid else None)
    if fmt == "auto":
        fmt = detect_format(records, path)
    examples = []
    for record in records:
        try:
            examples.append(to_example(record, fmt, path))
        except DataError as exc:
            if not skip_invalid:
                raise
            problems.append(str(exc))
    if not examples:
        raise NoValidRecords(path, problems)
    return examples, fmt, problems
