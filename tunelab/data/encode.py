"""Rendering conversations with a chat template, tokenizing, and masking the prompt.

Labels are -100 on everything the model should not learn (the prompt, padding) and equal to the
input ids on completion tokens. Each assistant turn's loss span runs to and includes the template's
end-of-turn token, so a fine-tuned model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import DataError
from .formats import Example

IGNORE_INDEX = -100

# Used when a tokenizer has no chat template of its own: ChatML, closed by the tokenizer's EOS.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def resolve_chat_template(tokenizer, setting: str = "auto") -> str:
    """The template to use: the tokenizer's own for `auto` (ChatML if none), ChatML, or a Jinja string."""
    if setting == "auto":
        return tokenizer.chat_template or CHATML_TEMPLATE
    if setting == "chatml":
        return CHATML_TEMPLATE
    return setting


def end_token_id(tokenizer) -> int:
    for tok_id in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if tok_id is not None:
            return tok_id
    raise DataError("<tokenizer>", None, "the tokenizer has neither an EOS nor a SEP token to end examples with")


@dataclass
class EncodeStats:
    examples: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    lengths: list = field(default_factory=list)


def render(
    tokenizer, template: str, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None
) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools
    )


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """The record's own system turn wins; else data.system_prompt; else the template's default (if any)."""
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}] + messages


def template_default_system(tokenizer, template: str) -> str | None:
    """The system prompt the template adds to a conversation without one (SmolLM2: "You are a helpful AI
    assistant named SmolLM..."), found by rendering with and without a marked system turn; None if none."""
    marker, user = "\x00SYSTEM\x00", "\x00USER\x00"
    try:
        plain = render(tokenizer, template, [{"role": "user", "content": user}])
        marked = render(tokenizer, template, [{"role": "system", "content": marker}, {"role": "user", "content": user}])
    except Exception:  # a template that refuses these probes has no default we can name
        return None
    head, _, tail = marked.partition(marker)
    tail = tail[: tail.find(user)] if user in tail else ""
    before_user = plain[: plain.find(user)]
    if not head or not before_user.startswith(head) or not tail or tail not in before_user[len(head) :]:
        return None
    default = before_user[len(head) : before_user.rindex(tail)]
    return default or None


def system_prompt_of(example: Example, system_prompt: str | None, default: str | None) -> tuple[str, str | None]:
    """(where the example's system prompt comes from: record / data.system_prompt / template / none, its text)."""
    if example.messages and example.messages[0]["role"] == "system":
        return "record", example.messages[0]["content"]
    if system_prompt is not None:
        return "data.system_prompt", system_prompt
    return ("template", default) if default is not None else ("none", None)


def _check_template_renders_tools(example: Example, template: str, where) -> None:
    """A template that ignores `tools` or `tool_calls` would drop them silently: refuse, naming the field."""
    if example.tools and "tools" not in template:
        raise DataError(
            where[0],
            where[1],
            "this chat template does not render tools; set data.chat_template to one that does (Qwen2.5, Llama 3.1)",
            field="tools",
        )
    for i, m in enumerate(example.messages or []):
        if m.get("tool_calls") and "tool_calls" not in template:
            raise DataError(
                where[0],
                where[1],
                "this chat template does not render tool calls; set data.chat_template to one that does "
                "(Qwen2.5, Llama 3.1)",
                field=f"turn {i} (function_call / tool_calls)",
            )


def _before_opening_answer(tokenizer, template: str, message: dict, tools=None) -> str | None:
    """The text a template renders ahead of the content of a conversation's opening assistant turn (SmolLM2: its
    default system prompt and `<|im_start|>assistant\n`), found by rendering a marker in the content's place;
    None when the marker does not come through."""
    marker = "\x00ANSWER\x00"
    head, found, _ = render(tokenizer, template, [dict(message, content=marker)], tools=tools).partition(marker)
    return head if found else None


