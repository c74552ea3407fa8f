"""Chat-template rendering, prompt masking, EOS on every answer, truncation, batching and the split."""

import pytest
import torch

from tunelab.data.collate import count_loss_tokens, pad_batch
from tunelab.data.dataset import split_validation
from tunelab.data.encode import (
    CHATML_TEMPLATE,
    IGNORE_INDEX,
    encode_example,
    encode_examples,
    resolve_chat_template,
)
from tunelab.data.formats import Example, load_examples

IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def template(smol_tokenizer):
    return resolve_chat_template(smol_tokenizer, "auto")


@pytest.fixture(scope="module")
def eos(smol_tokenizer):
    assert smol_tokenizer.convert_ids_to_tokens(smol_tokenizer.eos_token_id) == IM_END
    return smol_tokenizer.eos_token_id


def supervised(enc):
    return [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX]


def last_supervised(enc):
    return supervised(enc)[-1]


def chat(*turns):
    roles = ["user", "assistant"] * len(turns)
    return Example(1, messages=[{"role": r, "content": c} for r, c in zip(roles, turns)])


def test_prompt_masked_completion_supervised(smol_tokenizer, template, eos):
    answer = "The capital of France is Paris."
    example = Example(
        1,
        messages=[
            {"role": "system", "content": "You answer geography questions."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": answer},
        ],
    )
    enc, truncated = encode_example(example, smol_tokenizer, template, 512)
    ids, labels = enc["input_ids"], enc["labels"]
    assert not truncated and len(ids) == len(labels)
    # labels are -100 on a prefix (system, user and the assistant header) and equal the ids after it
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    last = max(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    assert all(lab == IGNORE_INDEX for lab in labels[:first])
    assert labels[first : last + 1] == ids[first : last + 1]
    assert all(lab == IGNORE_INDEX for lab in labels[last + 1 :])  # the newline after <|im_end|>
    prompt = smol_tokenizer.decode(ids[:first])
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "What is the capital of France?" in prompt and "You answer geography questions." in prompt
    assert smol_tokenizer.decode(supervised(enc)) == answer + IM_END
    assert ids[last] == eos


@pytest.mark.parametrize("answer", ["Paris", " yes", "123 + 4 = 127", "第一行\n第二行", "ends with newline\n"])
def test_supervised_tokens_decode_to_answer_plus_eos(smol_tokenizer, template, answer):
    enc, _ = encode_example(chat("Question?", answer), smol_tokenizer, template, 512)
    assert smol_tokenizer.decode(supervised(enc)) == answer + IM_END


def test_alpaca_file_every_example_ends_with_eos(write_jsonl, smol_tokenizer, template, eos):
    rows = [
        {"instruction": "Repeat: red", "output": "red"},
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
        {"system": "Be terse.", "instruction": "Greet", "output": "Hello there!"},
    ]
    examples, _, _ = load_examples(write_jsonl(rows))
    encoded, stats = encode_examples(examples, smol_tokenizer, template, 512, "completion")
    assert stats.examples == 3 and stats.truncated == 0 and stats.dropped_no_target == 0
    for row, enc in zip(rows, encoded):
        assert last_supervised(enc) == eos
        assert smol_tokenizer.decode(supervised(enc)) == row["output"] + IM_END
    assert [e["line"] for e in encoded] == [1, 2, 3]
    assert stats.lengths == [len(e["input_ids"]) for e in encoded]


def test_two_assistant_turns_both_supervised(smol_tokenizer, template, eos):
    enc, _ = encode_example(
        chat("first question", "first answer", "second question", "second answer"), smol_tokenizer, template, 512
    )
    ids, labels = enc["input_ids"], enc["labels"]
    # the supervised tokens form exactly two runs: one per assistant turn, each ending with EOS
    runs, current = [], []
    for tok, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    assert [smol_tokenizer.decode(r) for r in runs] == ["first answer" + IM_END, "second answer" + IM_END]
    assert all(r[-1] == eos for r in runs)
    # the user turn in between is masked
    end_of_first = max(
        i
        for i, t in enumerate(ids)
        if t == eos
        and labels[i] != IGNORE_INDEX
        and smol_tokenizer.decode(ids[: i + 1]).endswith("first answer" + IM_END)
    )
    start_of_second = next(i for i in range(end_of_first + 1, len(ids)) if labels[i] != IGNORE_INDEX)
    between = smol_tokenizer.decode(ids[end_of_first + 1 : start_of_second])
    assert "second question" in between and between.endswith("<|im_start|>assistant\n")
    assert all(labels[i] == IGNORE_INDEX for i in range(end_of_first + 1, start_of_second))


@pytest.mark.parametrize("system", [None, "你是客服。"])
def test_a_conversation_opening_with_the_assistant_learns_only_its_answers(smol_tokenizer, template, system):
    # SmolLM2's template puts its default system prompt ahead of an opening assistant turn: that prompt and the
    # turn's header are not the answer (they were learned, 42 tokens of them, until the opening span was found)
    turns = [("assistant", "欢迎光临"), ("user", "谢谢"), ("assistant", "不客气")]
    example = Example(1, messages=[{"role": r, "content": c} for r, c in turns])
    enc, _ = encode_example(example, smol_tokenizer, template, 512, system_prompt=system)
    assert smol_tokenizer.decode(supervised(enc)) == "欢迎光临" + IM_END + "不客气" + IM_END
    text = smol_tokenizer.decode(enc["input_ids"])
    assert text.startswith("<|im_start|>system\n" + (system or "You are a helpful AI assistant named SmolLM"))


def test_messages_file_two_turns(write_jsonl, smol_tokenizer, template, eos):
    row = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "goodbye"},
        ]
    }
    examples, _, _ = load_examples(write_jsonl([row]))
    encoded, _ = encode_examples(examples, smol_tokenizer, template, 512, "completion")
    enc = encoded[0]
    assert last_supervised(enc) == eos
    assert smol_tokenizer.decode(supervised(enc)) == "hello" + IM_END + "goodbye" + IM_END


