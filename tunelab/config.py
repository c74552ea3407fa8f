"""Typed run configuration: YAML file + `dotted.key=value` overrides, validated by pydantic.

Unknown keys and bad values are errors that name the key (and the YAML line where known) and
suggest the closest valid key.
"""

from __future__ import annotations

import hashlib
import json
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .errors import ConfigError, did_you_mean
from .io import plain_name_problem
from .methods import METHODS
from .sections import Section, positive_values
from .tracking import MlflowConfig, WandbConfig
from .yamlio import read_yaml, set_dotted


class DataConfig(Section):
    train: str | None = Field(
        None,
        description="training data: a JSONL, JSON, CSV or Parquet file, or a folder written by datasets' save_to_disk "
        "(relative: to the config file's folder, else the working dir)",
    )
    eval: str | None = Field(None, description="evaluation data; unset: data.val_fraction of the training data")
    val_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="share of the training data held out for evaluation when data.eval is unset (classification: "
        "never a class's last training example)",
    )
    format: Literal[
        "auto",
        "alpaca",
        "input_target",
        "messages",
        "sharegpt",
        "text",
        "classification",
        "preference",
        "sharegpt_preference",
    ] = Field(
        "auto",
        description="record layout; auto detects it from the first records (preference: prompt/chosen/rejected; "
        "sharegpt_preference: conversations + chosen/rejected, as LLaMA-Factory)",
    )
    max_length: int = Field(512, ge=8, description="tokens per example; longer prompts lose their middle")
    chat_template: str = Field(
        "auto", description="auto: the tokenizer's own template (ChatML if it has none); chatml; or a Jinja template"
    )
    system_prompt: str | None = Field(
        None,
        description="system message for every example without its own (a record's system wins); replaces the "
        "template's default system prompt",
    )
    loss_on: Literal["completion", "last_turn", "all"] = Field(
        "completion",
        description="completion: loss on every assistant turn; last_turn: on the last assistant turn only; "
        "all: on every token",
    )
    balance: Literal["none", "oversample", "undersample"] = Field(
        "none",
        description="classification: oversample (repeat) minority classes or undersample (seeded) majority ones "
        "in the training split to equal class counts",
    )
    skip_invalid: bool = Field(False, description="skip invalid records (reported) instead of stopping")
    labels: list[str] | None = Field(
        None, description="classification: label names in class-id order; unset: sorted labels of the training data"
    )

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, v):
        repeated = sorted({label for label in v if v.count(label) > 1}) if v else []
        if repeated:
            raise ValueError(f"label names must be distinct (class ids follow their order), repeated: {repeated}")
        return v


class TrainConfig(Section):
    epochs: float = Field(1.0, gt=0, description="passes over the training data (ignored when max_steps is set)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; unset: from epochs")
    lr: float | None = Field(
        None, gt=0, description="peak learning rate; unset: the method's default (tunelab methods)"
    )
    batch_size: int = Field(8, ge=1, description="examples per micro-batch and process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR schedule after warmup")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="share of steps with a linear LR warmup")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay (not on biases and norms)")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm; unset: no clipping")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="compute precision; auto: bf16 where the device has it natively (CUDA, AVX512-BF16/AMX CPUs), "
        "else fp32; fp16: CUDA with loss scaling",
    )
    packing: bool | None = Field(
        None,
        description="several examples per row, attention kept per example: no padding, the same numbers; unset: on "
        "for causal LMs except prefix/prompt/ptuning (virtual tokens per row); true where it cannot work is an error",
    )
    group_by_length: bool = Field(False, description="without packing: batch examples of similar length")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, slower")
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile each decoder block (inductor: fused kernels; the first steps pay the compile "
        "time); auto: on CUDA, off on CPU (inductor's C++ compile is minutes on a small CPU, no gain measured there: "
        "see the bench section); single process only",
    )
    auto_batch_size: bool = Field(
        False, description="on out-of-memory, halve the micro-batch (more accumulation, the same step)"
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="over several processes: ddp keeps the whole model in each; fsdp shards parameters, gradients "
        "and optimizer state (FSDP2), same numbers (`tunelab train --shard`)",
    )
    log_every: int = Field(1, ge=1, description="steps between metrics.jsonl records")
    eval_every: int | None = Field(None, ge=1, description="steps between evaluations; unset: only at the end")
    save_every: int | None = Field(None, ge=1, description="steps between checkpoints (a final one is always written)")
    save_total_limit: int | None = Field(
        2,
        ge=1,
        description="checkpoints kept: the newest N, plus the best evaluated step's when it is older; unset: all",
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after this many evaluations without a better metric_for_best"
    )
    metric_for_best: str = Field(
        "eval_loss", description="metric for the best step; with eval_every, the best step becomes the final artifact"
    )
    class_weights: Literal["none", "auto"] = Field(
        "none",
        description="classification: auto weighs each class's loss by n_examples / (n_classes * n_class) of "
        "the training split (balanced); none: every example counts the same",
    )
    lr_groups: dict[str, float] = Field(
        default_factory=dict,
        description="parameter-name pattern (glob, or substring) -> LR multiplier, as optimizer groups (logged at start)",
    )
    objective: Literal["sft", "dpo", "ipo", "orpo", "simpo"] | None = Field(
        None,
        description="what the loss optimises; unset: sft, or dpo for task: preference; dpo/ipo/orpo/simpo need task: "
        "preference (the `preference` section holds their options)",
    )
    precompute_ref: bool = Field(
        False,
        description="dpo/ipo: the reference log-probs of every pair computed once before training (by the initial "
        "model) and cached in the run (reference_logps.safetensors), instead of a reference forward each step",
    )

    @field_validator("lr_groups")
    @classmethod
    def _positive_multipliers(cls, v):
        return positive_values(v, "multiplier")


