"""Loading data files: format detection and normalisation, JSON/CSV line numbers, and the errors."""

import json

import pytest

from tunelab.data.formats import load_examples
from tunelab.errors import DataError


def user_and_answer(example):
    return [(m["role"], m["content"]) for m in example.messages]


# --- formats -----------------------------------------------------------------------------------

FORMAT_CASES = [
    (
        "alpaca",
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
        [("user", "Add\n\n2 and 3"), ("assistant", "5")],
    ),
    (
        "alpaca",  # input is optional; system is kept as a system turn
        {"system": "Be brief.", "instruction": "Say hi", "output": "hi"},
        [("system", "Be brief."), ("user", "Say hi"), ("assistant", "hi")],
    ),
    (
        "alpaca",  # instruction/output only
        {"instruction": "Say hi", "output": "hi"},
        [("user", "Say hi"), ("assistant", "hi")],
    ),
    (
        "alpaca",  # an empty input adds nothing to the prompt
        {"instruction": "Say hi", "input": "", "output": "hi"},
        [("user", "Say hi"), ("assistant", "hi")],
    ),
    (
        "input_target",
        {"input": "2+2", "target": "4"},
        [("user", "2+2"), ("assistant", "4")],
    ),
    (
        "messages",
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"},
            ]
        },
        [("system", "S"), ("user", "Q"), ("assistant", "A")],
    ),
    (
        "sharegpt",
        {
            "conversations": [
                {"from": "human", "value": "Q1"},
                {"from": "gpt", "value": "A1"},
                {"from": "human", "value": "Q2"},
                {"from": "gpt", "value": "A2"},
            ]
        },
        [("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")],
    ),
]


@pytest.mark.parametrize("fmt,row,expected", FORMAT_CASES)
def test_conversation_formats_detected_and_normalised(write_jsonl, fmt, row, expected):
    path = write_jsonl([row, row])
    examples, detected, problems = load_examples(path)
    assert detected == fmt
    assert problems == []
    assert len(examples) == 2
    assert [e.line for e in examples] == [1, 2]
    assert user_and_answer(examples[0]) == expected
    # naming the format explicitly gives the same result
    explicit, fmt2, _ = load_examples(path, fmt=fmt)
    assert fmt2 == fmt
    assert user_and_answer(explicit[0]) == expected


def test_text_format(write_jsonl):
    path = write_jsonl([{"text": "Once upon a time."}, {"text": "The end."}])
    examples, fmt, _ = load_examples(path)
    assert fmt == "text"
    assert [e.text for e in examples] == ["Once upon a time.", "The end."]
    assert all(e.messages is None and e.label is None for e in examples)
    assert load_examples(path, fmt="text")[1] == "text"


def test_classification_format(write_jsonl):
    path = write_jsonl([{"text": "great film", "label": "pos"}, {"text": "awful", "label": 0}])
    examples, fmt, _ = load_examples(path)
    assert fmt == "classification"
    assert [(e.text, e.label) for e in examples] == [("great film", "pos"), ("awful", 0)]
    assert load_examples(path, fmt="classification")[1] == "classification"


def test_explicit_format_overrides_detection(write_jsonl):
    # these rows would be detected as classification; format=text uses only the text field
    path = write_jsonl([{"text": "a", "label": 1}])
    examples, fmt, _ = load_examples(path, fmt="text")
    assert fmt == "text"
    assert examples[0].text == "a" and examples[0].label is None


def test_detection_skips_a_malformed_first_record(write_jsonl):
    path = write_jsonl([{"instruction": "no output here"}, {"instruction": "q", "output": "a"}])
    with pytest.raises(DataError) as err:
        load_examples(path)
    # the real problem (a missing field) is reported, not "cannot detect the format"
    assert ":1" in str(err.value) and "output" in str(err.value)
    examples, fmt, problems = load_examples(path, skip_invalid=True)
    assert fmt == "alpaca" and len(examples) == 1 and len(problems) == 1


