"""Prompts without answers, answered by the teacher (distill.prompts): sequence-level KD (Kim & Rush 2016).

Before training, the teacher answers every prompt of `distill.prompts` greedily (its own chat template and
system prompt, adapters merged); the answered conversations join the training set (never the validation
split), where the student learns them with the run's KD loss like any example. Answers are data: they are
written once to $TUNELAB_HOME/distill/answers-HASH.jsonl, named by a hash of the teacher, the prompts file and
the generation settings, so a resumed run or another student reads the same file back.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from ..errors import DataError
from ..io import atomic_write_jsonl
from ..log import is_rank0, log
from ..models import tunelab_home

ANSWERS_DIR = "distill"
WAIT_S = 6 * 3600  # another rank answers the prompts: how long the others wait for its file


def _teacher_identity(teacher: str) -> bytes:
    path = Path(teacher)
    if not path.is_dir():
        return teacher.encode()
    # a run: its config and summary change whenever it is trained again; a model folder: its config
    files = [path / "config.yaml", path / "summary.json", path / "config.json"]
    return str(path.resolve()).encode() + b"".join(f.read_bytes() for f in files if f.is_file())


def answers_path(cfg) -> Path:
    d = cfg.distill
    h = hashlib.sha256(_teacher_identity(d.teacher))
    h.update(Path(d.prompts).read_bytes())
    h.update(f"greedy:{d.answer_tokens}".encode())
    return tunelab_home() / ANSWERS_DIR / f"answers-{h.hexdigest()[:16]}.jsonl"


def read_prompts(path) -> list[list[dict]]:
    """The conversations to answer, from records of any chat-like format: `messages` or ShareGPT
    `conversations`, alpaca `instruction` (+ `input`), `input` or `prompt` text. A final assistant turn (an
    existing answer) is dropped; what is left must end with the user's turn."""
    from ..data.formats import _SHAREGPT_ROLES, ROLES, _string, _turns, alpaca_prompt, read_records

    prompts = []
    for record in read_records(path):
        d = record.data
        if "messages" in d:
            messages = _turns(record, "messages", path, "role", "content", {r: r for r in ROLES}, need_assistant=False)
        elif "conversations" in d:
            messages = _turns(record, "conversations", path, "from", "value", _SHAREGPT_ROLES, need_assistant=False)
        elif "instruction" in d:
            messages = alpaca_prompt(record, path)
        elif "input" in d or "prompt" in d:
            messages = [{"role": "user", "content": _string(record, "input" if "input" in d else "prompt", path)}]
        else:
            raise DataError(path, record.line, "a prompt record needs messages, conversations, instruction or prompt")
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise DataError(path, record.line, "a prompt must end with a user turn (a conversation or an instruction)")
        prompts.append(messages)
    return prompts


def write_answers(cfg, progress: bool = True) -> Path:
    """The teacher's answers to distill.prompts, generated once (rank 0; other ranks wait for the file)."""
    target = answers_path(cfg)
    if target.is_file():
        return target
    if not is_rank0():
        deadline = time.time() + WAIT_S
        while not target.is_file() and time.time() < deadline:
            time.sleep(2)
        return target
    from ..eval.run import batched_answers
    from ..generation import GenerationSettings
    from ..loading import load, merged_for_inference

    prompts = read_prompts(cfg.distill.prompts)
    model, tokenizer = load(cfg.distill.teacher, trust_remote_code=cfg.trust_remote_code)
    model = merged_for_inference(model)
    t0 = time.perf_counter()
    settings = GenerationSettings.greedy(cfg.distill.answer_tokens)
    answers = batched_answers(model, tokenizer, prompts, settings, cfg.eval.batch_size, progress)
    rows = [{"messages": p + [{"role": "assistant", "content": a}]} for p, a in zip(prompts, answers) if a.strip()]
    log(
        f"distill.prompts: the teacher answered {len(rows)} of {len(prompts)} prompts in "
        f"{time.perf_counter() - t0:.0f} s ({target})"
        + (f"; {len(prompts) - len(rows)} empty answers left out" if len(rows) < len(prompts) else "")
    )
    atomic_write_jsonl(target, rows)
    return target


def answered_examples(cfg) -> list:
    """The teacher-answered examples to add to the training set (none before write_answers ran)."""
    if cfg.distill is None or not cfg.distill.prompts:
        return []
    path = answers_path(cfg)
    if not path.is_file():
        return []
    from ..data.formats import load_examples

    return load_examples(path, "messages", False)[0]
