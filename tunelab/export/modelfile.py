"""An Ollama `Modelfile` for a GGUF export: TEMPLATE (Go text/template) and stop parameters that give the
prompt the model's chat template gives.

A Jinja chat template cannot be translated in general, so the template's format is recognised instead: it
is rendered on a probe conversation and compared with what each known format (ChatML, Llama 3) renders;
the matching format's Go template goes in the Modelfile. The template's default system prompt (SmolLM2's
"You are a helpful AI assistant named SmolLM...") and the run's data.system_prompt become its SYSTEM, which
Ollama passes as `.System` when a conversation has no system turn of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.encode import render, template_default_system
from ..errors import UserError


@dataclass(frozen=True)
class ChatFormat:
    name: str
    template: str  # Ollama's Go template (.System, .Messages with .Role / .Content)
    stops: tuple[str, ...]

    def render(self, system: str | None, messages: list[dict]) -> str:
        """What the format renders for a conversation (to recognise a Jinja template; mirrors `template`)."""
        raise NotImplementedError


class _ChatML(ChatFormat):
    def render(self, system, messages):
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return head + turns + "<|im_start|>assistant\n"


class _Llama3(ChatFormat):
    def render(self, system, messages):
        head = f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>" if system else ""
        turns = "".join(
            f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in messages
        )
        return "<|begin_of_text|>" + head + turns + "<|start_header_id|>assistant<|end_header_id|>\n\n"


CHATML = _ChatML(
    "chatml",
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    '{{- range .Messages }}{{- if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
    "{{ end }}{{- end }}<|im_start|>assistant\n",
    ("<|im_end|>", "<|im_start|>"),
)
LLAMA3 = _Llama3(
    "llama3",
    "<|begin_of_text|>{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    '{{- range .Messages }}{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
    "{{ .Content }}<|eot_id|>{{ end }}{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
    ("<|eot_id|>", "<|start_header_id|>"),
)
FORMATS = (CHATML, LLAMA3)

_PROBE = [
    {"role": "user", "content": "first question"},
    {"role": "assistant", "content": "first answer"},
    {"role": "user", "content": "second question"},
]


def chat_format(tokenizer, template: str) -> ChatFormat:
    """The known format whose rendering equals the Jinja template's on a two-turn probe (with a system turn)."""
    messages = [{"role": "system", "content": "probe system"}, *_PROBE]
    jinja = render(tokenizer, template, messages, add_generation_prompt=True)
    for fmt in FORMATS:
        if fmt.render("probe system", _PROBE) == jinja:
            return fmt
    raise UserError(
        f"--format ollama: the chat template is none of the formats tunelab writes Ollama templates for "
        f"({', '.join(f.name for f in FORMATS)}); export --format gguf and write the Modelfile's TEMPLATE by hand"
    )


def _quoted(text: str) -> str:
    if '"""' in text:
        raise UserError('--format ollama: the system prompt contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile_text(tokenizer, template: str, gguf_name: str, system: str | None) -> str:
    """The Modelfile: FROM the GGUF beside it, TEMPLATE, SYSTEM (the run's or the template's default), stops."""
    fmt = chat_format(tokenizer, template)
    system = system if system is not None else template_default_system(tokenizer, template)
    stops = list(dict.fromkeys([*fmt.stops, *([tokenizer.eos_token] if tokenizer.eos_token else [])]))
    lines = [f"FROM ./{gguf_name}", "", f"TEMPLATE {_quoted(fmt.template)}", ""]
    if system:
        lines += [f"SYSTEM {_quoted(system)}", ""]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += ["PARAMETER temperature 0", ""]
    return "\n".join(lines)


def parse_modelfile(text: str) -> dict:
    """TEMPLATE, SYSTEM and the stop parameters of a Modelfile this module wrote (for checks and tests)."""
    out: dict = {"stops": []}
    rest = text
    for key in ("TEMPLATE", "SYSTEM"):
        marker = f'{key} """'
        if marker in rest:
            start = rest.index(marker) + len(marker)
            out[key.lower()] = rest[start : rest.index('"""', start)]
    for line in text.splitlines():
        if line.startswith('PARAMETER stop "'):
            out["stops"].append(line[len('PARAMETER stop "') : -1])
    return out
