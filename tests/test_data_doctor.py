"""LLaMA-Factory layouts rendered faithfully, unknown fields reported, system prompts, loss_on: last_turn,
`data show`, and the data doctor: personal data, duplicates and leaks, label errors, `data clean`."""

import json
import random

import pytest

from tunelab.cli import main
from tunelab.config import build_config
from tunelab.data.check import check_file
from tunelab.data.clean import clean_file
from tunelab.data.dataset import balance_classes, class_weights, prepare_data
from tunelab.data.doctor import pii_findings
from tunelab.data.duplicates import find_duplicates, find_leaks, jaccard, shingles
from tunelab.data.encode import IGNORE_INDEX, encode_example, render, render_example, resolve_chat_template
from tunelab.data.formats import load_examples
from tunelab.data.pii import cn_id_check_char, find_pii, luhn_ok
from tunelab.errors import DataError

SMOL_DEFAULT = "You are a helpful AI assistant named SmolLM"

# Qwen2.5's chat template (tools, tool calls, tool responses), as a Jinja string for data.chat_template
QWEN25_TOOLS_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] }}{%- else %}{{- 'You are Qwen, created by Alibaba Cloud.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud.<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}{%- if (message.role == 'user') or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}{%- if message.content %}"
    "{{- '\\n' + message.content }}{%- endif %}{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' }}{{- tool_call.name }}{{- \'", "arguments": \' }}'
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}"
    "{{- '<|im_start|>user' }}{%- endif %}{{- '\\n<tool_response>\\n' }}{{- message.content }}"
    "{{- '\\n</tool_response>' }}{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def template(smol_tokenizer):
    return resolve_chat_template(smol_tokenizer, "auto")


def by_hand(*turns):
    return [{"role": r, "content": c} for r, c in turns]


# --- formats as LLaMA-Factory writes them ---------------------------------------------------------

ALPACA_CASES = [
    (
        {
            "instruction": "And 3+3?",
            "input": "",
            "output": "6",
            "system": "You are a calculator.",
            "history": [["2+2?", "4"], ["1+1?", "2"]],
        },
        by_hand(
            ("system", "You are a calculator."),
            ("user", "2+2?"),
            ("assistant", "4"),
            ("user", "1+1?"),
            ("assistant", "2"),
            ("user", "And 3+3?"),
            ("assistant", "6"),
        ),
    ),
    (
        {
            "instruction": "还有呢？",
            "input": "请简短",
            "output": "没有了。",
            "system": "你是助手。",
            "history": [["你好", "你好！"]],
        },
        by_hand(
            ("system", "你是助手。"),
            ("user", "你好"),
            ("assistant", "你好！"),
            ("user", "还有呢？\n\n请简短"),
            ("assistant", "没有了。"),
        ),
    ),
]


@pytest.mark.parametrize("row,expected", ALPACA_CASES)
def test_alpaca_history_and_system_render_as_by_hand(write_jsonl, smol_tokenizer, template, row, expected):
    (ex,), fmt, _ = load_examples(write_jsonl([row]))
    assert fmt == "alpaca" and ex.unknown_fields == []
    assert render_example(ex, smol_tokenizer, template).text == render(smol_tokenizer, template, expected)
    enc, _ = encode_example(ex, smol_tokenizer, template, 512)
    learned = smol_tokenizer.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX])
    assert learned == "".join(m["content"] + "<|im_end|>" for m in expected if m["role"] == "assistant")


SHAREGPT_TOOLS = {
    "conversations": [
        {"from": "human", "value": "北京今天天气怎么样？"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "北京"}}'},
        {"from": "observation", "value": '{"temp_c": 21, "sky": "晴"}'},
        {"from": "gpt", "value": "北京今天晴，21°C。"},
        {"from": "human", "value": "And in Paris?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}'},
        {"from": "observation", "value": '{"temp_c": 15}'},
        {"from": "gpt", "value": "15°C in Paris."},
    ],
    "system": "你是天气助手。",
    "tools": json.dumps(
        [{"name": "get_weather", "description": "天气", "parameters": {"type": "object", "properties": {}}}],
        ensure_ascii=False,
    ),
}


def call(city):
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}],
    }


