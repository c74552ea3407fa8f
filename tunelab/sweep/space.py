"""SPACE.yaml: the ranges a sweep draws config values from, one dotted config key a line.

    train.lr: {low: 1.0e-5, high: 1.0e-2, log: true}   # a float range (log-uniform)
    train.batch_size: {low: 2, high: 8, step: 2}       # an int range: low and high are ints
    lora.r: [4, 8, 16, 32]                             # choices
    method: [lora, dora, ia3]                          # methods: each trial keeps only its method's sections

A key is checked the way a `key=value` override is (build_config), so a bad key or value is the same error,
naming SPACE.yaml's line. A key of a method section (lora.r) is only drawn for the methods that read it.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import optuna
import yaml

from ..config import SECTIONS, build_config, drop_unused_sections, yaml_lines
from ..errors import ConfigError
from ..methods import METHODS
from ..yamlio import flatten_dotted, read_yaml, set_dotted

RANGE_KEYS = {"low", "high", "log", "step"}
# PyYAML (YAML 1.1) reads `1e-5` as a string: a range or choice written that way is still a number
_EXPONENT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _number(value):
    return float(value) if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()) else value


def _distribution(key: str, spec, where: str) -> optuna.distributions.BaseDistribution:
    if isinstance(spec, list):
        choices = [_number(v) for v in spec]
        if not choices:
            raise ConfigError(f"{where}: {key}: the list of choices is empty")
        if any(v is not None and not isinstance(v, bool | int | float | str) for v in choices):
            raise ConfigError(f"{where}: {key}: choices must be plain values (numbers, strings, true/false)")
        if len(set(map(repr, choices))) != len(choices):
            raise ConfigError(f"{where}: {key}: a choice is listed twice")
        return optuna.distributions.CategoricalDistribution(choices)
    if not isinstance(spec, dict) or not {"low", "high"} <= set(spec) or set(spec) - RANGE_KEYS:
        raise ConfigError(
            f"{where}: {key}: expected a list of choices or {{low, high[, log][, step]}}, got {spec!r}"
            + (f" (unknown: {', '.join(sorted(set(spec) - RANGE_KEYS))})" if isinstance(spec, dict) else "")
        )
    low, high, step = _number(spec["low"]), _number(spec["high"]), _number(spec.get("step"))
    log = spec.get("log", False)
    for name, value in (("low", low), ("high", high), ("step", step)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ConfigError(f"{where}: {key}: {name} must be a number, got {value!r}")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: {key}: log must be true or false, got {log!r}")
    if not low < high:
        raise ConfigError(f"{where}: {key}: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise ConfigError(f"{where}: {key}: a log range needs low > 0 (got {low})")
    if log and step is not None:
        raise ConfigError(f"{where}: {key}: choose log or step, not both")
    if all(isinstance(v, int) for v in (low, high)) and (step is None or isinstance(step, int)):
        return optuna.distributions.IntDistribution(low, high, log=log, step=step or 1)
    return optuna.distributions.FloatDistribution(float(low), float(high), log=log, step=step)


def _samples(dist) -> list:
    """Values that stand for the whole distribution when checking it against the config."""
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return list(dist.choices)
    return [dist.low, dist.high]


class SearchSpace:
    """The parsed SPACE.yaml: dotted key -> optuna distribution (`method` first: it decides the others)."""

    def __init__(self, path: str | Path, base: dict):
        self.path = Path(path)
        try:
            text = self.path.read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot read the search space: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{self.path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        try:
            raw = read_yaml(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{self.path}:{mark.line + 1}" if mark else str(self.path)
            raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(raw, dict) or not raw:
            raise ConfigError(f"{self.path}: the search space must map dotted config keys to ranges or choices")
        self.lines = yaml_lines(text)
        self.distributions = {}
        for key in sorted(raw, key=lambda k: k != "method"):
            self.distributions[str(key)] = _distribution(str(key), raw[key], self.where(str(key)))
        self.base = base
        self.check()

    def where(self, key: str) -> str:
        return f"{self.path}:{self.lines[key]}" if key in self.lines else str(self.path)

    def methods(self) -> list[str]:
        dist = self.distributions.get("method")
        return list(dist.choices) if dist is not None else [self.base.get("method")]

    def reads(self, method, key: str) -> bool:
        """Whether a trial of `method` draws `key`: a method section's keys only for the methods reading it."""
        section = key.split(".")[0]
        return section not in SECTIONS or (method in METHODS and section in METHODS[method].sections)

    def config(self, params: dict) -> dict:
        """The base config with these values set and the sections the trial's method does not read dropped."""
        data = copy.deepcopy(self.base)
        if "method" in params:  # first: a section the space sets for a method that does not read it stays an error
            data["method"] = params["method"]
            drop_unused_sections(data)
        for key, value in params.items():
            set_dotted(data, key, value)
        return data

    def check(self) -> None:
        """Every key and value must make a valid config (the override path's errors, at SPACE.yaml's lines)."""
        for key, dist in self.distributions.items():
            line = self.lines.get(key)
            # an error names the key's line, also when pydantic reports it at the section (unused_section)
            lines = {".".join(key.split(".")[:n]): line for n in range(1, key.count(".") + 2)} if line else {}
            readers = [m for m in self.methods() if self.reads(m, key)] or self.methods()[:1]
            for value in _samples(dist):
                params = {key: value} if key == "method" else {"method": readers[0], key: value}
                build_config(self.config(params), str(self.path), lines)

    def suggest(self, trial: optuna.Trial) -> dict:
        """Draw the trial's values: the method first, then the keys that method reads."""
        params = {}
        method = self.base.get("method")
        for key, dist in self.distributions.items():
            if key != "method" and not self.reads(method, key):
                continue
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                value = trial.suggest_categorical(key, dist.choices)
            elif isinstance(dist, optuna.distributions.IntDistribution):
                value = trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
            else:
                value = trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
            params[key] = value
            if key == "method":
                method = value
        return params

    def baseline(self, default_lr: float | None) -> tuple[dict | None, str | None]:
        """(the base config's own values of the space's keys, None) when they all lie in the space, else
        (None, why not): that trial is run first, so the sweep is compared with the config as written."""
        flat = flatten_dotted(self.base)
        method = self.base.get("method")
        params = {}
        for key, dist in self.distributions.items():
            if not self.reads(method, key):
                continue
            value = flat.get(key)
            if value is None and key == "train.lr":
                value = default_lr  # what the run would use
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                inside = value in dist.choices
            else:
                inside = (
                    isinstance(value, int | float) and not isinstance(value, bool) and dist.low <= value <= dist.high
                )
            if not inside:
                return None, f"the config's {key}={value!r} is outside the space"
            params[key] = value
        return params, None

    def describe(self) -> dict:
        """The space as plain data (stored with the study: a resumed sweep must search the same space)."""
        return {key: optuna.distributions.distribution_to_json(d) for key, d in self.distributions.items()}