class PreferenceConfig(Section):
    """Options of the preference objectives (task: preference)."""

    beta: float = Field(
        0.1,
        gt=0,
        description="dpo: strength of the pull towards the reference (reward = beta x log-ratio); ipo: its tau; "
        "simpo: the scale of the mean log-prob margin (the SimPO paper's values are around 2, far above DPO's)",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0.0,
        lt=0.5,
        description="dpo, simpo: assumed share of pairs whose labels are flipped (conservative DPO); 0: plain DPO",
    )
    orpo_lambda: float = Field(
        0.1, gt=0, description="orpo: weight of the odds-ratio term next to the SFT loss on the chosen answers"
    )
    simpo_gamma: float = Field(
        0.5,
        ge=0,
        description="simpo: target reward margin gamma: the loss pushes beta x (mean log-prob chosen - rejected) "
        "above it (0.5: TRL's default)",
    )


class DistillConfig(Section):
    """Knowledge distillation (`tunelab distill`): the run's model, the student, also learns the teacher's outputs."""

    teacher: str = Field(
        ...,
        description="the teacher: a finished run folder (its trained model), a registry name or a model folder; "
        "same tokenizer and vocabulary as the student",
    )
    keep_every: int | None = Field(
        None,
        ge=1,
        description="the student is the teacher with blocks 0, k, 2k, ... kept (weights copied), built once into "
        "$TUNELAB_HOME/models; leave `model` unset then. Unset: the student is `model`",
    )
    temperature: float = Field(
        4.0, gt=0, description="T: both distributions are softened by it; the KL term is scaled by T^2"
    )
    alpha: float = Field(
        0.7,
        ge=0.0,
        le=1.0,
        description="loss = alpha x T^2 x KL(teacher || student) + (1 - alpha) x CE(labels); per completion token "
        "(causal LM) or example (classification); 0: plain fine-tuning",
    )
    cache: bool = Field(
        False,
        description="the teacher's logits of every training example computed once before training (without "
        "gradients) and stored in the run (teacher-logits/), instead of a teacher forward each step",
    )
    top_k: int = Field(
        64,
        ge=1,
        description="with cache, causal LM: the k largest teacher logits per token are stored (the teacher "
        "distribution is renormalised over them); classification stores every class",
    )
    cache_chunk: int = Field(256, ge=1, description="with cache: examples per cache file")
    hidden_weight: float = Field(
        0.0,
        ge=0.0,
        description="beta: adds beta x the cosine distance between each kept block's output and the teacher's "
        "at the block boundary it stands for, per completion token (DistilBERT's cosine loss); needs keep_every "
        "and a live teacher (no cache); causal LM",
    )
    kd_positions: Literal["labels", "all"] = Field(
        "labels",
        description="where the KL (and hidden-state) terms are taken: the label tokens, or every token whose next "
        "token is in the same example (the prompt too: the teacher's whole next-token distribution); the CE term "
        "stays on the labels; all needs a live teacher (no cache); causal LM",
    )
    prompts: str | None = Field(
        None,
        description="a file of prompts without answers (any data format; existing answers are dropped): the "
        "teacher answers each greedily before training (stored once under $TUNELAB_HOME/distill) and the "
        "answered conversations join the training set, never the validation split (sequence-level KD); causal LM",
    )
    answer_tokens: int = Field(64, ge=1, description="with prompts: the most tokens the teacher answers with")


