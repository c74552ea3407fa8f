"""Reading data files (JSONL, JSON list, CSV, Parquet, a folder saved by `datasets.save_to_disk`) and turning
records into conversations.

Every record keeps the line it started on (a table's: its 0-based row), so an error names file, line and field.
Formats (auto-detected from the first record's fields), with LLaMA-Factory's layouts:
  alpaca        instruction, output (+ optional input, system, history: [[user, assistant], ...])
  input_target  input, target
  messages      messages: [{role, content, tool_calls}, ...] (+ optional tools)
  sharegpt      conversations: [{from, value}, ...] (+ optional system, tools); from: human, gpt, system,
                function_call (a JSON {name, arguments}: an assistant tool call), observation (the tool's result)
  text          text (plain language modelling)
  classification text, label
A field the format does not read is not dropped silently: it is listed on the Example (`unknown_fields`),
reported by `tunelab data check` and warned about once in training.
  preference    prompt, chosen, rejected (+ optional system): answer pairs (tunelab.data.preference)
  sharegpt_preference  conversations + chosen/rejected turns (LLaMA-Factory's preference layout)
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError, Row, did_you_mean

PREFERENCE_FORMATS = ("preference", "sharegpt_preference")
FORMATS = ("alpaca", "input_target", "messages", "sharegpt", "text", "classification", *PREFERENCE_FORMATS)
ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
# the fields each format reads (record level, then per turn); anything else is reported as unknown
KNOWN_FIELDS = {
    "alpaca": {"instruction", "input", "output", "system", "history"},
    "input_target": {"input", "target"},
    "messages": {"messages", "tools"},
    "sharegpt": {"conversations", "system", "tools"},
    "text": {"text"},
    "classification": {"text", "label"},
    "preference": {"prompt", "chosen", "rejected", "system"},
    "sharegpt_preference": {"conversations", "chosen", "rejected", "system", "tools"},
}
_TURN_FIELDS = {"messages": {"role", "content", "tool_calls", "name", "tool_call_id"}, "sharegpt": {"from", "value"}}
MAX_JSON_DEPTH = 64  # deeper nesting than any real record; guards the parser's recursion


@dataclass
class Example:
    """One normalised record: a conversation, plain text, or text with a label."""

    line: int
    messages: list[dict] | None = None
    text: str | None = None
    label: object | None = None
    source: dict = field(default_factory=dict, repr=False)
    tools: list[dict] | None = None  # function schemas for the chat template ({"type": "function", "function": ...})
    unknown_fields: list[str] = field(default_factory=list)  # fields of the record no format reads: reported


def unknown_field_lines(examples: list[Example]) -> dict[str, list[int]]:
    """Each ignored field -> the lines of the records that carry it."""
    found: dict[str, list[int]] = {}
    for ex in examples:
        for name in ex.unknown_fields:
            found.setdefault(name, []).append(ex.line)
    return found


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


def _json_constant(name: str):
    """Python's json reads NaN and Infinity, which JSON has not. NaN is how pandas writes an empty cell
    (`to_json`, `json.dumps(df.to_dict("records"))`): read it as null, not as the text "nan"."""
    if name == "NaN":
        return None
    raise ValueError(f"{name} is not a JSON value")


def _unique_keys(pairs: list) -> dict:
    """An object whose key repeats would keep the last value unseen (`{"output": "a", "output": "b"}`)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {repeated!r} appears twice in one object")
    return obj


_DECODER = json.JSONDecoder(parse_constant=_json_constant, object_pairs_hook=_unique_keys)


def _parse_json(text: str, path: Path, line: int):
    try:
        return _DECODER.decode(text)
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
        try:  # one parse: a single object, or the first line of JSON Lines saved with a .json name
            obj = _DECODER.decode(text)
        except json.JSONDecodeError as exc:
            if stripped.startswith("{") and exc.msg == "Extra data":
                return _read_jsonl(path, raw)
            obj = _parse_json(text, path, 1)  # raises, naming the line
        except (ValueError, RecursionError):  # NaN's kin, a huge integer, deep nesting: the same
            obj = _parse_json(text, path, 1)
        if isinstance(obj, dict):  # a single object, or {"data": [...]}
            for key in ("data", "examples", "records"):
                if isinstance(obj.get(key), list):
                    for i, item in enumerate(obj[key]):
                        if not isinstance(item, dict):
                            raise DataError(
                                path, 1, f"must be a JSON object, got {type(item).__name__}", field=f"{key}[{i}]"
                            )
                    return [Record(1, r) for r in obj[key]]
            return [Record(1, obj)]
        raise DataError(path, 1, "expected a JSON list of objects")

    # walk the list element by element so each record knows its line
    def line_of(at: int) -> int:
        return text.count("\n", 0, at) + 1

    records = []
    pos = _skip_space(text, text.index("[") + 1)
    closed = pos < len(text) and text[pos] == "]"
    while not closed:
        if pos >= len(text):
            raise DataError(path, line_of(pos), "invalid JSON: the list is not closed with ']'")
        line = line_of(pos)
        try:
            obj, end = _DECODER.raw_decode(text, pos)
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
        pos = _skip_space(text, end)
        closed = pos < len(text) and text[pos] == "]"
        if not closed and pos < len(text) and text[pos] != ",":
            raise DataError(path, line_of(pos), "invalid JSON: expected ',' or ']' after a list item")
        pos = _skip_space(text, pos + 1) if not closed else pos
    if text[pos + 1 :].strip():
        raise DataError(
            path,
            line_of(_skip_space(text, pos + 1)),
            "invalid JSON: more after the list's closing ']' (two files joined? make it one list, or JSON Lines)",
        )
    return records


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


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
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:  # a dict would keep the last column of each name and drop the others unseen
        raise DataError(path, 1, f"column {', '.join(map(repr, repeated))} appears more than once in the header")
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


