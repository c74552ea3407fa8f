"""The teacher of a distillation run, the check that it fits the student, and a student cut from it."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from ..blocks import every_kth, keep_blocks
from ..config import load_config
from ..errors import ConfigError
from ..loading import is_run_dir, load, merged_for_inference
from ..log import log
from ..methods.full import transformer_blocks
from ..models import _materialise, load_causal_lm, load_tokenizer, resolve_model_path


def teacher_model_name(teacher: str) -> str:
    """The model whose tokenizer the teacher uses: a run's `model`, else the teacher itself."""
    if is_run_dir(teacher):
        return load_config(Path(teacher) / "config.yaml", saved_run=True).model
    return teacher


def _output_size(name: str, task: str, trust_remote_code: bool) -> int | None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(name), trust_remote_code=trust_remote_code)
    return getattr(config, "num_labels" if task == "classification" else "vocab_size", None)


def check_compatible(cfg) -> None:
    """Teacher and student must score the same tokens: the same tokenizer vocabulary and output size (causal
    LM), the same task and labels (a teacher run). A ConfigError names both models; nothing is loaded but
    tokenizers and configs."""
    teacher, student = cfg.distill.teacher, cfg.model
    if Path(teacher).is_dir() and (Path(teacher) / "config.yaml").is_file():
        t_cfg = load_config(Path(teacher) / "config.yaml", saved_run=True)
        if t_cfg.task != cfg.task:
            raise ConfigError(f"distill.teacher: the run {teacher} has task {t_cfg.task}, this run {cfg.task}")
        if cfg.task == "classification" and cfg.data.labels and t_cfg.data.labels != cfg.data.labels:
            raise ConfigError(
                f"distill.teacher: the run {teacher} has labels {t_cfg.data.labels}, this run {cfg.data.labels}"
            )
    elif cfg.task == "classification":
        raise ConfigError(
            f"distill.teacher: '{teacher}' is not a trained classification run; a classification teacher must be "
            "one (its head is trained)"
        )
    t_name = teacher_model_name(teacher)
    t_tok = load_tokenizer(t_name, cfg.trust_remote_code)
    s_tok = load_tokenizer(student, cfg.trust_remote_code)
    t_out = _output_size(t_name, "causal_lm", cfg.trust_remote_code)
    s_out = _output_size(student, "causal_lm", cfg.trust_remote_code)
    if t_tok.get_vocab() != s_tok.get_vocab() or (cfg.task == "causal_lm" and t_out != s_out):
        raise ConfigError(
            f"distill: the teacher '{teacher}' and the student '{student}' have different vocabularies "
            f"(teacher: {len(t_tok)} tokens, {t_out} logits; student: {len(s_tok)} tokens, {s_out} logits); "
            "the student needs the teacher's tokenizer (or use distill.keep_every to cut it from the teacher)"
        )


def load_teacher(cfg, device):
    """The teacher in eval mode, without gradients, fp32 weights (the run's autocast sets the compute
    precision): a run's trained model (LoRA-style adapters merged into the weights), or a base model."""
    name = cfg.distill.teacher
    if is_run_dir(name):
        model = merged_for_inference(load(name, device)[0])
    else:
        model = load_causal_lm(name, device, torch.float32, cfg.trust_remote_code, cfg.allow_pickle)
    return model.eval().requires_grad_(False)


def _weights_hash(model) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def build_student(cfg) -> Path:
    """The teacher with blocks 0, k, 2k, ... kept (distill.keep_every = k), saved once (with the teacher's
    tokenizer and chat template) under $TUNELAB_HOME/models/ (student-TEACHER-keepK-HASH), named by the weights' hash."""
    teacher = load_teacher(cfg, torch.device("cpu"))
    _, blocks = transformer_blocks(teacher)
    kept = every_kth(len(blocks), cfg.distill.keep_every)
    student = keep_blocks(teacher, kept)
    tokenizer = load_tokenizer(teacher_model_name(cfg.distill.teacher), cfg.trust_remote_code)
    if is_run_dir(cfg.distill.teacher):
        from ..data.encode import resolve_chat_template

        t_cfg = load_config(Path(cfg.distill.teacher) / "config.yaml", saved_run=True)
        tokenizer.chat_template = resolve_chat_template(tokenizer, t_cfg.data.chat_template)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(cfg.distill.teacher.rstrip("/")).name)
    name = f"student-{stem}-keep{cfg.distill.keep_every}-{_weights_hash(student)}"

    def save(out: Path) -> None:
        student.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)

    path = _materialise(name, save)
    log(f"student: blocks {kept} of the teacher's {len(blocks)} ({path})")
    return path
