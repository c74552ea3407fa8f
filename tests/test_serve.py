"""tunelab serve: a real server on 127.0.0.1, driven with the official openai client (and httpx for what
the client cannot send). Two tiny-llama LoRA runs trained on different data, two random LoRA adapters and
the base are served together; every greedy answer must equal the unbatched one (`tunelab generate`)."""

import asyncio
import json
import random
import shutil
import threading

import httpx
import openai
import pytest
import torch

from helpers import TINY_LR, train_tiny_run

KEY = "test-key-0123456789"
HTTP = httpx.Client(timeout=300)  # keep-alive: one connection for the raw HTTP calls
PROMPTS = ["Say: red", "Say: 蓝色 please, in a few more words than the others", "x", "Tell me about the sea."]
MAX_TOKENS = 8


def _rows(kind: str):
    rng = random.Random(kind)
    words = ["red", "green", "blue", "yellow", "black", "white", "红色", "蓝色"]
    rows = []
    for _ in range(24):
        w = rng.choice(words)
        output = (w + " ") * 3 if kind == "repeat" else w.upper()[::-1]
        rows.append({"instruction": f"Say: {w}", "output": output})
    return rows


def _reference(model, tokenizer, prompt_ids):
    """Greedy ids and text the plain way: transformers' generate on one unpadded prompt (what
    `tunelab generate` runs), ids up to and including EOS."""
    from tunelab.generation import GenerationSettings

    settings = GenerationSettings.greedy(MAX_TOKENS)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), **settings.generate_kwargs(tokenizer))
    new = out[0, len(prompt_ids) :].tolist()
    return new, tokenizer.decode(new, skip_special_tokens=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The server and, per (model, prompt), the reference chat answer from `tunelab generate`'s code."""
    import tunelab
    from tunelab.data.encode import prompt_text
    from tunelab.generation import GenerationSettings, generate_text
    from tunelab.serve.app import Limits
    from tunelab.serve.bench import make_random_adapters
    from tunelab.serve.server import ServeOptions, ServerThread, Serving

    tmp = tmp_path_factory.mktemp("serve")
    runs = {
        name: train_tiny_run(tmp, val_fraction=0, rows=_rows(name), run_name=name, max_steps=5, lr=TINY_LR["lora"])
        for name in ("repeat", "reverse")
    }
    randoms = make_random_adapters("tiny-llama", tmp / "random", count=2)
    adapters = {"repeat": str(runs["repeat"].run_dir), "reverse": str(runs["reverse"].run_dir)} | randoms

    refs, chat_ids, completion_refs = {}, {}, {}
    for name in ("repeat", "reverse"):  # each run on its own, exactly as `tunelab generate RUN` loads it
        model, tokenizer = tunelab.load(runs[name].run_dir)
        for p in PROMPTS:
            refs[name, p] = generate_text(model, tokenizer, p, GenerationSettings.greedy(MAX_TOKENS))
            text = prompt_text(tokenizer, tokenizer.chat_template, [{"role": "user", "content": p}])
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            chat_ids[name, p] = (ids, _reference(model, tokenizer, ids)[0])
            completion_refs[name, p] = _reference(model, tokenizer, tokenizer(p)["input_ids"])
    model, tokenizer = tunelab.load("tiny-llama", adapters=None)
    for name in ("tiny-llama", *randoms):
        if name != "tiny-llama":
            from peft import PeftModel

            model = PeftModel.from_pretrained(tunelab.load("tiny-llama")[0], randoms[name]).eval()
        for p in PROMPTS:
            refs[name, p] = generate_text(model, tokenizer, p, GenerationSettings.greedy(MAX_TOKENS))

    logs = []
    options = ServeOptions(
        adapters=adapters,
        adapters_dir=str(tmp / "watched"),
        api_key=KEY,
        max_batch_size=16,
        max_wait_ms=5,
        max_lora_rank=32,
        watch_interval_s=3600,  # the tests call scan() themselves
        limits=Limits(max_body_bytes=64 * 1024, max_prompt_tokens=200, max_tokens=64, max_rows=8),
    )
    (tmp / "watched").mkdir()
    serving = Serving(options, log=logs.append)
    with ServerThread(serving) as url:
        yield {
            "url": url,
            "serving": serving,
            "refs": refs,
            "chat_ids": chat_ids,
            "completion_refs": completion_refs,
            "runs": runs,
            "randoms": randoms,
            "logs": logs,
            "tmp": tmp,
            "client": openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0),
        }