OBJECTIVES = {"causal_lm": ("sft",), "classification": ("sft",), "preference": ("dpo", "ipo", "orpo", "simpo")}


class EvalConfig(Section):
    generate: bool = Field(
        True, description="causal LMs: also generate answers and score them (exact match, BLEU, ROUGE)"
    )
    max_new_tokens: int = Field(128, ge=1, description="tokens generated per evaluation example")
    max_examples: int | None = Field(None, ge=1, description="cap the generation eval (the slow part); unset: all")
    batch_size: int = Field(16, ge=1, description="prompts generated together (left-padded; greedy answers unchanged)")
    latency_examples: int = Field(
        8, ge=0, description="examples also answered one at a time, for the latency figures (eval_latency_*)"
    )
    lang: str = Field(
        "auto",
        description="BLEU's tokenizer: zh splits Chinese characters (sacrebleu's zh); auto: zh where any reference "
        "has CJK text, else 13a (ROUGE always counts CJK characters one by one)",
    )
    scorer: str | None = Field(
        None, description="your own metric: 'module:function(prediction, reference, record) -> float'"
    )

    @field_validator("scorer")
    @classmethod
    def _module_function(cls, v):
        if v is not None and not re.fullmatch(r"[\w.]+:\w+", v):
            raise ValueError("must be 'module:function', e.g. my_scores:exact")
        return v


def _preference_section(data: dict) -> dict:
    """task: preference gets its `preference` section (with defaults); any other task refuses one."""
    if data.get("task") == "preference":
        return data if data.get("preference") is not None else {**data, "preference": {}}
    if data.get("preference") is not None:
        raise PydanticCustomError(
            "unused_section",
            "the 'preference' section is for task: preference (this run has task: {task}); remove it or set "
            "task: preference",
            {"section": "preference", "task": str(data.get("task", "causal_lm"))},
        )
    return data


def _tracking_sections(data: dict) -> dict:
    """report_to: mlflow / wandb get their sections (with defaults); a section of a tracker not reported to is an
    error. A single name is taken as a list of one."""
    report_to = data.get("report_to", ["tensorboard"])
    if isinstance(report_to, str):
        data = {**data, "report_to": [report_to]}
        report_to = data["report_to"]
    if not isinstance(report_to, list):
        return data  # the field's own error says why
    for name in ("mlflow", "wandb"):
        if name in report_to:
            if data.get(name) is None:
                data = {**data, name: {}}
        elif data.get(name) is not None:
            raise PydanticCustomError(
                "unused_section",
                "the '{section}' section is for report_to: [{section}] (this run reports to: {report_to}); remove it "
                "or add {section} to report_to",
                {"section": name, "report_to": ", ".join(map(str, report_to)) or "nothing"},
            )
    return data


def _rule(key: str, message: str):
    """A rule across fields, reported at `key` (its YAML line) by build_config."""
    raise PydanticCustomError("config_rule", "{key}: {message}", {"key": key, "message": message})


def section_users(methods: dict) -> dict[str, list[str]]:
    """Method section name -> the methods reading it; one class per name across methods."""
    classes: dict[str, type] = {}
    users: dict[str, list[str]] = {}
    for name, method in methods.items():
        for section, cls in method.sections.items():
            if classes.setdefault(section, cls) is not cls:
                raise TypeError(f"section '{section}' has two classes ({classes[section]}, {cls})")
            users.setdefault(section, []).append(name)
    return users


SECTION_USERS = section_users(METHODS)
SECTIONS: dict[str, type] = {name: cls for m in METHODS.values() for name, cls in m.sections.items()}
DEFAULT_METHOD = "lora"


