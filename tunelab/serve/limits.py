"""A request's limits (their own module: the command line reads the defaults without importing fastapi)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 4096  # also bounded by the model's context length
    max_tokens: int = 1024  # the largest max_tokens a request may ask for
    max_concurrency: int = 256  # requests accepted and not yet answered (streams included)
    max_rows: int = 16  # prompts x n of one request
