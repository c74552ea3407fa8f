"""data.train / data.eval as Parquet files and folders saved by `datasets.save_to_disk`: the same records,
validation and format detection as JSON Lines; errors name the row."""

import json

import pytest

import tunelab
from helpers import toy_rows
from tunelab.data.formats import load_examples
from tunelab.errors import DataError, Row


def write_parquet(rows, path):
    """Every column any row has (pyarrow's from_pylist would take the first row's keys only)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys(k for r in rows for k in r))
    pq.write_table(pa.Table.from_pydict({c: [r.get(c) for r in rows] for c in columns}), path)
    return path


def save_dataset(rows, path, split=None):
    import datasets

    ds = datasets.Dataset.from_dict({c: [r.get(c) for r in rows] for c in dict.fromkeys(k for r in rows for k in r)})
    (datasets.DatasetDict({split: ds}) if split else ds).save_to_disk(str(path))
    return path


def first_step_loss(tmp_path, data, name):
    cfg = {
        "model": "tiny-llama",
        "out_dir": str(tmp_path / "runs"),
        "run_name": name,
        "report_to": [],
        "data": {"train": str(data), "val_fraction": 0.0, "max_length": 64},
        "train": {"max_steps": 1, "batch_size": 8, "precision": "fp32", "lr": 1e-2},
    }
    result = tunelab.train(cfg, progress=False)
    return json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])["loss"]


def test_parquet_and_saved_dataset_train_exactly_like_jsonl(tmp_path, write_jsonl, monkeypatch):
    from tunelab.training import loop

    monkeypatch.setattr(loop, "write_plots", lambda run_dir: None)  # the loss plot is most of a 1-step run's time
    rows = toy_rows(16)
    sources = {
        "jsonl": write_jsonl(rows),
        "parquet": write_parquet(rows, tmp_path / "data.parquet"),
        "saved": save_dataset(rows, tmp_path / "saved"),
        "saved_split": save_dataset(rows, tmp_path / "saved_dict", split="train"),  # a DatasetDict of one split
    }
    examples = {name: load_examples(path) for name, path in sources.items()}
    assert {fmt for _, fmt, _ in examples.values()} == {"alpaca"}
    assert len({json.dumps([e.messages for e in ex]) for ex, _, _ in examples.values()}) == 1
    losses = {name: first_step_loss(tmp_path, sources[name], name) for name in ("jsonl", "parquet", "saved")}
    # the same token ids in the same order through the same seeded model: bit-identical, not merely close
    assert losses["parquet"] == losses["jsonl"] and losses["saved"] == losses["jsonl"]


def test_table_errors_name_the_row(tmp_path):
    rows = toy_rows(4)
    del rows[2]["output"]  # row 2 (0-based, as table[2] reads it)
    for path in (write_parquet(rows, tmp_path / "bad.parquet"), save_dataset(rows, tmp_path / "bad_saved")):
        with pytest.raises(DataError) as err:
            load_examples(path)
        assert str(err.value) == f"{path}: row 2: field 'output': missing"
    examples, _, problems = load_examples(tmp_path / "bad.parquet", skip_invalid=True)
    assert [e.line for e in examples] == [0, 1, 3] and all(isinstance(e.line, Row) for e in examples)
    assert problems == [f"{tmp_path / 'bad.parquet'}: row 2: field 'output': missing"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b"PAR1 not really"), "not a readable Parquet file"),
        (lambda p: write_parquet([], p), "no records found"),
        (lambda p: p.mkdir(), "not one saved by datasets.save_to_disk"),
    ],
)
def test_unreadable_tables_are_one_data_error(tmp_path, make, message):
    path = tmp_path / "data.parquet"
    if message.startswith("not one"):
        path = tmp_path / "folder"
    make(path)
    with pytest.raises(DataError, match=message):
        load_examples(path)


def test_dataset_dict_of_several_splits_asks_for_one(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(toy_rows(2))
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"splits train, test: name one split's folder \(e.g. .*dd/train\)"):
        load_examples(tmp_path / "dd")
    assert len(load_examples(tmp_path / "dd" / "test")[0]) == 2


def test_arrow_nulls_read_like_the_json_record(tmp_path, write_jsonl):
    """Arrow gives every row every column and every turn every struct field; a row must still read like its
    JSON record: detected format, tool calls, and fields no format reads only where the record has them."""
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "w", "arguments": "{}"}}]},
                {"role": "tool", "content": "sunny", "name": "w"},
                {"role": "assistant", "content": "sunny"},
            ],
            "note": "only this row has it",
        },
    ]
    from_json = load_examples(write_jsonl(rows))
    from_table = load_examples(write_parquet(rows, tmp_path / "m.parquet"))
    assert from_table[1] == from_json[1] == "messages"
    assert [e.messages for e in from_table[0]] == [e.messages for e in from_json[0]]
    assert [e.unknown_fields for e in from_table[0]] == [[], ["note"]]