class CommonConfig(Section):
    """What every run has; the method sections are added to Config below, from the method registry."""

    model: str = Field("smollm2-135m-instruct", description="a registry name (tunelab models), a folder or a hub id")
    method: str = Field(DEFAULT_METHOD, description="the tuning method (tunelab methods)")
    task: Literal["causal_lm", "classification", "preference"] = Field(
        "causal_lm",
        description="what the model learns; preference: from chosen/rejected answer pairs (train.objective)",
    )
    run_name: str | None = Field(
        None,
        description="the run's folder inside out_dir (a suffix is added if taken); a plain name: no `/`, `\\`, `..` or "
        "control characters, so nothing is written outside it; unset: method-model-time",
    )
    out_dir: str = Field("runs", description="folder holding the runs")
    seed: int = Field(0, description="seeds initial weights, data order, dropout and the validation split")
    trust_remote_code: bool = Field(
        False,
        description="run a local model's own Python code (`auto_map` in its config.json); without it such a model is "
        "refused with a message, with it a `warning:` line is printed",
    )
    allow_pickle: bool = Field(
        False,
        description="read pickle weights (`pytorch_model.bin`, `adapter_model.bin`) where a folder has no "
        "safetensors: unpickling can run code, so only for files you trust; without it such a folder is refused",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    preference: PreferenceConfig | None = Field(None, description="options of task: preference")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="experiment trackers the run's params, metrics per step, summary and artifact go to (besides "
        "metrics.jsonl): tensorboard (RUN/tb), mlflow (a local SQLite store by default), wandb (offline by "
        "default); []: none; a tracker that fails warns and training goes on",
    )
    mlflow: MlflowConfig | None = Field(None, description="options of report_to: mlflow")
    wandb: WandbConfig | None = Field(None, description="options of report_to: wandb")
    distill: DistillConfig | None = Field(
        None, description="knowledge distillation from a teacher (`tunelab distill`); unset: none"
    )
    adapter_name: str = Field(
        "default", description="the task name when several adapters share a base (tunelab.load adapters=)"
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, v):
        if v not in METHODS:
            raise ValueError(f"unknown method '{v}'{_suggest(v, METHODS)}; choose from {', '.join(METHODS)}")
        return v

    @field_validator("report_to")
    @classmethod
    def _each_tracker_once(cls, v):
        repeated = sorted({name for name in v if v.count(name) > 1})
        if repeated:
            raise ValueError(f"each tracker once, repeated: {repeated}")
        return v

    @field_validator("run_name", "adapter_name")
    @classmethod
    def _plain_names(cls, v, info):
        """run_name is a folder inside out_dir; adapter_name also becomes a module-name segment (no '.')."""
        if v is None:
            return v
        problem = plain_name_problem(v)
        if info.field_name == "adapter_name" and not problem and "." in v:
            problem = "it contains '.'"
        if problem:
            what = (
                "folder name inside out_dir"
                if info.field_name == "run_name"
                else "name (no '/', '.' or control characters)"
            )
            raise ValueError(f"must be a plain {what}: {problem}")
        return v

    @field_validator("out_dir")
    @classmethod
    def _usable_out_dir(cls, v):
        if not v.strip() or "\x00" in v:
            raise ValueError("must be a folder path (not empty, no NUL)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _method_sections(cls, data):
        """The method's own sections exist (with their defaults); another method's section is an error."""
        if not isinstance(data, dict):
            return data
        data = _tracking_sections(_preference_section(data))
        method = data.get("method", DEFAULT_METHOD)
        if not isinstance(method, str) or method not in METHODS:
            return data  # the method field's own error says why
        used = METHODS[method].sections
        data = dict(data)
        for name in SECTIONS:
            if name in used:
                if data.get(name) is None:
                    data[name] = {}
            elif data.get(name) is not None:
                reads = ", ".join(used) if used else "no method section"
                raise PydanticCustomError(
                    "unused_section",
                    "method '{method}' does not read the '{section}' section (it reads: {reads}); '{section}' is "
                    "for {users}: remove it or choose one of those methods",
                    {"section": name, "method": method, "reads": reads, "users": ", ".join(SECTION_USERS[name])},
                )
        return data

    @model_validator(mode="after")
    def _objective_fits_task(self):
        """The objective, its reference-model options and the loss mask must fit the task."""
        objective, allowed = self.train.objective, OBJECTIVES[self.task]
        if objective is not None and objective not in allowed:
            needs = "task: preference" if objective != "sft" else "task: causal_lm or classification"
            _rule("train.objective", f"{objective} needs {needs} (task: {self.task} trains with {', '.join(allowed)})")
        if self.train.precompute_ref and (self.task != "preference" or objective in ("orpo", "simpo")):
            _rule("train.precompute_ref", "only dpo and ipo (task: preference) have a reference model")
        if self.task == "preference" and self.data.loss_on == "all":
            _rule("data.loss_on", "all does not fit task: preference (a pair is compared on its answers only)")
        if self.distill is not None and self.task == "preference":
            _rule("distill", "distillation is for task: causal_lm or classification (not preference)")
        if self.distill is not None and self.train.distributed == "fsdp":
            _rule("distill", "a distillation run does not shard (train.distributed: fsdp); use ddp")
        if self.distill is not None and self.distill.kd_positions == "all":
            if self.distill.cache:
                _rule("distill.kd_positions", "all needs a live teacher (distill.cache: false)")
            if self.task != "causal_lm":
                _rule("distill.kd_positions", "all is for task: causal_lm")
        if self.distill is not None and self.distill.prompts and self.task != "causal_lm":
            _rule("distill.prompts", "is for task: causal_lm (the teacher answers them)")
        if self.distill is not None and self.distill.hidden_weight:
            if self.distill.keep_every is None:
                _rule(
                    "distill.hidden_weight",
                    "needs distill.keep_every (which teacher block each student block stands for)",
                )
            if self.distill.cache:
                _rule("distill.hidden_weight", "needs the live teacher's hidden states (distill.cache: false)")
            if self.task != "causal_lm":
                _rule("distill.hidden_weight", "is for task: causal_lm")
        return self

    def to_dict(self) -> dict:
        """The config as plain data; only the sections the method reads."""
        d = self.model_dump(mode="json")
        for name in ("preference", "mlflow", "wandb", "distill"):
            if d.get(name) is None:
                d.pop(name, None)
        for name in SECTIONS:
            if d.get(name) is None:
                d.pop(name, None)
        return d

    def to_yaml(self) -> str:
        d = self.to_dict()
        text = yaml.safe_dump(d, sort_keys=False, allow_unicode=True)  # Chinese stays readable
        if yaml.safe_load(text) != d:  # a raw NEL / U+2028 in a value reads back as a line break: escape
            text = yaml.safe_dump(d, sort_keys=False, allow_unicode=False)
        return text

    def hash(self) -> str:
        """Short stable hash of the resolved config (run name and output folder excluded)."""
        d = self.to_dict()
        d.pop("run_name", None)
        d.pop("out_dir", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


Config = create_model(
    "Config",
    __base__=CommonConfig,
    __doc__="A run's configuration: the common fields and, per method section, its options (None when unused).",
    **{
        name: (cls | None, Field(None, description=f"options of {', '.join(SECTION_USERS[name])}"))
        for name, cls in SECTIONS.items()
    },
)


# names other tools use for our keys; spelling distance alone would not find these
_ALIASES = {
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "lr_scheduler_type": "scheduler",
    "warmup": "warmup_ratio",
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "max_seq_length": "max_length",
    "model_name_or_path": "model",
    "output_dir": "out_dir",
}


def _suggest(word: str, choices) -> str:
    return did_you_mean(word, choices, _ALIASES)


def _section_model(annotation):
    """The Section class of a field's annotation (`X` or `X | None`), else None."""
    for candidate in typing.get_args(annotation) or (annotation,):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _section_fields(path: tuple) -> dict:
    """Valid keys at a dotted path, for suggestions."""
    model: Any = Config
    for part in path:
        field = model.model_fields.get(part)
        model = _section_model(field.annotation) if field is not None else None
        if model is None:
            return {}
    return model.model_fields


def yaml_lines(text: str) -> dict:
    """Map dotted key -> 1-based line number in the YAML text."""
    lines: dict = {}

    seen: set = set()

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode) and id(node) not in seen:  # an alias may point back at its parent
            seen.add(id(node))
            for key_node, value_node in node.value:
                key = f"{prefix}{key_node.value}"
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key + ".")

    try:
        walk(yaml.compose(text), "")
    except (yaml.YAMLError, RecursionError):
        pass
    return lines


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = read_yaml(raw) if raw.strip() else None
    except yaml.constructor.ConstructorError as exc:  # a repeated key inside an inline mapping
        raise ConfigError(f"override '{item}': {exc.problem}") from None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        set_dotted(data, *parse_override(item))
    return data


