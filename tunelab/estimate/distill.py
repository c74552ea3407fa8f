"""What a distillation run (a `distill` section) adds to an estimate: the teacher held in memory (fp32 weights,
no gradients: tunelab.distill.teacher.load_teacher) and its forward on every micro-batch, and the KD loss's
buffers in place of plain cross-entropy's. With distill.keep_every the student is the teacher's architecture
with blocks 0, k, 2k, ... kept: its config is made here by arithmetic, no weights are copied.

With distill.cache the teacher runs once before training, not every step: no teacher FLOPs per step, and its
weights are only held before training starts (the peak is then the larger of that phase and training's).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

# per label position of a chunk and vocabulary entry: the student's fp32 logits, both softened log-softmaxes,
# the teacher's logits, the KL terms and the cross-entropy's log-softmax (the KD loss is not fused like plain
# fine-tuning's; tunelab.distill.loss). Checked on one tiny-llama cell (student keep_every 2, 4 x 256, loss on
# every token, bf16: the term is 1,339 of 1,878 MiB predicted; measured peak 1,917 MiB, -2%)
KD_LOGIT_BYTES = 28


@dataclass
class Teacher:
    name: str
    params: int  # every parameter of the teacher's model (a run's adapters are merged into it)
    embedding: int  # its input embedding (a lookup) and an untied LM head (run at label positions only)
    cache: bool


def distill_setup(cfg):
    """(cfg whose `model` holds the student's tokenizer, the student's transformers config, Teacher) for a config
    with a distill section."""
    from ..blocks import every_kth
    from ..config import build_config
    from ..distill.teacher import teacher_model_name
    from .params import meta_model, model_config

    name = teacher_model_name(cfg.distill.teacher)
    teacher_cfg = build_config(cfg.to_dict() | {"model": name})
    t_config = model_config(teacher_cfg)
    t_model = meta_model(teacher_cfg, copy.deepcopy(t_config))
    emb, head = t_model.get_input_embeddings(), t_model.get_output_embeddings()
    outside = {id(m.weight): m.weight.numel() for m in (emb, head) if m is not None}  # a tied head counts once
    teacher = Teacher(
        cfg.distill.teacher, sum(p.numel() for p in t_model.parameters()), sum(outside.values()), cfg.distill.cache
    )
    del t_model
    if cfg.distill.keep_every is None:
        return cfg, model_config(cfg), teacher
    config = copy.deepcopy(t_config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kept = every_kth(text.num_hidden_layers, cfg.distill.keep_every)
    text.num_hidden_layers = len(kept)
    if isinstance(getattr(text, "layer_types", None), list):  # per-block attention kinds follow the kept blocks
        text.layer_types = [text.layer_types[i] for i in kept]
    return teacher_cfg, config, teacher


def add_teacher_terms(terms: dict, teacher: Teacher, shape, cfg, method, work) -> dict:
    """The memory terms of a distillation step: the teacher's weights (live teacher) and the KD loss's buffers
    instead of cross-entropy's."""
    from .memory import loss_positions

    terms = {k: v for k, v in terms.items() if k != "total"}
    terms["teacher_weights"] = 0 if teacher.cache else 4 * teacher.params
    positions, outputs, _ = loss_positions(shape, cfg, method, work)
    terms["logits_and_loss"] = positions * outputs * KD_LOGIT_BYTES
    terms = {k: int(v) for k, v in terms.items()}
    terms["total"] = sum(terms.values())
    return terms


def teacher_flops(teacher: Teacher, shape, step_tokens: int, step_label_positions: int) -> float:
    """The teacher's forward over a step: 2 FLOPs per block weight and token, its LM head at label positions."""
    if teacher.cache:
        return 0.0
    return 2.0 * (teacher.params - teacher.embedding) * step_tokens + 2.0 * shape.vocab * shape.hidden * (
        step_label_positions
    )
