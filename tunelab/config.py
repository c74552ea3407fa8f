"""Typed run configuration: YAML file + `dotted.key=value` overrides, validated by pydantic.

Unknown keys and bad values are errors that name the key (and the YAML line where known) and
suggest the closest valid key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError


class Section(BaseModel):
    # coerce numbers: YAML reads `run_name: 2024` as an int, which is still a fine name
    # no inf/nan: `lr: .inf` is never meant
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True, allow_inf_nan=False)


class DataConfig(Section):
    train: str | None = None
    eval: str | None = None
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    format: Literal["auto", "alpaca", "input_target", "messages", "sharegpt", "text", "classification"] = "auto"
    max_length: int = Field(512, ge=8)
    # "auto": the tokenizer's own template (ChatML if it has none); "chatml"; or a Jinja template string.
    chat_template: str = "auto"
    system_prompt: str | None = None
    loss_on: Literal["completion", "all"] = "completion"
    skip_invalid: bool = False
    # classification: the label names in class-id order; filled from the training data when unset
    labels: list[str] | None = None

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, v):
        repeated = sorted({label for label in v if v.count(label) > 1}) if v else []
        if repeated:
            raise ValueError(f"label names must be distinct (class ids follow their order), repeated: {repeated}")
        return v


def positive_values(patterns: dict, what: str) -> dict:
    """Validate a pattern -> number mapping whose numbers must all be > 0."""
    for pattern, value in patterns.items():
        if value <= 0:
            raise ValueError(f"{what} for '{pattern}' must be > 0, got {value}")
    return patterns


class TrainConfig(Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0)  # None: the method's default (tunelab methods)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # None: pack wherever it is exact (causal LM, methods that do not prepend virtual tokens)
    packing: bool | None = None
    group_by_length: bool = False  # without packing: batch examples of similar length (less padding)
    gradient_checkpointing: bool = False
    auto_batch_size: bool = False  # on out-of-memory, halve the micro-batch (more accumulation, same step)
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="over several processes: ddp keeps the whole model in each; fsdp shards parameters, gradients "
        "and optimizer state (FSDP2), same numbers (`tunelab train --shard`)",
    )
    log_every: int = Field(1, ge=1)
    eval_every: int | None = Field(None, ge=1)
    save_every: int | None = Field(None, ge=1)
    save_total_limit: int | None = Field(None, ge=1)
    early_stopping_patience: int | None = Field(None, ge=1)
    metric_for_best: str = "eval_loss"
    # module-name glob pattern -> LR multiplier, applied as optimizer parameter groups
    lr_groups: dict[str, float] = Field(default_factory=dict)

    @field_validator("lr_groups")
    @classmethod
    def _positive_multipliers(cls, v):
        return positive_values(v, "multiplier")


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # None: peft's default for the architecture (q/v projections); "all-linear"; or a list of names.
    target_modules: str | list[str] | None = None
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    dora: bool = False
    rslora: bool = False
    init: Literal["default", "gaussian", "pissa", "olora"] = "default"
    lr_ratio: float | None = Field(None, gt=0)  # LoRA+: B matrices at lr_ratio x the base LR
    modules_to_save: list[str] | None = None

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _positive_per_module(cls, v):
        return positive_values(v, "value")


class QuantConfig(Section):
    bits: Literal[4, 8] | None = None  # 4: QLoRA (NF4 base weights); 8: LLM.int8 base weights
    type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bf16", "fp32", "fp16"] = "auto"  # auto: bf16 where native, else fp32


class AdapterConfig(Section):
    kind: Literal["houlsby", "pfeiffer"] = "houlsby"
    reduction: int = Field(16, ge=1)  # hidden size / bottleneck size
    non_linearity: Literal["relu", "gelu", "silu"] = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class VirtualTokensConfig(Section):
    num_virtual_tokens: int = Field(20, ge=1)
    init_text: str | None = None  # prompt tuning: initialise the soft prompt from this text
    encoder_hidden_size: int | None = Field(None, ge=1)  # ptuning: the prompt encoder's MLP width
    projection: bool = False  # prefix: reparameterise the prefix through an MLP


class FreezeConfig(Section):
    # the last N blocks, or explicit block indices (negative counts from the end) / parameter-name patterns
    trainable_layers: int | list[int | str] = 2
    train_embeddings: bool = False
    train_lm_head: bool = False
    train_norm: bool = True  # the final norm

    @field_validator("trainable_layers")
    @classmethod
    def _layer_count(cls, v):
        if isinstance(v, int) and v < 0:
            raise ValueError(f"a number of blocks must be >= 0, got {v} (a list like [-1] picks blocks from the end)")
        if isinstance(v, list) and not v:
            raise ValueError("an empty list trains no block; give a number or block indices / name patterns")
        return v


class AdaLoraSection(Section):
    init_r: int = Field(12, ge=1)
    target_r: int = Field(8, ge=1, validate_default=True)
    tinit_ratio: float = Field(0.1, ge=0.0, lt=1.0)  # share of steps before rank pruning starts
    tfinal_ratio: float = Field(0.2, ge=0.0, lt=1.0, validate_default=True)  # share of final steps at the target budget
    delta_t: int = Field(1, ge=1)  # steps between budget reallocations
    orth_reg_weight: float = Field(0.5, ge=0.0)

    # field validators run in field order, so the fields they compare with are already in info.data
    @field_validator("target_r")
    @classmethod
    def _budget_shrinks(cls, v, info):
        init_r = info.data.get("init_r")
        if init_r is not None and v > init_r:
            raise ValueError(f"must be <= init_r ({init_r}): the rank budget only shrinks")
        return v

    @field_validator("tfinal_ratio")
    @classmethod
    def _leaves_budgeting_steps(cls, v, info):
        tinit = info.data.get("tinit_ratio")
        if tinit is not None and tinit + v >= 1:
            raise ValueError(f"tinit_ratio + tfinal_ratio ({tinit} + {v}) must be < 1 (steps left for rank budgeting)")
        return v


class IA3Section(Section):
    target_modules: list[str] | None = None  # None: peft's default for the architecture
    feedforward_modules: list[str] | None = None


class EvalConfig(Section):
    generate: bool = True  # causal LMs: also generate answers and score them (exact match, BLEU, ROUGE)
    max_new_tokens: int = Field(128, ge=1)
    max_examples: int | None = Field(None, ge=1)  # cap the generation eval (it is the slow part)
    lang: str = "auto"  # "zh" tokenizes BLEU/ROUGE for Chinese; auto detects CJK references
    scorer: str | None = None  # "module:function(prediction, reference, record) -> float"

    @field_validator("scorer")
    @classmethod
    def _module_function(cls, v):
        if v is not None and not re.fullmatch(r"[\w.]+:\w+", v):
            raise ValueError("must be 'module:function', e.g. my_scores:exact")
        return v


class Config(Section):
    model: str = "smollm2-135m-instruct"
    method: str = "lora"
    task: Literal["causal_lm", "classification"] = "causal_lm"
    run_name: str | None = None
    out_dir: str = "runs"
    seed: int = 0
    trust_remote_code: bool = False
    allow_pickle: bool = False  # read pickle weights (pytorch_model.bin, *.pt, ...): unpickling can run code
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    prefix: VirtualTokensConfig = Field(default_factory=VirtualTokensConfig)
    prompt: VirtualTokensConfig = Field(default_factory=VirtualTokensConfig)
    ptuning: VirtualTokensConfig = Field(default_factory=VirtualTokensConfig)
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    adalora: AdaLoraSection = Field(default_factory=AdaLoraSection)
    ia3: IA3Section = Field(default_factory=IA3Section)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    adapter_name: str = "default"  # the task name when several adapters share a base (tunelab.load adapters=)

    @field_validator("method")
    @classmethod
    def _known_method(cls, v):
        from .methods import METHODS

        if v not in METHODS:
            raise ValueError(f"unknown method '{v}'{_suggest(v, METHODS)}; choose from {', '.join(METHODS)}")
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

    @model_validator(mode="after")
    def _method_defaults(self):
        """Fill what depends on the method (the default LR), so the saved config is fully resolved."""
        if self.train.lr is None:
            from .methods import METHODS

            self.train.lr = METHODS[self.method].default_lr
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

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


def plain_name_problem(name: str) -> str | None:
    """Why `name` cannot be one folder name directly inside another (None when it can): run names
    must not reach outside out_dir."""
    if not name or name in (".", ".."):
        return f"'{name}' is not a folder name"
    if "/" in name or "\\" in name:
        return "it contains a path separator"
    if any(ord(c) < 32 for c in name):
        return "it contains a control character (NUL, newline, ...)"
    if len(name.encode("utf-8")) > 200:
        return "it is longer than 200 bytes"
    return None


def _suggest(word: str, choices) -> str:
    choices = list(choices)
    alias = _ALIASES.get(str(word).lower())
    if alias in choices:
        return f" (did you mean '{alias}'?)"
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _section_fields(path: tuple) -> dict:
    """Valid keys at a dotted path, for suggestions."""
    model: Any = Config
    for part in path:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return {}
        model = field.annotation
    return model.model_fields


def _yaml_lines(text: str) -> dict:
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML whose mappings refuse a repeated key: a second `train:` block would silently replace the first."""

    def construct_mapping(self, node, deep=False):
        if not isinstance(node, yaml.MappingNode):  # `!!map [1]`: PyYAML's own error
            return super().construct_mapping(node, deep)
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
                seen[key] = first or key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: yaml's own error follows
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (first set on line {first})", key_node.start_mark
                )
        return super().construct_mapping(node, deep)