def test_text_format_all_supervised_ends_with_eos(write_jsonl, smol_tokenizer, template, eos):
    examples, fmt, _ = load_examples(write_jsonl([{"text": "Plain text to model."}, {"text": "中文文本。"}]))
    assert fmt == "text"
    encoded, stats = encode_examples(examples, smol_tokenizer, template, 512, "completion")
    assert stats.examples == 2
    for ex, enc in zip(examples, encoded):
        assert enc["labels"] == enc["input_ids"]
        assert enc["input_ids"][-1] == eos
        assert smol_tokenizer.decode(enc["input_ids"]) == ex.text + IM_END


def test_loss_on_all_supervises_everything(smol_tokenizer, template, eos):
    enc, _ = encode_example(chat("question", "answer"), smol_tokenizer, template, 512, loss_on="all")
    assert enc["labels"] == enc["input_ids"]
    assert IGNORE_INDEX not in enc["labels"]
    # exactly the rendered conversation: the template's own <|im_end|> closes the answer, no second EOS
    rendered = smol_tokenizer.apply_chat_template(
        chat("question", "answer").messages, chat_template=template, tokenize=False
    )
    assert smol_tokenizer.decode(enc["input_ids"]) == rendered
    assert rendered.endswith("answer" + IM_END + "\n")
    assert enc["input_ids"].count(eos) == 3  # the end of the system, user and assistant turns


def test_chatml_template_ends_answers_with_eos(smol_tokenizer, eos):
    template = resolve_chat_template(smol_tokenizer, "chatml")
    assert template == CHATML_TEMPLATE
    enc, _ = encode_example(chat("q1", "a1", "q2", "a2"), smol_tokenizer, template, 512)
    assert last_supervised(enc) == eos
    assert smol_tokenizer.decode(supervised(enc)) == "a1" + IM_END + "a2" + IM_END
    # no default system prompt: the first token is the user turn's <|im_start|>
    assert smol_tokenizer.decode(enc["input_ids"]).startswith("<|im_start|>user\nq1")


def test_auto_without_tokenizer_template_falls_back_to_chatml():
    class NoTemplate:
        chat_template = None

    assert resolve_chat_template(NoTemplate(), "auto") == CHATML_TEMPLATE
    custom = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_chat_template(NoTemplate(), custom) == custom


def test_template_without_eos_gets_eos_appended(smol_tokenizer, eos):
    # a plain template whose turns do not end with the EOS token
    template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    enc, _ = encode_example(chat("q", "the answer"), smol_tokenizer, template, 512)
    assert last_supervised(enc) == eos
    assert smol_tokenizer.decode(supervised(enc)).strip() == "the answer" + IM_END


def test_system_prompt_setting(smol_tokenizer, template):
    enc, _ = encode_example(chat("q", "a"), smol_tokenizer, template, 512, system_prompt="Custom system.")
    text = smol_tokenizer.decode(enc["input_ids"])
    assert "<|im_start|>system\nCustom system." in text
    assert smol_tokenizer.decode(supervised(enc)) == "a" + IM_END


# --- truncation ----------------------------------------------------------------------------------


def test_truncation_to_max_length(smol_tokenizer, template):
    long_answer = " ".join(["word"] * 200)
    examples = [chat("short question", long_answer), chat("q", "short"), Example(3, text=" ".join(["x"] * 300))]
    encoded, stats = encode_examples(examples, smol_tokenizer, template, 64, "completion")
    assert stats.truncated == 2
    assert stats.dropped_no_target == 0
    assert stats.examples == 3
    assert all(len(e["input_ids"]) <= 64 and len(e["labels"]) == len(e["input_ids"]) for e in encoded)
    assert len(encoded[0]["input_ids"]) == 64
    # the truncated answer keeps its prompt mask and is supervised up to the cut
    assert encoded[0]["labels"][-1] == encoded[0]["input_ids"][-1]
    assert max(stats.lengths) == 64