def _completion_spans(
    tokenizer, template: str, messages: list[dict], full: str, where, tools=None, first: int = 0
) -> list[tuple[int, int]]:
    """Character spans of each assistant turn from message `first` on (content + end-of-turn marker) in the
    rendered text."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < first:
            continue
        if i:
            before = render(tokenizer, template, messages[:i], add_generation_prompt=True, tools=tools)
        else:  # an opening answer: the template may still put a default system prompt and a header before it
            before = _before_opening_answer(tokenizer, template, message, tools)
        upto = render(tokenizer, template, messages[: i + 1], tools=tools)
        if before is None or not (full.startswith(upto) and upto.startswith(before)):
            raise DataError(
                where[0],
                where[1],
                "the chat template does not render conversations prefix by prefix; use data.loss_on: all",
            )
        end = len(upto.rstrip(" \n"))  # the newline after the end-of-turn token is not part of the answer
        spans.append((len(before), end))
    return spans


@dataclass
class Rendered:
    """An example as the model sees it: the text, its tokens with their character offsets, and the labels."""

    text: str
    ids: list[int]
    labels: list[int]
    offsets: list[tuple[int, int]]  # per token; (len(text), len(text)) for an EOS tunelab appended


def render_example(
    example: Example,
    tokenizer,
    template: str,
    loss_on: str = "completion",
    system_prompt: str | None = None,
    where=("<data>", None),
    supervise_from: int = 0,
) -> Rendered:
    """Render, tokenize and label one example (no truncation). loss_on: completion (every assistant turn),
    last_turn (the last assistant turn only) or all (every token). With `supervise_from`, only the assistant
    turns from that message on are learned (a preference pair's answer after its prompt)."""
    eos = end_token_id(tokenizer)
    if example.messages is None:
        ids = tokenizer(example.text, add_special_tokens=False, return_offsets_mapping=True)
        n = len(example.text)
        return Rendered(
            example.text, ids["input_ids"] + [eos], ids["input_ids"] + [eos], ids["offset_mapping"] + [(n, n)]
        )
    _check_template_renders_tools(example, template, where)
    messages = with_system_prompt(example.messages, system_prompt)
    first = supervise_from + len(messages) - len(example.messages)  # a system prompt added in front
    full = render(tokenizer, template, messages, tools=example.tools)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if loss_on == "all":
        labels = list(ids)
    else:
        spans = _completion_spans(tokenizer, template, messages, full, where, example.tools, first)
        if loss_on == "last_turn":
            spans = spans[-1:]
        # overlap, not start: a token straddling the span start (e.g. " the" after a prompt
        # ending in a space) carries the answer's first word and must be learned
        labels = [
            tok if any(start < e and end > s for s, e in spans) else IGNORE_INDEX
            for tok, (start, end) in zip(ids, offsets)
        ]
    # a template whose turns do not end with EOS: make the last answer end with it
    last = max((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), default=None)
    # whitespace after the end-of-turn token (ChatML's newline, supervised with loss_on: all)
    # is not the end of the answer; looking past it avoids a second EOS after "<eos>\n"
    while last and labels[last - 1] != IGNORE_INDEX and ids[last] != eos and not tokenizer.decode([ids[last]]).strip():
        last -= 1
    if last is not None and ids[last] != eos:
        at = offsets[last][1]
        ids.insert(last + 1, eos)
        labels.insert(last + 1, eos)
        offsets.insert(last + 1, (at, at))
    return Rendered(full, ids, labels, offsets)


def encode_example(
    example: Example,
    tokenizer,
    template: str,
    max_length: int,
    loss_on: str = "completion",
    system_prompt: str | None = None,
    where=("<data>", None),
    supervise_from: int = 0,
) -> tuple[dict, bool]:
    """Tokenize one example. Returns ({input_ids, labels}, truncated); `supervise_from`: see render_example."""
    rendered = render_example(example, tokenizer, template, loss_on, system_prompt, where, supervise_from)
    ids, labels = rendered.ids, rendered.labels
    truncated = len(ids) > max_length
    if truncated:
        keep = kept_positions(labels, max_length)
        ids, labels = [ids[i] for i in keep], [labels[i] for i in keep]
    return {"input_ids": ids, "labels": labels}, truncated


def kept_positions(labels: list[int], max_length: int) -> list[int]:
    """Which tokens an over-long example keeps. The answer (from the first supervised token on) keeps
    what room it needs, down to half of max_length; the prompt before it loses its middle, so its
    start (system prompt, instruction) and its end (the assistant marker) stay. What is left of an
    answer longer than its room is cut from the right. Without a prompt (loss_on: all, plain text):
    the first max_length tokens."""
    first = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))
    answer = len(labels) - first
    prompt_keep = min(first, max(max_length - answer, max_length // 2))
    head = prompt_keep // 2
    prompt = list(range(head)) + list(range(first - (prompt_keep - head), first))
    return prompt + list(range(first, first + max_length - prompt_keep))


def encode_examples(
    examples: list[Example],
    tokenizer,
    template: str,
    max_length: int,
    loss_on: str,
    system_prompt: str | None = None,
    path="<data>",
) -> tuple[list[dict], EncodeStats]:
    """Encode many examples; drops (and counts) those left with no loss tokens after truncation."""
    stats = EncodeStats()
    out = []
    for ex in examples:
        enc, truncated = encode_example(ex, tokenizer, template, max_length, loss_on, system_prompt, (path, ex.line))
        stats.truncated += truncated
        # the first label can never be predicted (nothing precedes it): need one after position 0
        if not any(lab != IGNORE_INDEX for lab in enc["labels"][1:]):
            stats.dropped_no_target += 1
            continue
        enc["line"] = ex.line
        out.append(enc)
        stats.lengths.append(len(enc["input_ids"]))
    stats.examples = len(out)
    return out, stats


def prompt_text(tokenizer, template: str, messages: list[dict], system_prompt: str | None = None) -> str:
    """The rendered prompt for generation: everything up to the assistant's reply."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return render(tokenizer, template, with_system_prompt(messages, system_prompt), add_generation_prompt=True)