def _chat(client, model, prompt, **kw):
    kw = {"max_tokens": MAX_TOKENS, "temperature": 0} | kw
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **kw)


def _auth():
    return {"Authorization": f"Bearer {KEY}"}


def test_models_lists_the_base_and_each_adapter_with_its_parent(served):
    assert served["url"].startswith("http://127.0.0.1:")
    models = {m.id: m for m in served["client"].models.list()}
    assert set(models) == {"tiny-llama", "repeat", "reverse", "adapter-0", "adapter-1"}
    assert models["tiny-llama"].parent is None
    assert all(models[n].parent == "tiny-llama" for n in ("repeat", "reverse", "adapter-0"))
    assert served["client"].models.retrieve("repeat").id == "repeat"


def test_each_adapter_gives_exactly_its_own_greedy_answer(served):
    client, refs = served["client"], served["refs"]
    answers = {}
    for (name, prompt), expected in refs.items():
        reply = _chat(client, name, prompt)
        answers[name, prompt] = reply.choices[0].message.content
        assert answers[name, prompt] == expected, (name, prompt)
    # the runs learnt different things: the comparison above could tell them apart
    assert answers["repeat", PROMPTS[0]] != answers["reverse", PROMPTS[0]] != answers["tiny-llama", PROMPTS[0]]


def test_usage_counts_are_exact(served):
    client = served["client"]
    for (name, prompt), (prompt_ids, ids) in served["chat_ids"].items():
        reply = _chat(client, name, prompt)
        assert reply.usage.prompt_tokens == len(prompt_ids)
        assert reply.usage.completion_tokens == len(ids)  # EOS included, as it was generated
        assert reply.usage.total_tokens == len(prompt_ids) + len(ids)
        assert reply.choices[0].finish_reason == ("stop" if len(ids) < MAX_TOKENS else "length")


def test_streaming_gives_the_same_answer_in_pieces(served):
    client = served["client"]
    for name in ("repeat", "reverse"):
        stream = _chat(client, name, PROMPTS[1], stream=True, stream_options={"include_usage": True})
        pieces, finish, usage = [], None, None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        assert len([p for p in pieces if p]) > 1  # streamed, not sent at the end
        assert "".join(pieces) == served["refs"][name, PROMPTS[1]]
        assert finish in ("stop", "length")
        assert usage.completion_tokens == len(served["chat_ids"][name, PROMPTS[1]][1])