def test_sharegpt_system_multi_turn_and_tool_calls_render_as_by_hand(write_jsonl, smol_tokenizer):
    (ex,), fmt, _ = load_examples(write_jsonl([SHAREGPT_TOOLS]))
    assert fmt == "sharegpt" and ex.unknown_fields == []
    messages = [
        {"role": "system", "content": "你是天气助手。"},
        {"role": "user", "content": "北京今天天气怎么样？"},
        call("北京"),
        {"role": "tool", "content": '{"temp_c": 21, "sky": "晴"}'},
        {"role": "assistant", "content": "北京今天晴，21°C。"},
        {"role": "user", "content": "And in Paris?"},
        call("Paris"),
        {"role": "tool", "content": '{"temp_c": 15}'},
        {"role": "assistant", "content": "15°C in Paris."},
    ]
    tools = [{"type": "function", "function": json.loads(SHAREGPT_TOOLS["tools"])[0]}]
    hand = smol_tokenizer.apply_chat_template(
        messages, chat_template=QWEN25_TOOLS_TEMPLATE, tools=tools, tokenize=False
    )
    rendered = render_example(ex, smol_tokenizer, QWEN25_TOOLS_TEMPLATE)
    assert rendered.text == hand and "<tools>" in hand and '"city": "Paris"' in hand and "你是天气助手。" in hand
    learned = smol_tokenizer.decode([t for t, lab in zip(rendered.ids, rendered.labels) if lab != IGNORE_INDEX])
    assert learned.count("<tool_call>") == 2 and "15°C in Paris." in learned and "tool_response" not in learned


def test_tools_with_a_template_that_cannot_render_them_is_refused(write_jsonl, smol_tokenizer, template):
    (ex,), _, _ = load_examples(write_jsonl([SHAREGPT_TOOLS]))
    with pytest.raises(DataError, match="field 'tools'.*does not render tools"):
        render_example(ex, smol_tokenizer, template)
    no_tools = dict(SHAREGPT_TOOLS, tools="")
    (ex,), _, _ = load_examples(write_jsonl([no_tools], "b.jsonl"))
    with pytest.raises(DataError, match="function_call.*does not render tool calls"):
        render_example(ex, smol_tokenizer, template)


def test_sharegpt_system_and_a_system_turn_together_is_refused(write_jsonl):
    row = {
        "system": "A",
        "conversations": [
            {"from": "system", "value": "B"},
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"},
        ],
    }
    with pytest.raises(DataError, match="data.jsonl:1: field 'system'"):
        load_examples(write_jsonl([row]))


def test_unknown_fields_reported_by_check_and_warned_once_in_training(write_jsonl, smol_tokenizer, tmp_path):
    rows = [{"instruction": "q", "output": "a", "id": i, "lang": "en"} for i in range(3)]
    rows.append({"conversations_x": 1, "instruction": "q2", "output": "a2"})
    path = write_jsonl(rows)
    report = check_file(path, smol_tokenizer)
    assert report["unknown_fields"]["id"] == {"records": 3, "lines": [1, 2, 3]}
    assert set(report["unknown_fields"]) == {"id", "lang", "conversations_x"}
    cfg = build_config({"model": "tiny-llama", "data": {"train": str(path), "val_fraction": 0}})
    notes = [n for n in prepare_data(cfg, smol_tokenizer).notes() if "ignored" in n]
    assert (
        len(notes) == 1 and "'id' (3 records, lines 1, 2, 3)" in notes[0] and "'conversations_x' (line 4)" in notes[0]
    )


def test_the_eval_file_is_read_in_its_own_format(write_jsonl, smol_tokenizer):
    from tunelab.errors import ConfigError

    turns = [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"}]
    train = write_jsonl([{"conversations": turns}] * 3, "sharegpt.jsonl")
    held_out = [{"role": "user", "content": "谢谢"}, {"role": "assistant", "content": "不客气"}]
    evalf = write_jsonl([{"messages": held_out}], "messages.jsonl")
    cfg = build_config({"model": "tiny-llama", "data": {"train": str(train), "eval": str(evalf)}})
    prepared = prepare_data(cfg, smol_tokenizer)  # was: messages.jsonl:1: field 'conversations' ...
    assert len(prepared.train) == 3 and len(prepared.val) == 1
    assert check_file(train, smol_tokenizer, eval_path=evalf)["valid"] == 3
    labelled = write_jsonl([{"text": "t", "label": "a"}], "labels.jsonl")
    cfg = build_config({"model": "tiny-llama", "data": {"train": str(train), "eval": str(labelled)}})
    with pytest.raises(ConfigError, match="labels.jsonl: classification data does not fit task: causal_lm"):
        prepare_data(cfg, smol_tokenizer)


def test_system_prompt_precedence_and_check_says_which(write_jsonl, smol_tokenizer, template):
    rows = [
        {"instruction": "q", "output": "a", "system": "Record system."},
        {"instruction": "q", "output": "b"},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "c"}], "system": "系统。"},
    ]
    path = write_jsonl(rows[:2])
    by_source = {g["source"]: g for g in check_file(path, smol_tokenizer)["system_prompts"]}
    assert by_source["record"]["lines"] == [1] and by_source["template"]["text"].startswith(SMOL_DEFAULT)
    by_source = {g["source"]: g for g in check_file(path, smol_tokenizer, system_prompt="Config.")["system_prompts"]}
    assert by_source["data.system_prompt"] == {
        "source": "data.system_prompt",
        "text": "Config.",
        "records": 1,
        "lines": [2],
    }
    (ex,), _, _ = load_examples(write_jsonl(rows[2:], "s.jsonl"))
    text = render_example(ex, smol_tokenizer, template, system_prompt="Config.").text
    assert "系统。" in text and "Config." not in text and SMOL_DEFAULT not in text


