"""The OpenAI request bodies the server accepts, as pydantic models, and OpenAI's error shape.

Fields the server cannot honour (tools, logprobs, logit_bias, penalties) are refused with a 422 that
names them, not ignored; unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 4  # as OpenAI


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    """What chat and text completions share. None means tunelab's default (GenerationSettings)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extra; -1, as 0, switches it off
    repetition_penalty: float | None = Field(None, gt=0)  # vLLM's extra
    ignore_eos: bool = False  # vLLM's extra: always decode max_tokens (load tests)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # refused unless neutral: the server does not compute them
    logprobs: bool | int | None = None
    logit_bias: dict | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    tools: list | None = None
    best_of: int | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return stops

    @model_validator(mode="after")
    def _unsupported(self):
        unsupported = [
            name
            for name, neutral in (
                ("logprobs", (None, False, 0)),
                ("logit_bias", (None,)),
                ("presence_penalty", (None, 0, 0.0)),
                ("frequency_penalty", (None, 0, 0.0)),
                ("tools", (None,)),
            )
            if getattr(self, name) not in neutral and getattr(self, name) not in ({}, [])
        ]
        if self.best_of not in (None, self.n):
            unsupported.append("best_of")
        if unsupported:
            raise ValueError(f"not supported by tunelab serve: {', '.join(unsupported)}")
        return self


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        prompts = [v] if isinstance(v, str) else v
        if not prompts:
            raise ValueError("prompt must not be empty")
        return prompts

    @field_validator("echo")
    @classmethod
    def _echo(cls, v):
        if v:
            raise ValueError("not supported by tunelab serve: echo")
        return v


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    input: str | list[str]

    @field_validator("input")
    @classmethod
    def _inputs(cls, v):
        inputs = [v] if isinstance(v, str) else v
        if not inputs:
            raise ValueError("input must not be empty")
        return inputs


class AdapterLoad(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    path: str