def test_long_prompt_loses_its_middle_and_the_answer_is_kept(smol_tokenizer, template, eos):
    long_prompt = "START " + " ".join(["context"] * 200) + " END"
    examples = [chat(long_prompt, "the answer"), chat("q", "kept")]
    encoded, stats = encode_examples(examples, smol_tokenizer, template, 48, "completion")
    assert stats.truncated == 1 and stats.dropped_no_target == 0 and len(encoded) == 2
    cut = encoded[0]
    assert len(cut["input_ids"]) == 48
    assert smol_tokenizer.decode(supervised(cut)) == "the answer" + IM_END  # the whole answer survives
    text = smol_tokenizer.decode(cut["input_ids"])
    # the start (here the template's system prompt) and the end of the prompt stay, its middle went
    assert text.startswith("<|im_start|>system") and "END<|im_end|>" in text and text.count("context") < 200
    assert "<|im_start|>assistant" in text  # the marker the model answers after stays
    assert last_supervised(cut) == eos


def test_both_long_prompt_and_answer_share_max_length(smol_tokenizer, template):
    encoded, _ = encode_examples(
        [chat(" ".join(["context"] * 200), " ".join(["word"] * 200))], smol_tokenizer, template, 64, "completion"
    )
    labels = encoded[0]["labels"]
    assert len(labels) == 64 and sum(x != IGNORE_INDEX for x in labels) == 32  # half prompt, half answer


# --- batching ------------------------------------------------------------------------------------


def test_pad_batch(smol_tokenizer):
    pad = smol_tokenizer.pad_token_id
    examples = [
        {"input_ids": [10, 11, 12, 13], "labels": [IGNORE_INDEX, IGNORE_INDEX, 12, 13]},
        {"input_ids": [20, 21], "labels": [IGNORE_INDEX, 21]},
    ]
    batch = pad_batch(examples, pad)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13], [20, 21, pad, pad]]
    assert batch["labels"].tolist() == [[-100, -100, 12, 13], [-100, 21, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
    # shifted: the first position predicts nothing, so a label there never counts
    assert count_loss_tokens(batch) == 3
    batch = pad_batch([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}], pad)
    assert count_loss_tokens(batch) == 2


def test_pad_batch_real_examples(smol_tokenizer, template):
    encoded, _ = encode_examples(
        [chat("q", "a"), chat("a much longer question here", "a longer answer")],
        smol_tokenizer,
        template,
        512,
        "completion",
    )
    batch = pad_batch(encoded, smol_tokenizer.pad_token_id)
    width = max(len(e["input_ids"]) for e in encoded)
    assert batch["input_ids"].shape == (2, width)
    assert batch["attention_mask"].sum(1).tolist() == [len(e["input_ids"]) for e in encoded]
    expected = sum(sum(1 for lab in e["labels"][1:] if lab != IGNORE_INDEX) for e in encoded)
    assert count_loss_tokens(batch) == expected


# --- validation split ----------------------------------------------------------------------------


def test_split_validation_deterministic_disjoint_covering():
    items = list(range(50))
    train, val = split_validation(items, 0.2, seed=7)
    assert len(val) == 10 and len(train) == 40
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == items
    assert split_validation(items, 0.2, seed=7) == (train, val)
    other = split_validation(items, 0.2, seed=8)
    assert other[1] != val
    assert sorted(other[0] + other[1]) == items


def test_a_classification_split_keeps_every_class_in_training():
    # 13 examples, 正面 only twice: an unstratified 0.2 split could draw both into validation, and training
    # then failed with "label '正面' does not occur in the training data" naming a line of the training file
    labels = ["中性"] * 6 + ["负面"] * 5 + ["正面"] * 2
    whole = [seed for seed in range(100) if {11, 12} <= set(split_validation(list(range(13)), 0.2, seed)[1])]
    assert whole  # seeds whose plain draw holds out both 正面
    for seed in range(100):
        train, val = split_validation(list(range(13)), 0.2, seed, strata=labels)
        assert sorted(train + val) == list(range(13)) and {labels[i] for i in train} == {"中性", "负面", "正面"}
        if seed not in whole:  # where the plain draw was fine it stays: the same split as before
            assert (train, val) == split_validation(list(range(13)), 0.2, seed)
        else:  # else each class's share: 中性 round(1.2), 负面 round(1.0), 正面 none of 2 (its last stays)
            assert sorted(labels[i] for i in val) == ["中性", "负面"]
    # too few for any class's share: one validation example from the largest class, never a class's last one
    train, val = split_validation(list(range(3)), 0.2, 0, strata=["a", "a", "b"])
    assert len(val) == 1 and val[0] in (0, 1) and 2 in train
    assert split_validation(list(range(3)), 0.2, 0, strata=["a", "b", "c"]) == ([0, 1, 2], [])


def test_split_validation_zero_and_small():
    items = list(range(10))
    assert split_validation(items, 0.0, seed=0) == (items, [])
    # a small fraction still gives one validation example, and never takes them all
    train, val = split_validation(items, 0.01, seed=0)
    assert len(val) == 1 and len(train) == 9
    train, val = split_validation([1, 2], 0.9, seed=0)
    assert len(train) == 1 and len(val) == 1
    assert split_validation([1], 0.5, seed=0) == ([1], [])