def test_text_completions_of_several_prompts_batched_with_padding(served):
    client = served["client"]
    reply = client.completions.create(model="reverse", prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0, n=2)
    assert len(reply.choices) == 2 * len(PROMPTS)
    for choice in reply.choices:
        ids, text = served["completion_refs"]["reverse", PROMPTS[choice.index // 2]]
        assert choice.text == text
    assert reply.usage.completion_tokens == 2 * sum(len(served["completion_refs"]["reverse", p][0]) for p in PROMPTS)


def test_stop_sequences_and_sampling_settings(served):
    client = served["client"]
    full = served["refs"]["repeat", PROMPTS[0]]
    cut = full.split()[1] if len(full.split()) > 1 else full[1:]
    reply = _chat(client, "repeat", PROMPTS[0], stop=[cut])
    assert reply.choices[0].message.content == full[: full.find(cut)].strip()
    assert reply.choices[0].finish_reason == "stop"
    sampled = [
        _chat(client, "repeat", PROMPTS[3], temperature=1.0, top_p=0.95, seed=7).choices[0].message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]  # a seed makes sampling reproducible
    several = _chat(client, "repeat", PROMPTS[3], temperature=1.0, seed=7, n=3)
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert several.choices[0].message.content == sampled[0]  # choice i samples with seed + i


def test_unknown_model_is_404_in_openai_shape(served):
    client = served["client"]
    with pytest.raises(openai.NotFoundError) as err:
        _chat(client, "no-such-adapter", "hi")
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-adapter")


ROUTES = [
    ("GET", "/v1/models"),
    ("GET", "/v1/models/repeat"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/classify"),
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/admin/adapters"),
    ("POST", "/admin/adapters"),
    ("DELETE", "/admin/adapters/repeat"),
    ("GET", "/no/such/route"),
]


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}, {"Authorization": KEY}]
)
def test_a_missing_or_wrong_key_is_401_on_every_route(served, headers):
    body = {"model": "repeat", "messages": [{"role": "user", "content": "hi"}], "name": "x", "path": "/tmp"}
    for method, path in ROUTES:
        r = HTTP.request(method, served["url"] + path, headers=headers, json=body if method == "POST" else None)
        assert r.status_code == 401, (method, path)
        assert r.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=served["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert "repeat" in [m.id for m in served["client"].models.list()]  # nothing was unloaded


def test_oversize_and_malformed_requests_are_4xx_never_500(served):
    url, client = served["url"], served["client"]
    post = lambda body, **kw: HTTP.post(url + "/v1/chat/completions", content=body, headers=_auth() | kw)  # noqa: E731
    assert post(b"x" * (65 * 1024)).status_code == 413
    assert post(b"{bad json", **{"content-type": "application/json"}).status_code == 400
    assert post(b"\xff\xfe{", **{"content-type": "application/json"}).status_code in (400, 422)
    assert post(b"[" * 50_000, **{"content-type": "application/json"}).status_code in (400, 422)
    for body, kw in ((b"[]", {"content-type": "application/json"}), (b'{"model":', {}), (b"", {})):
        r = post(body, **kw)  # not a JSON object, broken JSON sent as a form (plain curl -d), nothing: 400, said so
        assert r.status_code == 400 and "must be a JSON object" in r.json()["error"]["message"], body
    hi = [{"role": "user", "content": "hi"}]
    for body, param in (
        ({"model": "repeat"}, "messages"),
        ({"model": "repeat", "messages": "hi"}, "messages"),
        ({"model": "repeat", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"model": "repeat", "messages": hi, "max_tokens": -1}, "max_tokens"),
        ({"model": "repeat", "messages": hi, "temperature": "hot"}, "temperature"),
        ({"model": "repeat", "messages": hi, "logprobs": True}, None),  # the message names it
        ({"model": "repeat", "messages": hi, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ):
        r = post(json.dumps(body).encode(), **{"content-type": "application/json"})
        assert r.status_code == 422, body
        error = r.json()["error"]
        assert error["message"] and "Value error" not in error["message"] and error["param"] == param, (body, error)
    # neutral values clients send: no tools, vLLM's "top_k off"
    neutral = {"model": "repeat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": 0}
    for extra in ({"tools": []}, {"top_k": -1}):
        assert post(json.dumps(neutral | extra).encode(), **{"content-type": "application/json"}).status_code == 200
    with pytest.raises(openai.UnprocessableEntityError, match="max_tokens 65"):
        client.chat.completions.create(model="repeat", messages=[{"role": "user", "content": "hi"}], max_tokens=65)
    with pytest.raises(openai.UnprocessableEntityError, match="prompt has"):
        _chat(client, "repeat", "word " * 300)
    with pytest.raises(openai.UnprocessableEntityError, match="limit of 8"):
        client.completions.create(model="repeat", prompt=["a"] * 3, n=3, max_tokens=2)
    assert HTTP.get(url + "/health", headers=_auth()).json()["status"] == "ok"


def test_queue_and_concurrency_limits_are_429(served):
    serving, client = served["serving"], served["client"]
    batcher, limits = serving.batcher, serving.server.limits
    batcher.pause()  # requests are accepted and wait
    old_queue, old_concurrency = batcher.max_queue, limits.max_concurrency
    try:
        waiting = _chat(client, "repeat", PROMPTS[0], stream=True)  # the response (and its first event) has begun
        batcher.max_queue = 1
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            _chat(client, "reverse", PROMPTS[0])
        batcher.max_queue, limits.max_concurrency = old_queue, 1
        with pytest.raises(openai.RateLimitError, match="too many requests"):
            _chat(client, "reverse", PROMPTS[0])
    finally:
        batcher.max_queue, limits.max_concurrency = old_queue, old_concurrency
        batcher.resume()
    text = "".join(c.choices[0].delta.content or "" for c in waiting if c.choices)
    assert text == served["refs"]["repeat", PROMPTS[0]]


def test_an_adapter_unloaded_or_replaced_mid_stream_still_finishes_with_its_own(served):
    serving, client, url = served["serving"], served["client"], served["url"]
    runs, refs, registry = served["runs"], served["refs"], serving.registry
    load = lambda name, path: HTTP.post(url + "/admin/adapters", headers=_auth(), json={"name": name, "path": path})  # noqa: E731
    assert load("swap", str(runs["repeat"].run_dir)).status_code == 201
    old_slot = next(h for h in registry.handles() if h.name == "swap").slot
    paused = threading.Event()

    def pause_after_the_first_step():
        if not paused.is_set():
            serving.batcher.pause()
            paused.set()

    serving.batcher.step_hook = pause_after_the_first_step
    try:
        stream = _chat(client, "swap", PROMPTS[1], stream=True)
        assert paused.wait(timeout=120)
        # paused after its first token: replace `swap` with the other run, then unload it
        reply = load("swap", str(runs["reverse"].run_dir))
        assert reply.status_code == 201
        assert old_slot in registry.slots()  # the old weights stay for the request in flight
        assert HTTP.delete(url + "/admin/adapters/swap", headers=_auth()).status_code == 200
        assert "swap" not in [m.id for m in client.models.list()]
        with pytest.raises(openai.NotFoundError):
            _chat(client, "swap", PROMPTS[0])
        assert old_slot in registry.slots()
    finally:
        serving.batcher.step_hook = None
        serving.batcher.resume()
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == refs["repeat", PROMPTS[1]]  # its own adapter to the end
    assert old_slot not in registry.slots()  # and then its weights left the model


def test_two_hundred_concurrent_requests_over_four_adapters_have_no_cross_talk(served):
    refs = served["refs"]
    names = ["repeat", "reverse", "adapter-0", "adapter-1"]
    jobs = [(names[i % 4], PROMPTS[(i // 4) % len(PROMPTS)]) for i in range(200)]

    async def run():
        client = openai.AsyncOpenAI(base_url=served["url"] + "/v1", api_key=KEY, max_retries=0, timeout=300)
        async with client:
            return await asyncio.gather(*(_achat(client, name, prompt) for name, prompt in jobs))

    answers = asyncio.run(run())
    wrong = [(job, answer) for job, answer in zip(jobs, answers) if answer != refs[job]]
    assert not wrong, wrong[:3]
    metrics = HTTP.get(served["url"] + "/metrics", headers=_auth()).text
    batch_rows = _metric(metrics, "tunelab_batch_rows_sum") / _metric(metrics, "tunelab_batch_rows_count")
    assert batch_rows > 1  # the requests were batched together, not one at a time


async def _achat(client, name, prompt):
    reply = await client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS, temperature=0
    )
    return reply.choices[0].message.content


def _metric(text: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_metrics_per_adapter_and_access_log_without_prompts(served):
    secret = "a-distinctive-prompt-that-must-not-be-logged"
    _chat(served["client"], "reverse", secret)
    text = HTTP.get(served["url"] + "/metrics", headers=_auth()).text
    assert _metric(text, "tunelab_requests_total", model="reverse", outcome="ok") >= 1
    assert _metric(text, "tunelab_completion_tokens_total", model="reverse") >= 1
    assert _metric(text, "tunelab_request_latency_seconds_count", model="reverse", route="chat") >= 1
    assert "tunelab_queue_depth" in text and "tunelab_tokens_per_second" in text
    logs = served["logs"]
    assert any("POST /v1/chat/completions 200" in line for line in logs)
    assert not any(secret in line for line in logs)


def _copy_adapter(served, name, edit=None, drop=None, add=None):
    folder = served["tmp"] / "bad" / name
    shutil.copytree(served["runs"]["repeat"].run_dir / "adapter", folder)
    if edit:
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps(config | edit))
    if drop:
        (folder / drop).unlink()
    if add:
        (folder / add).write_bytes(b"\x80\x04not really a pickle")
    return str(folder)


def test_a_bad_adapter_is_a_4xx_with_the_reason_and_the_server_keeps_serving(served):
    url = served["url"]
    cases = [
        ("missing", str(served["tmp"] / "nowhere"), 422, "not a folder"),
        (
            "pickle",
            _copy_adapter(served, "pickle", drop="adapter_model.safetensors", add="adapter_model.bin"),
            422,
            "pickle",
        ),
        ("targets", _copy_adapter(served, "targets", edit={"target_modules": ["qq_proj"]}), 422, "qq_proj"),
        ("rank", _copy_adapter(served, "rank", edit={"r": 64}), 422, "rank 64"),
        ("base", _copy_adapter(served, "base", edit={"base_model_name_or_path": "minilm-l6"}), 422, "minilm-l6"),
        ("ia3", _copy_adapter(served, "ia3", edit={"peft_type": "IA3"}), 422, "IA3"),
        ("bad/name", str(served["runs"]["repeat"].run_dir), 422, "adapter name"),
        ("tiny-llama", str(served["runs"]["repeat"].run_dir), 409, "base model"),
    ]
    for name, path, status, reason in cases:
        r = HTTP.post(url + "/admin/adapters", headers=_auth(), json={"name": name, "path": path})
        assert r.status_code == status, (name, r.text)
        assert reason in r.json()["error"]["message"], (name, r.text)
    assert HTTP.post(url + "/admin/adapters", headers=_auth(), json={"name": "x"}).status_code == 422
    assert HTTP.delete(url + "/admin/adapters/never-loaded", headers=_auth()).status_code == 404
    assert HTTP.delete(url + "/admin/adapters/tiny-llama", headers=_auth()).status_code == 409
    assert (
        _chat(served["client"], "repeat", PROMPTS[0]).choices[0].message.content == served["refs"]["repeat", PROMPTS[0]]
    )


def test_a_watched_adapters_dir_loads_new_folders_and_unloads_removed_ones(served):
    watcher, client = served["serving"].watcher, served["client"]
    folder = served["tmp"] / "watched" / "watched-one"
    shutil.copytree(served["runs"]["reverse"].run_dir / "adapter", folder)
    (served["tmp"] / "watched" / "broken").mkdir()
    (served["tmp"] / "watched" / "broken" / "adapter_config.json").write_text("{not json")
    watcher.scan(settle=False)
    assert _chat(client, "watched-one", PROMPTS[0]).choices[0].message.content == served["refs"]["reverse", PROMPTS[0]]
    assert any("broken not loaded" in line for line in served["logs"])
    shutil.rmtree(folder)
    watcher.scan()
    with pytest.raises(openai.NotFoundError):
        _chat(client, "watched-one", PROMPTS[0])


def test_classification_runs_answer_labels_and_probabilities(served, tmp_path):
    import tunelab

    rows = [{"text": f"{w} {w}", "label": w.split()[0]} for w in ["good day", "bad day", "good one", "bad one"] * 3]
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tunelab.train(
        {
            "model": "tiny-bert",
            "task": "classification",
            "out_dir": str(tmp_path / "runs"),
            "run_name": "cls",
            "data": {"train": str(data), "val_fraction": 0, "max_length": 32},
            "train": {"max_steps": 2, "batch_size": 4, "precision": "fp32"},
            "lora": {"target_modules": ["query", "value"], "r": 8},
        },
        progress=False,
    ).run_dir
    url = served["url"]
    assert (
        HTTP.post(url + "/admin/adapters", headers=_auth(), json={"name": "cls", "path": str(run)}).status_code == 201
    )
    texts = ["good good", "bad day bad day bad"]
    r = HTTP.post(url + "/v1/classify", headers=_auth(), json={"model": "cls", "input": texts})
    assert r.status_code == 200, r.text
    model, tokenizer = tunelab.load(run)
    for item, text in zip(r.json()["data"], texts):
        with torch.no_grad():
            expected = model(**tokenizer(text, return_tensors="pt")).logits.softmax(-1)[0].tolist()
        assert set(item["probabilities"]) == {"bad", "good"}
        assert [item["probabilities"][label] for label in ("bad", "good")] == pytest.approx(expected, abs=1e-5)
        assert item["label"] == max(item["probabilities"], key=item["probabilities"].get)
    assert HTTP.post(url + "/v1/classify", headers=_auth(), json={"model": "repeat", "input": "x"}).status_code == 422
    with pytest.raises(openai.UnprocessableEntityError, match="classification"):
        _chat(served["client"], "cls", "hi")


def test_cli_refuses_bad_flags_with_one_line(tmp_path, capsys):
    from tunelab.cli import build_parser, main

    assert build_parser().parse_args(["serve", "--no-auth"]).host == "127.0.0.1"
    empty = tmp_path / "key"
    empty.write_text("\n")
    for argv, message in [
        (["serve"], "needs --api-key-file"),
        (["serve", "--api-key-file", str(empty)], "empty"),
        (["serve", "--api-key-file", str(tmp_path / "none")], "cannot read"),
        (["serve", "--no-auth", "--adapter", "oops"], "NAME=RUN"),
        (["serve", "--no-auth", "--max-batch-size", "0"], "--max-batch-size"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)


def test_serve_check_tells_whether_vllm_can_serve_the_adapter(served, capsys):
    from tunelab.cli import main

    run = served["runs"]["repeat"].run_dir
    assert main(["serve", "--check", str(run)]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["ready"] and report["rank"] == 16 and report["dora"] is False
    assert f"--lora-modules repeat={run / 'adapter'}" in report["command"] and "vllm serve" in out.err
    dora = _copy_adapter(served, "dora", edit={"use_dora": True, "r": 32, "modules_to_save": ["lm_head"]})
    assert main(["serve", "--check", dora]) == 2
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert not report["ready"] and "--max-lora-rank 32" in report["command"]
    assert any("DoRA" in p for p in report["problems"]) and any("modules_to_save" in p for p in report["problems"])
    assert out.err.startswith("error: ")


def test_a_client_that_goes_away_mid_stream_frees_its_rows(served):
    serving, url = served["serving"], served["url"]
    registry, batcher = serving.registry, serving.batcher
    handle = next(h for h in registry.handles() if h.name == "adapter-1")
    paused = threading.Event()

    def pause_after_the_first_step():
        if not paused.is_set():
            batcher.pause()
            paused.set()

    body = {
        "model": "adapter-1",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 64,
        "temperature": 0,
        "ignore_eos": True,  # left alone it would decode all 64 tokens
        "stream": True,
    }
    batches, on_batch = [], batcher.on_batch
    batcher.on_batch = lambda rows, tokens, seconds: batches.append(tokens)
    batcher.step_hook = pause_after_the_first_step
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", headers=_auth(), json=body) as response:
            assert response.status_code == 200
            assert paused.wait(timeout=120)
        # the connection is closed: the server cancels the request (seen in its metrics) ...
        for _ in range(600):
            text = HTTP.get(url + "/metrics", headers=_auth()).text
            if _metric(text, "tunelab_requests_total", model="adapter-1", outcome="cancelled"):
                break
            threading.Event().wait(0.05)
        assert _metric(text, "tunelab_requests_total", model="adapter-1", outcome="cancelled") == 1
        batcher.step_hook = None
        batcher.resume()
        # ... and its row leaves the batch at the next step, long before 64 tokens
        for _ in range(600):
            if batches and not registry.inflight(handle):
                break
            threading.Event().wait(0.05)
    finally:
        batcher.step_hook, batcher.on_batch = None, on_batch
        batcher.resume()
    assert registry.inflight(handle) == 0
    assert batches == [1]  # the one token decoded before the pause


def test_serve_bench_reports_each_scenario(tmp_path):
    from tunelab.serve.bench import run_serve_bench

    report = run_serve_bench("tiny-llama", requests=4, concurrency=2, max_tokens=3, rounds=1, out=tmp_path / "b.json")
    assert json.loads((tmp_path / "b.json").read_text()) == report
    assert set(report["scenarios"]) == {"base", "one_adapter", "four_adapters_mixed", "four_adapters_one_per_batch"}
    for scenario in report["scenarios"].values():
        assert scenario["completion_tokens"] == 4 * 3  # ignore_eos: every request decodes max_tokens
        assert scenario["requests_per_s"] > 0 and scenario["p95_latency_ms"] >= scenario["p50_latency_ms"] > 0
    mixed = report["scenarios"]["four_adapters_mixed"]["tokens_per_s"]
    assert report["mixed_vs_one_adapter"] == round(mixed / report["scenarios"]["one_adapter"]["tokens_per_s"], 3)