def test_loss_on_last_turn_supervises_only_the_last_answer(write_jsonl, smol_tokenizer, template):
    (ex,), _, _ = load_examples(write_jsonl([ALPACA_CASES[0][0]]))
    learned = [
        smol_tokenizer.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX])
        for enc, _ in (
            encode_example(ex, smol_tokenizer, template, 512, loss_on=mode) for mode in ("completion", "last_turn")
        )
    ]
    assert learned == ["4<|im_end|>2<|im_end|>6<|im_end|>", "6<|im_end|>"]


def test_data_show_marks_loss_spans_with_brackets(write_jsonl, capsys):
    path = write_jsonl([ALPACA_CASES[1][0], {"instruction": "q", "output": "a"}])
    assert main(["data", "show", str(path), "--model", "tiny-llama", "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "[[你好！<|im_end|>]]" in out and "[[没有了。<|im_end|>]]" in out and "[[请简短" not in out
    assert "line 1" in out and "line 2" not in out and "system prompt: record" in out


# --- personal data --------------------------------------------------------------------------------


def _cn_id(rng):
    first = f"{rng.choice(['110105', '310104', '440305'])}{rng.randint(1950, 2005)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}{rng.randint(0, 999):03d}"
    return first + cn_id_check_char(first)


def _card(rng):
    digits = [rng.choice("4") if rng.random() < 0.5 else "6", "2"] + [str(rng.randint(0, 9)) for _ in range(13)]
    for check in "0123456789":
        if luhn_ok("".join(digits) + check):
            number = "".join(digits) + check
            return number if rng.random() < 0.5 else " ".join(number[i : i + 4] for i in range(0, 16, 4))


PII_MAKERS = {
    "email": lambda r: (
        f"{r.choice(['zhang.san', 'li_si', 'anna.k', 'bob'])}{r.randint(1, 99)}@{r.choice(['example.com', 'qq.com', 'mail.cn'])}"
    ),
    "phone": lambda r: r.choice(
        [
            f"1{r.choice('3456789')}{r.randint(0, 9)}{r.randint(0, 99999999):08d}",
            f"+86 13{r.randint(0, 9)} {r.randint(1000, 9999)} {r.randint(1000, 9999)}",
            f"+1 415-555-{r.randint(1000, 9999)}",
            f"({r.randint(200, 999)}) 555-{r.randint(1000, 9999)}",
            f"+44 20 {r.randint(1000, 9999)} {r.randint(1000, 9999)}",
        ]
    ),
    "cn_id": _cn_id,
    "bank_card": _card,
    "ip": lambda r: r.choice(
        [
            f"192.168.{r.randint(0, 255)}.{r.randint(1, 254)}",
            f"10.{r.randint(0, 255)}.0.{r.randint(1, 254)}",
            "2001:db8::8a2e:370:7334",
        ]
    ),
}
CARRIERS = {
    "en": ["Please contact me at {x} about order 20240115.", "My {k} is {x}, version 2.1.3, price 1999.00 USD."],
    "zh": ["请联系我：{x}，订单号20240115。", "我的{k}是{x}，谢谢！时间12:30:45。"],
}
DISTRACTORS = [
    "Order 4111111111111112 shipped on 2024-01-15 at 12:30.",  # fails Luhn
    "编号110105199001011234不是有效的身份证号。",  # wrong check digit
    "Version 1.2.3.4.5 and build 20240115; score 99.5%.",
    "今天气温25度，湿度60%，共计12345元。",
    "Meet at 10:30, room 301, floor 3.",
]


def pii_rows(n=120, seed=0):
    rng = random.Random(seed)
    rows, truth = [], []
    for i in range(n):
        kind = list(PII_MAKERS)[i % len(PII_MAKERS)]
        value = PII_MAKERS[kind](rng)
        lang = "zh" if i % 2 else "en"
        rows.append(
            {"instruction": rng.choice(CARRIERS[lang]).format(x=value, k=kind), "output": rng.choice(DISTRACTORS)}
        )
        truth.append((i + 1, kind, value))
    return rows, truth


def test_pii_precision_and_recall_in_english_and_chinese(write_jsonl, smol_tokenizer):
    rows, truth = pii_rows()
    path = write_jsonl(rows)
    found = {(f["line"], f["kind"], f["text"]) for f in pii_findings(load_examples(path)[0])}
    assert check_file(path, smol_tokenizer)["pii"] == len(found)
    hits = len(found & set(truth))
    precision, recall = hits / len(found), hits / len(truth)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall, sorted(found ^ set(truth))[:10])


def test_scrub_replaces_only_the_personal_data(tmp_path):
    rows, truth = pii_rows(40, seed=1)
    rows.insert(3, {"instruction": "No personal data here: 价格 1999 元", "output": "ok", "extra": [1, 2]})
    raw = "".join(json.dumps(r, ensure_ascii=i % 2 == 0) + "\n" for i, r in enumerate(rows))  # escaped and plain
    src = tmp_path / "pii.jsonl"
    src.write_text(raw, encoding="utf-8")
    report = clean_file(src, tmp_path / "clean.jsonl", scrub_pii=True)
    assert src.read_text(encoding="utf-8") == raw  # never in place
    out_lines, in_lines = (tmp_path / "clean.jsonl").read_text(encoding="utf-8").split("\n"), raw.split("\n")
    assert out_lines[3] == in_lines[3]
    placeholder = {"email": "<EMAIL>", "phone": "<PHONE>", "cn_id": "<CN_ID>", "bank_card": "<BANK_CARD>", "ip": "<IP>"}
    for (_, kind, value), i in zip(truth, [i for i in range(41) if i != 3]):
        assert out_lines[i] == in_lines[i].replace(value, placeholder[kind])
        assert not find_pii(json.loads(out_lines[i])["instruction"])
    assert len(report["changed"]) == 40 and report["removed"] == []
    assert json.loads((tmp_path / "clean.report.json").read_text())["changed"][0]["fields"][0]["field"] == "instruction"


# --- duplicates and leaks -------------------------------------------------------------------------


def _sentence(rng, words=18):
    vocab = "alpha beta gamma delta river stone cloud maple orbit vivid quiet amber cedar lunar prism tidal".split()
    return " ".join(rng.choice(vocab) + str(rng.randint(0, 99)) for _ in range(words))


def _near_copy(rng, text):
    """A copy with one word changed (Jaccard of 5-gram sets >= 0.8 is checked by the caller)."""
    words = text.split()
    words[rng.randrange(len(words))] = "changed"
    return " ".join(words)


def test_near_duplicates_and_leaks_found():
    rng = random.Random(0)
    texts = [_sentence(rng) for _ in range(300)]
    injected = []
    for i in range(40):
        copy = _near_copy(rng, texts[i])
        assert jaccard(shingles(copy), shingles(texts[i])) >= 0.8
        texts.append(copy)
        injected.append((i + 1, len(texts)))
    texts.append(texts[5])  # an exact copy
    lines = list(range(1, len(texts) + 1))
    found = find_duplicates(lines, texts)
    pairs = {(a, b) for a, b, _ in found["near"]}
    assert sum(p in pairs for p in injected) / len(injected) >= 0.95
    assert [6, len(texts)] in found["exact"]
    eval_texts = [_near_copy(rng, texts[i]) for i in (50, 60, 70)] + [texts[80]] + [_sentence(rng) for _ in range(20)]
    leaks = find_leaks(lines, texts, list(range(1, 25)), eval_texts)
    assert [(x["eval_line"], x["train_line"]) for x in leaks] == [(1, 51), (2, 61), (3, 71), (4, 81)]


def test_data_clean_dedup_report_and_table(write_jsonl, tmp_path, capsys):
    rng = random.Random(1)
    rows = [{"text": _sentence(rng), "label": "a" if i % 2 else "b"} for i in range(6)]
    rows += [rows[0], dict(rows[1], text=_near_copy(rng, rows[1]["text"]))]
    src = write_jsonl(rows, "train.jsonl")
    evalf = write_jsonl([rows[2]], "eval.jsonl")
    assert main(["data", "clean", str(src), "--out", str(tmp_path / "c.jsonl"), "--dedup", "--eval", str(evalf)]) == 0
    table = capsys.readouterr().out
    report = json.loads((tmp_path / "c.report.json").read_text())
    reasons = {r["line"]: r["reason"] for r in report["removed"]}
    assert reasons[7] == "exact duplicate of line 1" and reasons[8].startswith("near duplicate of line 2")
    assert "leak" in reasons[3] and report["records_out"] == 5
    assert "removed line 7" in table and "exact duplicate of line 1" in table


# --- labels ---------------------------------------------------------------------------------------


def test_label_errors_found_on_triage_with_flipped_labels(tmp_path, smol_tokenizer):
    from tunelab.data.label_errors import rank_label_issues
    from tunelab.demo.triage import LABELS, make_triage

    rows = make_triage(250, seed=7)
    rng = random.Random(0)
    flipped = rng.sample(range(len(rows)), 20)  # 8%
    for i in flipped:
        rows[i]["label"] = rng.choice([lab for lab in LABELS if lab != rows[i]["label"]])
    ranked = rank_label_issues([r["text"] for r in rows], [r["label"] for r in rows])
    top_k = set(ranked["ranking"][: int(1.5 * len(flipped))])
    assert len(top_k & set(flipped)) / len(flipped) >= 0.8
    assert all(f["suggested"] != f["label"] for f in ranked["flagged"])


def test_balance_and_class_weights():
    from tunelab.data.formats import Example

    examples = [Example(i, text=str(i), label="a" if i < 6 else "b") for i in range(8)]
    assert sorted(e.label for e in balance_classes(examples, "oversample", 0)).count("b") == 6
    under = balance_classes(examples, "undersample", 0)
    assert len(under) == 4 and {e.label for e in under} == {"a", "b"}
    encoded = [{"label": 0}] * 6 + [{"label": 1}] * 2
    assert class_weights(encoded, 2) == pytest.approx([8 / 12, 8 / 4])


def test_weighted_classification_loss():
    import torch

    from tunelab.losses import classification_loss_sum

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])

    class Model:
        def __call__(self, input_ids, attention_mask):
            return type("Out", (), {"logits": logits})

    batch = {"input_ids": None, "attention_mask": None, "labels": torch.tensor([0, 1, 1])}
    plain = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    weighted = classification_loss_sum(Model(), batch | {"weights": torch.tensor([0.5, 2.0, 1.0])})
    assert torch.allclose(weighted, (plain * torch.tensor([0.5, 2.0, 1.0])).sum())
    assert torch.allclose(classification_loss_sum(Model(), batch), plain.sum())


def test_balance_and_class_weights_in_prepare_data(write_jsonl, smol_tokenizer):
    from tunelab.errors import ConfigError

    rows = [{"text": f"t{i}", "label": "a" if i < 9 else "b"} for i in range(12)]
    data = {"train": str(write_jsonl(rows)), "val_fraction": 0}
    cfg = build_config({"model": "tiny-llama", "task": "classification", "data": data | {"balance": "oversample"}})
    prepared = prepare_data(cfg, smol_tokenizer)
    assert [e["label"] for e in prepared.train].count(1) == 9 and len(prepared.train) == 18
    cfg = build_config(
        {"model": "tiny-llama", "task": "classification", "data": data, "train": {"class_weights": "auto"}}
    )
    prepared = prepare_data(cfg, smol_tokenizer)
    assert {e["label"]: e["weight"] for e in prepared.train} == pytest.approx({0: 12 / 18, 1: 12 / 6})
    assert any("class weights: a 0.67, b 2.00" in n for n in prepared.notes())
    chat = str(write_jsonl([{"instruction": "q", "output": "a"}] * 2, "chat.jsonl"))
    cfg = build_config({"model": "tiny-llama", "data": {"train": chat, "balance": "undersample"}})
    with pytest.raises(ConfigError, match="data.balance: undersample is for task: classification"):
        prepare_data(cfg, smol_tokenizer)
