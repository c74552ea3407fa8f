"""Generation settings, greedy determinism, chat template use, the chat loop and the CLI verb."""

import io
import subprocess
import sys

import pytest
import torch

import tunelab
from tunelab.data.encode import prompt_text
from tunelab.errors import UserError
from tunelab.generation import GenerationSettings, chat_loop, generate_batch, generate_text
from tunelab.models import load_tokenizer


@pytest.fixture(scope="module")
def tiny():
    return tunelab.load("tiny-llama")


def test_defaults_match_the_spec():
    s = GenerationSettings()
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.penalty) == (256, 0.7, 0.9, 50, 1.1)
    # temperature 0 is plain greedy: no repetition penalty unless asked for (what evaluation decodes with)
    assert GenerationSettings(temperature=0).generate_kwargs(
        tok := load_tokenizer("tiny-llama")
    ) == GenerationSettings.greedy(256).generate_kwargs(tok)
    assert "repetition_penalty" not in GenerationSettings.greedy(8).generate_kwargs(tok)
    assert GenerationSettings(temperature=0, repetition_penalty=1.3).generate_kwargs(tok)["repetition_penalty"] == 1.3


def test_temperature_zero_is_greedy_and_matches_plain_generate(tiny):
    model, tok = tiny
    settings = GenerationSettings(max_new_tokens=6, temperature=0, repetition_penalty=1.0)
    kwargs = settings.generate_kwargs(tok)
    assert kwargs["do_sample"] is False
    first = generate_batch(model, tok, ["Say something"], settings)
    assert first == generate_batch(model, tok, ["Say something"], settings)
    # the same tokens as transformers' own greedy decoding on the chat-templated prompt
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Say something"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert first[0] == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_sampling_with_a_seed_is_reproducible_and_respects_max_new_tokens(tiny):
    model, tok = tiny
    settings = GenerationSettings(max_new_tokens=5, temperature=1.0, top_k=0, top_p=1.0, seed=3)
    a = generate_batch(model, tok, ["hello", "你好"], settings)
    b = generate_batch(model, tok, ["hello", "你好"], settings)
    assert a == b
    for text in a:
        assert len(tok(text, add_special_tokens=False)["input_ids"]) <= 6


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(max_new_tokens=0),
        dict(top_k=-1),
        dict(repetition_penalty=0),
    ],
)
def test_invalid_settings_are_user_errors(bad):
    with pytest.raises(UserError):
        GenerationSettings(**bad).validate()


def test_chat_loop_keeps_history_and_resets(tiny):
    model, tok = tiny
    out = io.StringIO()
    chat_loop(
        model,
        tok,
        GenerationSettings(max_new_tokens=3, temperature=0),
        io.StringIO("hello\n/reset\n/help\n/nope\nhi again\n/exit\n"),
        out,
    )
    text = out.getvalue()
    assert text.count("model> ") == 2  # /help and an unknown command are commands, not prompts
    assert text.count("/reset clears the history") == 3 and "unknown command /nope" in text
    ended = io.StringIO()
    chat_loop(model, tok, GenerationSettings(max_new_tokens=3, temperature=0), io.StringIO(""), ended)
    assert ended.getvalue().endswith("you> \n")  # at the end of input the shell's prompt starts a new line


def test_system_prompt_override_and_streaming_give_the_same_answer(tiny):
    model, tok = tiny
    settings = GenerationSettings.greedy(8)
    chunks = []
    streamed = generate_text(model, tok, "Say something", settings, on_text=chunks.append)
    assert chunks and "".join(chunks).strip() == streamed == generate_batch(model, tok, ["Say something"], settings)[0]
    # --system: the answer is the greedy continuation of the prompt rendered with that system prompt
    text = prompt_text(tok, tok.chat_template, [{"role": "user", "content": "Say something"}], "Answer in French.")
    assert "Answer in French." in text
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert generate_batch(model, tok, ["Say something"], settings, system="Answer in French.")[0] == expected


def test_an_answer_cut_inside_a_character_ends_before_it(tiny, monkeypatch):
    # byte-level BPE spells a Chinese character with several tokens: a token limit may stop between them, and
    # the decoded answer then ended in U+FFFD, in generate, chat (streamed) and the server alike
    from tunelab.serve.app import _visible

    model, tok = tiny
    ids = tok("北京欢迎你", add_special_tokens=False)["input_ids"]
    cut = next(n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd") and tok.decode(ids[: n - 1]))
    whole = tok.decode(ids[:cut]).rstrip("\ufffd")
    assert whole and "\ufffd" not in whole

    def generate(input_ids, attention_mask=None, streamer=None, **kwargs):  # the limit reached mid-character
        if streamer is not None:
            streamer.put(input_ids[0])
            for token in ids[:cut]:
                streamer.put(torch.tensor([token]))
            streamer.end()
        return torch.cat([input_ids, torch.tensor([ids[:cut]])], dim=1)

    monkeypatch.setattr(model, "generate", generate)
    settings = GenerationSettings.greedy(cut)
    assert generate_batch(model, tok, ["你好"], settings) == [whole]
    chunks = []
    assert generate_text(model, tok, "你好", settings, on_text=chunks.append) == whole == "".join(chunks)
    cut_text = tok.decode(ids[:cut])
    for finish in (None, "length"):
        for chat in (True, False):
            assert _visible(cut_text, finish, [], chat) == whole


def test_cli_generate_on_a_bare_model_name(tiny):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunelab",
            "generate",
            "tiny-llama",
            "--prompt",
            "hi",
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    model, tok = tiny  # streamed, the same greedy answer as the library's
    assert proc.stdout.strip() == generate_batch(model, tok, ["hi"], GenerationSettings.greedy(4))[0]
    bad = subprocess.run(
        [sys.executable, "-m", "tunelab", "generate", "tiny-llama", "--prompt", "hi", "--top-p", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "top_p" in bad.stderr and "Traceback" not in bad.stderr


def test_missing_run_path_says_it_does_not_exist(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tunelab", "generate", str(tmp_path / "runs" / "nope"), "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "does not exist" in proc.stderr and "hub" not in proc.stderr.replace("Hugging Face cache", ""), proc.stderr
    version = subprocess.run([sys.executable, "-m", "tunelab", "--version"], capture_output=True, text=True, timeout=60)
    assert version.stdout.strip() == f"tunelab {tunelab.__version__}"


def test_a_file_or_nothing_given_as_the_model_is_named_so(tmp_path):
    from tunelab.models import resolve_model_path

    key = tmp_path / "key.txt"
    key.write_text("secret")
    with pytest.raises(UserError, match="key.txt is a file: give a run folder"):
        resolve_model_path(str(key))  # was: "model directory .../key.txt has no config.json"
    with pytest.raises(UserError, match="no model given"):
        resolve_model_path("")  # was: "model directory . has no config.json"
