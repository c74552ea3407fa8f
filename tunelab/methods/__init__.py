"""Tuning methods, one module per family; METHODS maps a config's `method:` to its implementation."""

from .adalora import AdaLoraMethod
from .adapter import BottleneckAdapterMethod
from .base import Method, PeftMethod
from .full import FreezeMethod, FullMethod
from .ia3 import IA3Method
from .lora import DoraMethod, LoraMethod, LoraPlusMethod, PissaMethod, QLoraMethod, RsLoraMethod
from .prompt import PrefixMethod, PromptMethod, PTuningMethod

_ALL = (
    FullMethod(),
    FreezeMethod(),
    LoraMethod(),
    QLoraMethod(),
    DoraMethod(),
    RsLoraMethod(),
    PissaMethod(),
    LoraPlusMethod(),
    BottleneckAdapterMethod(),
    PrefixMethod(),
    PromptMethod(),
    PTuningMethod(),
    IA3Method(),
    AdaLoraMethod(),
)

METHODS: dict[str, Method] = {m.name: m for m in _ALL}


def get_method(name: str) -> Method:
    return METHODS[name]


__all__ = ["METHODS", "Method", "PeftMethod", "get_method"]
