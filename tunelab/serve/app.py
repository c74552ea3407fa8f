"""The HTTP routes: OpenAI's chat and text completions (streamed as server-sent events), models,
classification, and the admin routes that load and unload adapters. Errors are in OpenAI's shape."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from ..generation import GenerationSettings, without_cut_character
from .adapters import AdapterError, AdapterHandle
from .batcher import Job, QueueFull
from .decode import BASE, Sequence
from .limits import Limits
from .protocol import AdapterLoad, ChatRequest, ClassifyRequest, CompletionRequest, error_body


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error(status: int, message: str, param=None, code=None, type_=None) -> JSONResponse:
    type_ = type_ or ("server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[int, str, str | None]:
    """(status, message, param: the first field at fault, as OpenAI names it)."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "The request body is not valid JSON.", None
    not_an_object = ("missing", "model_attributes_type", "model_type", "dict_type")  # empty, [], a form's text
    if any(tuple(e.get("loc", ())) == ("body",) and e.get("type") in not_an_object for e in errors):
        return 400, "The request body must be a JSON object (Content-Type: application/json).", None
    parts, params = [], []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        params.append(where)
        message = str(e.get("msg")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return 422, "; ".join(parts) or "invalid request", next((p for p in params if p), None)


class Server:
    """What the routes share: the registry, the batcher, the metrics and the limits."""

    def __init__(self, registry, batcher, metrics, limits: Limits, log=print):
        self.registry, self.batcher, self.metrics, self.limits, self.log = registry, batcher, metrics, limits, log
        self.inflight = 0

    # --- building a job
    def settings(self, req, n_index: int) -> GenerationSettings:
        defaults = GenerationSettings()
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if max_tokens is not None and max_tokens > self.limits.max_tokens:
            raise ApiError(422, f"max_tokens {max_tokens} is above the server's limit of {self.limits.max_tokens}")
        settings = GenerationSettings(
            max_new_tokens=max_tokens or min(defaults.max_new_tokens, self.limits.max_tokens),
            temperature=defaults.temperature if req.temperature is None else req.temperature,
            top_p=defaults.top_p if req.top_p is None else req.top_p,
            top_k=defaults.top_k if req.top_k is None else max(req.top_k, 0),  # vLLM: -1 is off
            repetition_penalty=req.repetition_penalty,
            seed=None if req.seed is None else req.seed + n_index,  # n choices: n reproducible streams
        )
        try:
            return settings.validate()
        except UserError as exc:
            raise ApiError(422, str(exc)) from None

    def check_prompt(self, ids: list[int]) -> None:
        limit = self.limits.max_prompt_tokens
        context = self.registry.base.max_positions
        if context is not None:
            limit = min(limit, context - 1)
        if len(ids) > limit:
            raise ApiError(422, f"the prompt has {len(ids)} tokens, above the limit of {limit}", code="prompt_too_long")

    def acquire(self, name: str, task: str) -> AdapterHandle:
        if self.inflight >= self.limits.max_concurrency:
            raise ApiError(429, f"too many requests in flight ({self.limits.max_concurrency}); retry later")
        handle = self.registry.acquire(name)
        if handle.task != task:
            self.registry.release(handle)
            route = "/v1/classify" if handle.task == "classification" else "/v1/chat/completions or /v1/completions"
            raise ApiError(422, f"model `{name}` is a {handle.task} model; use {route}", param="model")
        return handle

    def submit(self, job: Job) -> None:
        try:
            self.batcher.submit(job)
        except QueueFull as exc:
            self.registry.release(job.handle)
            raise ApiError(429, str(exc), code="queue_full") from None
        self.inflight += 1
        self.metrics.inflight.labels(job.handle.name).inc()

    def done(self, job: Job, route: str, start: float, outcome: str, prompt_tokens: int) -> None:
        self.inflight -= 1
        name = job.handle.name
        self.metrics.inflight.labels(name).dec()
        self.metrics.requests.labels(name, route, outcome).inc()
        self.metrics.latency.labels(name, route).observe(time.perf_counter() - start)
        self.metrics.prompt_tokens.labels(name).inc(prompt_tokens)
        self.metrics.completion_tokens.labels(name).inc(sum(len(s.generated) for s in job.seqs))


def _visible(text: str, finish: str | None, stops: list[str], chat: bool) -> str:
    """The part of a sequence's text that can be sent: while it runs, a tail that may still become a
    stop string, an unfinished UTF-8 character or trailing space (chat answers are stripped) waits; once it
    has finished, all of it but a character the token limit cut in two."""
    if finish is None:
        cut = text.find("\ufffd")
        if cut >= 0:
            text = text[:cut]
        hold = max((len(s) for s in stops), default=1) - 1
        if hold:
            text = text[: max(len(text) - hold, 0)]
        if chat:
            text = text.rstrip()
    else:
        text = without_cut_character(text)
        if chat:
            text = text.rstrip()
    return text.lstrip() if chat else text


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="tunelab serve", docs_url=None, redoc_url=None, openapi_url=None)
    registry, batcher = server.registry, server.batcher

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return _error(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(AdapterError)
    async def _adapter_error(request, exc: AdapterError):
        return _error(exc.status, exc.message, "model" if exc.status == 404 else None, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        status, message, param = _validation_message(exc)
        return _error(status, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        server.log(f"error: {request.method} {request.url.path}: {type(exc).__name__}: {exc}")
        return _error(500, f"internal error: {type(exc).__name__}")

    def model_card(handle: AdapterHandle) -> dict:
        return {
            "id": handle.name,
            "object": "model",
            "created": handle.created,
            "owned_by": "tunelab",
            "root": handle.source or handle.name,
            "parent": handle.parent,
            "task": handle.task,
        }

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "models": len(registry.handles()),
            "queue_depth": batcher.queue_depth(),
            "running": batcher.running_rows(),
        }

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(h) for h in registry.handles()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        for handle in registry.handles():
            if handle.name == name:
                return model_card(handle)
        raise AdapterError(404, f"The model `{name}` does not exist.", code="model_not_found")

    async def generate(req, prompts: list[list[int]], handle: AdapterHandle, route: str, chat: bool):
        start = time.perf_counter()
        try:
            rows = len(prompts) * req.n
            if rows > server.limits.max_rows:
                raise ApiError(422, f"prompts x n is {rows}, above the server's limit of {server.limits.max_rows}")
            for ids in prompts:
                server.check_prompt(ids)
            context = getattr(getattr(handle.model, "config", None), "max_position_embeddings", None)
            seqs = [
                Sequence(
                    ids,
                    server.settings(req, i),
                    adapter=handle.slot or BASE,
                    stop=tuple(req.stop),
                    ignore_eos=req.ignore_eos,
                    max_positions=context or registry.base.max_positions,
                )
                for ids in prompts
                for i in range(req.n)
            ]
        except BaseException:
            registry.release(handle)
            raise
        loop = asyncio.get_running_loop()
        job = Job(handle, seqs, loop=loop, updates=asyncio.Queue())
        server.submit(job)
        prompt_tokens = sum(len(ids) for ids in prompts)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())

        def usage() -> dict:
            completion = sum(len(s.generated) for s in seqs)
            return {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
            }

        if req.stream:
            return StreamingResponse(
                _stream(server, job, req, route, chat, ident, created, start, prompt_tokens, usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        outcome = "cancelled"  # unless the loop below ends
        try:
            while True:
                update = await job.updates.get()
                if update.done:
                    break
            outcome = "error" if update.error else "ok"
            if update.error:
                raise ApiError(500, f"generation failed: {update.error}")
        finally:
            if not job.finished:
                job.cancel()  # the client went away
            server.done(job, route, start, outcome, prompt_tokens)
        choices = []
        for index, (text, finish, _) in enumerate(update.states):
            text = _visible(text, finish, req.stop, chat)
            choice = {"index": index, "finish_reason": finish, "logprobs": None}
            choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            choices.append(choice)
        return {
            "id": ident,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": handle.name,
            "choices": choices,
            "usage": usage(),
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        from ..data.encode import prompt_text

        handle = server.acquire(req.model, "causal_lm")
        try:
            tokenizer = handle.tokenizer or registry.base.tokenizer
            messages = [m.as_dict() for m in req.messages]
            text = prompt_text(tokenizer, handle.chat_template, messages, handle.system_prompt)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        except BaseException as exc:
            registry.release(handle)
            if isinstance(exc, Exception) and not isinstance(exc, ApiError):
                raise ApiError(422, f"cannot render the messages with the chat template: {exc}") from None
            raise
        return await generate(req, [ids], handle, "chat", chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        handle = server.acquire(req.model, "causal_lm")
        tokenizer = handle.tokenizer or registry.base.tokenizer
        prompts = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in req.prompt]
        if any(not ids for ids in prompts):
            registry.release(handle)
            raise ApiError(422, "a prompt has no tokens", param="prompt")
        return await generate(req, prompts, handle, "completions", chat=False)

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest):
        handle = server.acquire(req.model, "classification")
        start = time.perf_counter()
        try:
            tokenizer = handle.tokenizer
            ids = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in req.input]
            if len(ids) > server.limits.max_rows:
                raise ApiError(422, f"{len(ids)} inputs, above the server's limit of {server.limits.max_rows}")
            for row in ids:
                server.check_prompt(row)
        except BaseException:
            registry.release(handle)
            raise
        job = Job(handle, classify_ids=ids, loop=asyncio.get_running_loop(), updates=asyncio.Queue())
        server.submit(job)
        outcome = "cancelled"
        try:
            update = await job.updates.get()
            outcome = "error" if update.error else "ok"
            if update.error:
                raise ApiError(500, f"classification failed: {update.error}")
        finally:
            if not job.finished:
                job.cancel()
            server.done(job, "classify", start, outcome, sum(len(r) for r in ids))
        id2label = handle.model.config.id2label
        data = []
        for index, probs in enumerate(update.result):
            best = max(range(len(probs)), key=probs.__getitem__)
            data.append(
                {
                    "index": index,
                    "label": id2label[best],
                    "probabilities": {id2label[i]: p for i, p in enumerate(probs)},
                }
            )
        tokens = sum(len(r) for r in ids)
        return {
            "object": "list",
            "model": handle.name,
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    @app.get("/admin/adapters")
    async def list_adapters():
        return {
            "object": "list",
            "data": [
                model_card(h) | {"kind": h.kind, "info": h.info, "in_flight": registry.inflight(h)}
                for h in registry.handles()
            ],
            "slots": registry.slots(),
        }

    @app.post("/admin/adapters", status_code=201)
    async def load_adapter(body: AdapterLoad):
        handle = await asyncio.to_thread(registry.load, body.name, body.path)
        server.log(f"loaded adapter {handle.name} ({handle.kind}) from {handle.source}")
        return model_card(handle) | {"kind": handle.kind, "info": handle.info}

    @app.delete("/admin/adapters/{name:path}")
    async def unload_adapter(name: str):
        old = await asyncio.to_thread(registry.unload, name)
        server.log(f"unloaded adapter {name} ({registry.inflight(old)} requests in flight keep it until they finish)")
        return {"id": name, "object": "model", "deleted": True}

    return app


async def _stream(server: Server, job: Job, req, route, chat, ident, created, start, prompt_tokens, usage):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    name = job.handle.name

    def event(choices, **extra) -> str:
        body = {"id": ident, "object": kind, "created": created, "model": name, "choices": choices} | extra
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def choice(index, text=None, finish=None, role=False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}

    sent = [""] * len(job.seqs)
    closed = [False] * len(job.seqs)
    outcome, first = "cancelled", True  # unless the stream ends
    try:
        if chat:
            yield event([choice(i, role=True) for i in range(len(job.seqs))])
        while True:
            update = await job.updates.get()
            for index, (text, finish, _) in enumerate(update.states):
                if closed[index]:
                    continue
                visible = _visible(text, finish, req.stop, chat)
                if visible.startswith(sent[index]) and len(visible) > len(sent[index]):
                    if first:
                        server.metrics.first_token.labels(name).observe(time.perf_counter() - start)
                        first = False
                    yield event([choice(index, visible[len(sent[index]) :])])
                    sent[index] = visible
                if finish in ("stop", "length"):
                    yield event([choice(index, finish=finish)])
                    closed[index] = True
            if update.done:
                break
        if update.error:
            outcome = "error"
            yield f"data: {json.dumps(error_body(f'generation failed: {update.error}', 'server_error'))}\n\n"
        else:
            outcome = "ok"
            if req.stream_options is not None and req.stream_options.include_usage:
                yield event([], usage=usage())
        yield "data: [DONE]\n\n"
    finally:
        if not job.finished:
            job.cancel()  # the client went away: its rows leave the batch
        server.done(job, route, start, outcome, prompt_tokens)