def _where(source: str, lines: dict, key: str) -> str:
    """Where a key was set: `file:line`, the override that set it or its section (a string), or the file alone."""
    at = lines.get(key)
    parts = key.split(".")
    for parent in (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)):
        if at is None and isinstance(lines.get(parent), str):  # inside an overridden section: lora={r: 0}
            at = lines[parent]
    return source if at is None else at if isinstance(at, str) else f"{source}:{at}"


def _reject_unencodable(data: dict, source: str, lines: dict) -> None:
    """A lone surrogate (YAML's "\\ud800", or an undecodable command-line byte) is no text: pydantic raises
    UnicodeEncodeError while quoting it in an error message, so it is reported here by key and line. A walk with
    its own stack: nesting and self-referring YAML aliases are pydantic's to report."""
    stack, seen = [(data, "")], set()
    while stack:
        value, dotted = stack.pop()
        if isinstance(value, (dict, list)):
            if id(value) in seen:
                continue
            seen.add(id(value))
            items = value.items() if isinstance(value, dict) else ((None, item) for item in value)
            for key, item in items:
                name = dotted if key is None else f"{dotted}.{key}" if dotted else str(key)
                stack += [(key, dotted or name), (item, name)]
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                where = _where(source, lines, dotted)
                raise ConfigError(f"{where}: {dotted or 'key'}: not text ({value!r} holds a lone surrogate)") from None


