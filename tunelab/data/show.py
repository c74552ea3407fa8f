"""`tunelab data show`: records rendered exactly as the model sees them, with the loss spans marked."""

from __future__ import annotations

from ..errors import position
from .encode import IGNORE_INDEX, render_example, resolve_chat_template, system_prompt_of, template_default_system
from .formats import load_examples

GREEN, RESET = "\x1b[32m", "\x1b[0m"
OPEN, CLOSE = "[[", "]]"  # without a terminal: brackets around what is trained on


def loss_char_spans(rendered) -> list[tuple[int, int]]:
    """Character ranges of the supervised tokens, adjacent tokens merged (an appended EOS: an empty range)."""
    spans: list[list[int]] = []
    for lab, (start, end) in zip(rendered.labels, rendered.offsets):
        if lab == IGNORE_INDEX:
            continue
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([start, end])
    return [(s, e) for s, e in spans]


def mark(text: str, spans: list[tuple[int, int]], colour: bool, appended_eos: list[int], eos_text: str) -> str:
    """The text with each loss span coloured (terminal) or bracketed; EOS tokens tunelab appends are shown."""
    opening, closing = (GREEN, RESET) if colour else (OPEN, CLOSE)
    out, pos = [], 0
    for start, end in spans:
        out.append(text[pos:start])
        extra = eos_text if end in appended_eos else ""
        out.append(f"{opening}{text[start:end]}{extra}{closing}")
        pos = end
    out.append(text[pos:])
    return "".join(out)


def show_file(
    path,
    tokenizer,
    n: int = 3,
    fmt: str = "auto",
    chat_template: str = "auto",
    loss_on: str = "completion",
    system_prompt: str | None = None,
    max_length: int = 512,
    colour: bool = False,
) -> str:
    """The first `n` records rendered with their chat template; what is trained on marked."""
    examples, fmt, _ = load_examples(path, fmt)
    template = resolve_chat_template(tokenizer, chat_template)
    default = template_default_system(tokenizer, template)
    legend = "loss spans in green" if colour else f"loss spans between {OPEN} and {CLOSE}"
    blocks = [f"{path}: {fmt}, {len(examples)} records; {legend}"]
    eos = tokenizer.decode([tokenizer.eos_token_id]) if tokenizer.eos_token_id is not None else ""
    for ex in examples[:n]:
        rendered = render_example(ex, tokenizer, template, loss_on, system_prompt, (path, ex.line))
        spans = loss_char_spans(rendered)
        appended = [s for s, e in rendered.offsets if s == e]
        supervised = sum(1 for lab in rendered.labels if lab != IGNORE_INDEX)
        head = f"--- {position(ex.line)}: {len(rendered.ids)} tokens, {supervised} in the loss"
        if ex.messages is not None:
            source, _ = system_prompt_of(ex, system_prompt, default)
            head += f", system prompt: {source}"
        if len(rendered.ids) > max_length:
            head += f"; longer than max_length {max_length}: the prompt loses its middle"
        if ex.unknown_fields:
            head += f"; ignored fields: {', '.join(ex.unknown_fields)}"
        blocks.append(head)
        blocks.append(mark(rendered.text, spans, colour, appended, eos))
    return "\n".join(blocks)