def read_yaml(text: str):
    """Parse YAML text safely, refusing repeated keys. Every failure is a yaml.YAMLError: PyYAML's value
    constructors raise plain Python errors for `2024-13-45`, `!!int x`, a 5000-digit number, deep nesting."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        raise
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as exc:
        raise yaml.YAMLError(
            f"cannot read a value ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        ) from None


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
        key, value = parse_override(item)
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return data


def build_config(data: dict, source: str = "<config>", lines: dict | None = None) -> Config:
    """Validate a plain dict into a Config; errors name the key, line and closest valid key."""
    lines = lines or {}
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        messages = []
        for err in exc.errors():
            loc = tuple(str(p) for p in err["loc"])
            dotted = ".".join(loc)
            where = f"{source}:{lines[dotted]}" if dotted in lines else source
            if err["type"] == "extra_forbidden":
                valid = _section_fields(loc[:-1])
                hint = _suggest(loc[-1], valid)
                messages.append(f"{where}: unknown key '{dotted}'{hint}")
            else:
                msg = err["msg"].removeprefix("Value error, ")
                hint = ""
                if err["type"] == "literal_error" and isinstance(err.get("input"), str):
                    hint = _suggest(err["input"], re.findall(r"'([^']*)'", err["ctx"]["expected"]))
                messages.append(f"{where}: {dotted}: {msg} (got {err.get('input')!r}){hint}")
        raise ConfigError("invalid config:\n  " + "\n  ".join(messages)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults when path is None) and apply overrides."""
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
        lines = _yaml_lines(text)
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
    return build_config(data, source, lines)