def build_config(data: dict, source: str = "<config>", lines: dict | None = None) -> Config:
    """Validate a plain dict into a Config; errors name the key, line and closest valid key."""
    lines = lines or {}
    _reject_unencodable(data, source, lines)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        messages = []
        for err in exc.errors():
            loc = tuple(str(p) for p in err["loc"])
            dotted = ".".join(loc)
            where = _where(source, lines, dotted)
            if err["type"] == "unused_section":
                messages.append(f"{_where(source, lines, err['ctx']['section'])}: {err['msg']}")
            elif err["type"] == "config_rule":
                messages.append(f"{_where(source, lines, err['ctx']['key'])}: {err['msg']}")
            elif err["type"] == "extra_forbidden":
                valid = _section_fields(loc[:-1])
                hint = _suggest(loc[-1], valid)
                messages.append(f"{where}: unknown key '{dotted}'{hint}")
            else:
                msg = err["msg"].removeprefix("Value error, ")
                hint = ""
                if err["type"] == "literal_error" and isinstance(err.get("input"), str):
                    hint = _suggest(err["input"], re.findall(r"'([^']*)'", err["ctx"]["expected"]))
                messages.append(f"{where}: {dotted}: {msg} (got {err.get('input')!r}){hint}")
        if len(messages) == 1:  # one problem, one line
            raise ConfigError(f"invalid config: {messages[0]}") from None
        raise ConfigError("invalid config:\n  " + "\n  ".join(messages)) from None


def drop_unused_sections(data: dict, keep_invalid: bool = True) -> None:
    """Drop the sections of other methods (an older tunelab saved them all; a sweep switches methods). With
    `keep_invalid` an invalid one stays, so its error is reported; a saved run drops them all (they never applied,
    and an older tunelab's fields, such as prefix.init_text, are no longer valid)."""
    method = data.get("method", DEFAULT_METHOD)
    if not isinstance(method, str) or method not in METHODS:
        return
    for name, cls in SECTIONS.items():
        if name not in METHODS[method].sections and isinstance(data.get(name), dict):
            if keep_invalid:
                try:
                    cls.model_validate(data[name])
                except ValidationError:
                    continue
            del data[name]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, saved_run: bool = False) -> Config:
    """Read a YAML config (or start from defaults when path is None) and apply overrides. `saved_run`: the
    config.yaml of a run, where an older tunelab saved every method's section: those its method does not
    read are dropped (they never applied)."""
    data: dict = {}
    lines: dict = {}
    source = "<overrides>"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        except OSError as exc:  # a directory, no permission, a symlink loop
            raise ConfigError(f"{path}: cannot read the config: {exc.strerror or exc}") from None
        try:
            data = read_yaml(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the config must be a mapping of keys to values")
        lines = yaml_lines(text)
        if saved_run:
            drop_unused_sections(data, keep_invalid=False)
        # relative data paths are relative to the config file's folder
        for key in ("train", "eval"):
            value = (data.get("data") or {}).get(key) if isinstance(data.get("data"), dict) else None
            if isinstance(value, str) and not Path(value).is_absolute():
                candidate = path.parent / value
                try:
                    exists = candidate.exists()
                except OSError:  # a name too long for the filesystem: the data loader reports it
                    exists = False
                if exists:
                    data["data"][key] = str(candidate)
    apply_overrides(data, overrides or [])
    for item in overrides or []:  # an error in an overridden key names the override, not the file's line
        key = parse_override(item)[0]
        for inside in [k for k in lines if k.startswith(key + ".")]:
            del lines[inside]
        lines[key] = f"command line {item!r}"
    return build_config(data, source, lines)