def test_undetectable_fields(write_jsonl):
    path = write_jsonl([{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert "data.jsonl:1" in str(err.value)
    assert "question" in str(err.value)


# --- file kinds and line numbers -----------------------------------------------------------------


def test_json_list_line_numbers(tmp_path):
    rows = [
        {"instruction": "q1", "output": "a1"},
        {"instruction": "q2", "input": "x", "output": "a2"},
        {"instruction": "q3", "output": "a3"},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    # each element starts on the line of its "{"
    text_lines = path.read_text().splitlines()
    starts = [i + 1 for i, line in enumerate(text_lines) if line.strip() == "{"]
    examples, fmt, _ = load_examples(path)
    assert fmt == "alpaca"
    assert [e.line for e in examples] == starts == [2, 6, 11]
    assert user_and_answer(examples[1]) == [("user", "q2\n\nx"), ("assistant", "a2")]


def test_json_list_error_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert "data.json:3" in str(err.value)
    # a missing field in a later element names that element's line
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n\n  {"instruction": "c"}\n]\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert "data.json:4" in str(err.value) and "output" in str(err.value)


def test_pandas_nan_is_an_empty_cell_and_infinity_an_error(tmp_path):
    # json.dumps(df.to_dict("records")) writes a missing cell as NaN, which Python's json reads as a float
    path = tmp_path / "from_pandas.jsonl"
    path.write_text('{"instruction": "翻译", "input": NaN, "output": "hello"}\n', encoding="utf-8")
    examples, _, _ = load_examples(path)
    assert user_and_answer(examples[0]) == [("user", "翻译"), ("assistant", "hello")]  # not "翻译\n\nnan"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": NaN}\n', encoding="utf-8")
    with pytest.raises(DataError, match="from_pandas.jsonl:2.*output"):
        load_examples(path)
    path.write_text('[{"instruction": "a", "output": "b"},\n {"text": Infinity}]', encoding="utf-8")
    path = path.rename(tmp_path / "inf.json")
    with pytest.raises(DataError, match="inf.json:2: invalid JSON: Infinity is not a JSON value"):
        load_examples(path)


@pytest.mark.parametrize(
    "content, line, message",
    [
        ('[{"text": "a"}]\n[{"text": "b"}, {"text": "c"}]\n', 2, "more after the list's closing"),  # cat a.json b.json
        ('[\n{"text": "a"},\n{"text": "b"},\n]\n', 4, "Expecting value"),  # a trailing comma
        ('[\n{"text": "a"}\n{"text": "b"}\n]\n', 3, "expected ',' or ']'"),  # a missing comma
        ('[\n{"text": "a"},\n', 3, "not closed"),
        ('{"data": [{"text": "a"}, "junk"]}', 1, "data[1]"),
    ],
)
def test_a_json_list_is_read_strictly(tmp_path, content, line, message):
    path = tmp_path / "data.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert f"data.json:{line}" in str(err.value) and message in str(err.value)


def test_a_wrapped_list_across_lines_is_one_json_document(tmp_path):
    path = tmp_path / "data.json"
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]
    path.write_text('{"data": [\n' + ",\n".join(json.dumps(r) for r in rows) + "\n]}\n", encoding="utf-8")
    examples, fmt, _ = load_examples(path)  # was read as JSON Lines for its "\n{" and refused
    assert fmt == "alpaca" and [user_and_answer(e)[1][1] for e in examples] == ["b", "d"]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")  # JSON Lines named .json
    assert [e.line for e in load_examples(path)[0]] == [1, 2]


def test_openai_text_parts_and_the_developer_role_read_as_tunelab_serve_reads_them(write_jsonl):
    parts = [{"type": "text", "text": "把日期转换成"}, {"type": "text", "text": "ISO 格式"}]
    row = {
        "messages": [
            {"role": "developer", "content": "你是助手。"},
            {"role": "user", "content": parts},
            {"role": "assistant", "content": [{"type": "text", "text": "2021-03-03"}]},
        ]
    }
    examples, fmt, _ = load_examples(write_jsonl([row]))
    assert fmt == "messages" and examples[0].messages == [
        {"role": "system", "content": "你是助手。"},
        {"role": "user", "content": "把日期转换成ISO 格式"},
        {"role": "assistant", "content": "2021-03-03"},
    ]
    from tunelab.serve.protocol import Message

    assert [Message(**m).as_dict() for m in row["messages"]] == examples[0].messages  # trained as served
    row["messages"][1]["content"] = parts + [{"type": "image_url", "image_url": {"url": "x.png"}}]
    with pytest.raises(DataError, match=r"field 'messages\[1\].content\[2\]': only text parts .* 'image_url'"):
        load_examples(write_jsonl([row]))


def test_a_csv_column_or_a_json_key_named_twice_is_an_error(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("instruction,output,output\n你好,世界,另一个\n", encoding="utf-8")
    with pytest.raises(DataError, match="dup.csv:1: column 'output' appears more than once"):
        load_examples(path)
    path = tmp_path / "dup.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d", "output": "e"}\n')
    with pytest.raises(DataError, match="dup.jsonl:2: invalid JSON: key 'output' appears twice in one object"):
        load_examples(path)


def test_csv_with_quoted_newline(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('instruction,output\n"line one\nline two",a1\nq2,a2\nq3,\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_examples(path)
    # the record after the two-line field starts on line 4, so the empty output is on line 5
    assert "data.csv:5" in str(err.value) and "output" in str(err.value)
    examples, fmt, problems = load_examples(path, skip_invalid=True)
    assert fmt == "alpaca"
    assert [e.line for e in examples] == [2, 4]
    assert user_and_answer(examples[0]) == [("user", "line one\nline two"), ("assistant", "a1")]
    assert len(problems) == 1 and "data.csv:5" in problems[0]


def test_csv_input_target_and_classification(tmp_path):
    path = tmp_path / "it.csv"
    path.write_text("input,target\nhello,bonjour\n", encoding="utf-8")
    examples, fmt, _ = load_examples(path)
    assert fmt == "input_target" and user_and_answer(examples[0]) == [("user", "hello"), ("assistant", "bonjour")]
    path = tmp_path / "cls.csv"
    path.write_text("text,label\nnice,pos\n", encoding="utf-8")
    examples, fmt, _ = load_examples(path)
    assert fmt == "classification" and (examples[0].text, examples[0].label) == ("nice", "pos")


CHINESE_Q = "请把这句话翻译成英文：今天天气很好。"
CHINESE_A = "今天的天气非常好，阳光明媚。"


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv"])
def test_chinese_round_trips_through_loading(tmp_path, kind):
    row = {"instruction": CHINESE_Q, "output": CHINESE_A}
    path = tmp_path / f"zh.{kind}"
    if kind == "jsonl":
        path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    elif kind == "json":
        path.write_text(json.dumps([row], ensure_ascii=False, indent=1), encoding="utf-8")
    else:
        path.write_text(f"instruction,output\n{CHINESE_Q},{CHINESE_A}\n", encoding="utf-8")
    examples, _, _ = load_examples(path)
    assert user_and_answer(examples[0]) == [("user", CHINESE_Q), ("assistant", CHINESE_A)]


def test_chinese_round_trips_through_tokenization(write_jsonl, smol_tokenizer):
    from tunelab.data.encode import IGNORE_INDEX, encode_example, resolve_chat_template

    path = write_jsonl([{"instruction": CHINESE_Q, "output": CHINESE_A}])
    examples, _, _ = load_examples(path)
    template = resolve_chat_template(smol_tokenizer, "auto")
    enc, truncated = encode_example(examples[0], smol_tokenizer, template, 512)
    assert not truncated
    decoded = smol_tokenizer.decode(enc["input_ids"])
    assert CHINESE_Q in decoded and CHINESE_A in decoded
    supervised = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX]
    assert smol_tokenizer.decode(supervised) == CHINESE_A + "<|im_end|>"


# --- errors -------------------------------------------------------------------------------------


def expect_error(path, *parts, **kwargs):
    with pytest.raises(DataError) as err:
        load_examples(path, **kwargs)
    message = str(err.value)
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    return err.value


def test_truncated_json_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(
        '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n{"instruction": "e", "outp\n',
        encoding="utf-8",
    )
    err = expect_error(path, "data.jsonl:3", "invalid JSON")
    assert err.line == 3


def test_missing_field_names_line_and_field(write_jsonl):
    path = write_jsonl([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}, {"instruction": "e"}])
    err = expect_error(path, "data.jsonl:3", ":3", "output")
    assert (err.line, err.field) == (3, "output")


def test_empty_field_is_an_error(write_jsonl):
    path = write_jsonl([{"instruction": "a", "output": "   "}])
    expect_error(path, "data.jsonl:1", "output", "empty")


@pytest.mark.parametrize(
    "name,content",
    [("e.jsonl", b""), ("e.json", b""), ("e.csv", b""), ("blank.jsonl", b"\n  \n\n"), ("bom.json", b"\xef\xbb\xbf\n")],
)
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    expect_error(path, name, "empty")


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.jsonl", "nope.jsonl", "not found")


def test_unknown_format_name_suggests_closest(write_jsonl):
    path = write_jsonl([{"instruction": "a", "output": "b"}])
    expect_error(path, "unknown data format 'alpacca'", "did you mean 'alpaca'", fmt="alpacca")


def test_wrong_typed_field(write_jsonl):
    path = write_jsonl([{"instruction": "a", "output": ["b", "c"]}])
    err = expect_error(path, "data.jsonl:1", "output", "list")
    assert err.field == "output"


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "ok"}\n{"text": "bad \xff\xfe here"}\n{"text": "ok"}\n')
    expect_error(path, "data.jsonl:3", "UTF-8")
    # the same for a whole-file format: the line of the bad byte is named
    path = tmp_path / "data.csv"
    path.write_bytes(b"text\nok\nbad \xc3\x28\n")
    expect_error(path, "data.csv:3", "UTF-8")


def test_bom_and_crlf_accepted(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes("\ufeff".encode() + b'{"input": "a", "target": "b"}\r\n{"input": "c", "target": "d"}\r\n')
    examples, fmt, _ = load_examples(path)
    assert fmt == "input_target"
    assert [e.line for e in examples] == [1, 2]
    assert user_and_answer(examples[1]) == [("user", "c"), ("assistant", "d")]
    path = tmp_path / "data.csv"
    path.write_bytes("\ufeff".encode() + b"input,target\r\na,b\r\nc,d\r\n")
    examples, fmt, _ = load_examples(path)
    assert fmt == "input_target"  # the BOM is not part of the first column's name
    assert [e.line for e in examples] == [2, 3]
    assert user_and_answer(examples[1]) == [("user", "c"), ("assistant", "d")]
    path = tmp_path / "data.json"
    path.write_bytes("\ufeff".encode() + b'[\r\n{"text": "x"},\r\n{"text": "y"}\r\n]\r\n')
    examples, fmt, _ = load_examples(path)
    assert [e.line for e in examples] == [2, 3]


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_json_is_a_data_error(tmp_path, depth):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "x", "extra": ' + "[" * depth + "]" * depth + "}\n", encoding="utf-8")
    expect_error(path, "deep.jsonl:2", "nested")  # a DataError, not RecursionError
    path = tmp_path / "deep.json"
    path.write_text('[{"text": "ok"},\n{"text": ' + "[" * depth + "]" * depth + "}]", encoding="utf-8")
    expect_error(path, "deep.json:2", "nested")


def test_unknown_role_in_messages(write_jsonl):
    path = write_jsonl(
        [
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
        ]
    )
    err = expect_error(path, "data.jsonl:2", "messages[1].role", "'bot'")
    assert err.line == 2


def test_unknown_sharegpt_speaker(write_jsonl):
    path = write_jsonl([{"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}])
    expect_error(path, "data.jsonl:1", "conversations[1].from", "'robot'")


def test_conversation_without_assistant_turn(write_jsonl):
    path = write_jsonl([{"messages": [{"role": "user", "content": "q"}]}])
    expect_error(path, "data.jsonl:1", "messages", "assistant")


def test_non_object_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n[1, 2]\n', encoding="utf-8")
    expect_error(path, "data.jsonl:2", "object")


# --- skip_invalid ---------------------------------------------------------------------------------


def test_skip_invalid_skips_and_counts(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(
        '{"instruction": "q1", "output": "a1"}\n'
        '{"instruction": "q2"}\n'  # missing output
        '{"instruction": "q3", "output": ["x"]}\n'  # wrong type
        '{"instruction": "q4", "outp\n'  # truncated JSON
        '{"instruction": "q5", "output": "a5"}\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError):
        load_examples(path)
    examples, fmt, problems = load_examples(path, skip_invalid=True)
    assert fmt == "alpaca"
    assert [e.line for e in examples] == [1, 5]
    assert len(problems) == 3
    assert any("data.jsonl:2" in p and "output" in p for p in problems)
    assert any("data.jsonl:3" in p and "output" in p for p in problems)
    assert any("data.jsonl:4" in p and "JSON" in p for p in problems)


def test_skip_invalid_with_nothing_valid_is_an_error(write_jsonl):
    path = write_jsonl([{"instruction": "q1", "output": ""}, {"instruction": "q2", "output": " "}])
    expect_error(path, "no valid records", "2 invalid", skip_invalid=True)
