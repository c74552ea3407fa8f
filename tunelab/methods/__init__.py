"""Tuning methods, one module per family; METHODS maps a config's `method:` to its implementation."""

from .base import Method
from .lora import LoraMethod

METHODS: dict[str, Method] = {m.name: m for m in (LoraMethod(),)}


def get_method(name: str) -> Method:
    return METHODS[name]


__all__ = ["METHODS", "Method", "get_method"]