def _drop_nulls(value):
    """Arrow gives every row every column (and every struct every field): null where the record had none.
    Dropping those keys makes a row read like the JSON record it came from (a null list item stays)."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _table_records(path: Path, rows: list[dict]) -> list[Record]:
    records = []
    for index, row in enumerate(rows):
        record = Record(Row(index), _drop_nulls(row))
        _check_depth(record.data, path, record.line)
        records.append(record)
    return records


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(path, None, f"not a readable Parquet file ({' '.join(str(exc).split())[:200]})") from None
    return _table_records(path, table.to_pylist())


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `datasets` `save_to_disk` (a Dataset, or a DatasetDict of splits)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _read_saved_dataset(path: Path) -> list[Record]:
    if not is_saved_dataset(path):
        raise DataError(
            path, None, "is a folder, but not one saved by datasets.save_to_disk (no state.json or dataset_dict.json)"
        )
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - whatever a damaged folder raises (missing shard, bad JSON, Arrow)
        raise DataError(path, None, f"cannot load the saved dataset ({' '.join(str(exc).split())[:200]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            splits = ", ".join(ds) or "none"
            raise DataError(
                path,
                None,
                f"a DatasetDict with splits {splits}: name one split's folder (e.g. {path / next(iter(ds), 'train')})",
            )
        ds = next(iter(ds.values()))
    return _table_records(path, ds.to_list())


def is_table(path) -> bool:
    """Records stored as a table (Parquet, a saved dataset): they are addressed by row, not by line."""
    path = Path(path)
    return path.suffix.lower() == ".parquet" or path.is_dir()


def read_records(path: str | Path, problems: list | None = None) -> list[Record]:
    """Read a JSONL / JSON / CSV / Parquet file or a saved dataset folder into records with their line numbers
    (a table's: their rows).

    With a `problems` list, unparseable JSONL lines are skipped and described there."""
    path = Path(path)
    if path.is_dir():
        records = _read_saved_dataset(path)
    elif path.suffix.lower() == ".parquet" and path.is_file():
        records = _read_parquet(path)
    else:
        records = _read_text_records(path, problems)
    if not records:
        if problems:
            raise NoValidRecords(path, problems)
        raise DataError(path, None, "no records found")
    return records


def _read_text_records(path: Path, problems: list | None) -> list[Record]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, None, "file not found") from None
    except OSError as exc:  # no permission, a symlink loop, an I/O error
        raise DataError(path, None, f"cannot read the file: {exc.strerror or exc}") from None
    # checked first: an empty .json would otherwise be reported as invalid JSON
    if not raw.removeprefix(b"\xef\xbb\xbf").strip():
        raise DataError(path, None, "no records found (the file is empty)")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path, raw)
    if suffix == ".json":
        return _read_json(path, raw)
    return _read_jsonl(path, raw, problems)


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


def _tool_calls(record: Record, value: str, path, where: str) -> list[dict]:
    """A sharegpt function_call value (JSON {name, arguments}, or a list of them) as chat-template tool_calls."""
    try:
        calls = json.loads(value)
    except (json.JSONDecodeError, RecursionError, ValueError):
        raise DataError(path, record.line, "a function_call must be JSON {name, arguments}", field=where) from None
    calls = calls if isinstance(calls, list) else [calls]
    out = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise DataError(path, record.line, "a function_call must be JSON {name, arguments}", field=where)
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # OpenAI style: the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except (json.JSONDecodeError, RecursionError, ValueError):
                raise DataError(path, record.line, "arguments are not valid JSON", field=where) from None
        out.append({"type": "function", "function": {"name": call["name"], "arguments": arguments}})
    return out


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
        calls = turn.get("tool_calls") if key == "messages" else None
        if calls is not None:  # an assistant turn that calls tools: its content may be empty
            if role != "assistant" or not isinstance(calls, list) or not calls:
                raise DataError(
                    path, record.line, "expected a non-empty list on an assistant turn", field=f"{where}.tool_calls"
                )
            content = content if content is not None else ""
        if key == "messages" and isinstance(content, list):
            content = _text_parts(record, content, path, f"{where}.{content_key}")
        if not isinstance(content, str):
            raise DataError(path, record.line, "missing or not a string", field=f"{where}.{content_key}")
        message = {"role": role_map[role], "content": content}
        if role == "function_call":
            message = {"role": "assistant", "content": "", "tool_calls": _tool_calls(record, content, path, where)}
        elif calls is not None:
            message["tool_calls"] = calls
        for extra in ("name", "tool_call_id"):  # a tool result's link to its call, for templates that show it
            if key == "messages" and isinstance(turn.get(extra), str):
                message[extra] = turn[extra]
        messages.append(message)
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(path, record.line, "no assistant turn to learn from", field=key)
    return messages


def _text_parts(record: Record, parts: list, path, where: str) -> str:
    """OpenAI's content as a list of parts ([{"type": "text", "text": ...}]): their texts joined, as tunelab serve
    reads a request's; a part of another kind (an image) is an error naming it."""
    texts = []
    for i, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise DataError(
                path, record.line, f"only text parts can be learned from, got {kind!r}", field=f"{where}[{i}]"
            )
        texts.append(part["text"])
    return "".join(texts)


def _tools(record: Record, path) -> list[dict] | None:
    """The record's `tools`: a list of function schemas, or that list as a JSON string (LLaMA-Factory)."""
    tools = record.data.get("tools")
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except (json.JSONDecodeError, RecursionError, ValueError):
            raise DataError(
                path, record.line, "expected a list of function schemas (or it as JSON)", field="tools"
            ) from None
        tools = tools if isinstance(tools, list) else [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(path, record.line, "expected a list of function schemas (or it as JSON)", field="tools")
    # chat templates (Qwen, Llama 3, Mistral) expect {"type": "function", "function": schema}
    return [t if "function" in t else {"type": "function", "function": t} for t in tools]


def _history(record: Record, path) -> list[dict]:
    """alpaca `history`: earlier [instruction, answer] pairs, as turns before the record's own."""
    history = record.data.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        raise DataError(path, record.line, "expected a list of [instruction, answer] pairs", field="history")
    turns = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(
                path, record.line, "expected a pair [instruction, answer] of strings", field=f"history[{i}]"
            )
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return turns


def _unknown_fields(record: Record, fmt: str) -> list[str]:
    unknown = sorted(str(k) for k in record.data if k not in KNOWN_FIELDS[fmt])
    key = {"messages": "messages", "sharegpt": "conversations"}.get(fmt)
    if key and isinstance(record.data.get(key), list):
        extra = {k for turn in record.data[key] if isinstance(turn, dict) for k in turn} - _TURN_FIELDS[fmt]
        unknown += [f"{key}[].{k}" for k in sorted(map(str, extra))]
    return unknown


def to_example(record: Record, fmt: str, path) -> Example:
    """Normalise one record of a known format; raises DataError naming the field."""
    example = _to_example(record, fmt, path)
    example.unknown_fields = _unknown_fields(record, fmt)
    return example


def alpaca_prompt(record: Record, path) -> list[dict]:
    """An alpaca record's conversation up to its answer: system, history, then instruction + input as the
    user's turn (also what a prompt without an answer is, for the distillation teacher)."""
    instruction = _string(record, "instruction", path)
    extra = _string(record, "input", path, required=False)
    system = _string(record, "system", path, required=False)
    user = instruction + (f"\n\n{extra}" if extra and extra.strip() else "")
    return (
        ([{"role": "system", "content": system}] if system else [])
        + _history(record, path)
        + [{"role": "user", "content": user}]
    )


def _to_example(record: Record, fmt: str, path) -> Example:
    d = record.data
    if fmt in PREFERENCE_FORMATS:
        from .preference import to_pair  # preference.py builds on this module

        return to_pair(record, fmt, path)
    if fmt == "alpaca":
        prompt = alpaca_prompt(record, path)
        return Example(
            record.line, messages=prompt + [{"role": "assistant", "content": _string(record, "output", path)}], source=d
        )
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
        roles = {r: r for r in ROLES} | {"developer": "system"}  # OpenAI's newer name for the system role
        messages = _turns(record, "messages", path, "role", "content", roles)
        return Example(record.line, messages=messages, source=d, tools=_tools(record, path))
    if fmt == "sharegpt":
        messages = _turns(record, "conversations", path, "from", "value", _SHAREGPT_ROLES)
        system = _string(record, "system", path, required=False)
        if system and messages[0]["role"] == "system":
            raise DataError(path, record.line, "both a top-level system and a system turn: keep one", field="system")
        if system:
            messages.insert(0, {"role": "system", "content": system})
        return Example(record.line, messages=messages, source=d, tools=_tools(record, path))
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
