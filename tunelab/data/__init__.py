"""Data: file formats, chat-template rendering with prompt masking, batching, and checks."""

from .dataset import PreparedData, prepare_data
from .encode import IGNORE_INDEX
from .formats import FORMATS, load_examples

__all__ = ["FORMATS", "IGNORE_INDEX", "PreparedData", "load_examples", "prepare_data"]
