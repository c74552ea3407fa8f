"""The served models: one shared base, the adapters on it, and a registry of immutable handles.

A request is bound to a handle when it is accepted. Loading a name again makes a new handle (a new
peft adapter slot); unloading retires a handle. A retired handle's weights stay in the model until the
last request bound to it has finished, so what is in flight never changes adapter (vLLM#47724 served
an in-flight request with another adapter after a runtime load).

Kinds of handle:
- `base`: the base model itself (peft's `__base__` row in a mixed batch);
- `lora`: a LoRA adapter on the shared base, batched with any other `lora` rows (peft `adapter_names`);
- `solo`: a LoRA adapter on the shared base that peft cannot mix (DoRA): one adapter per batch;
- `own`: a run that needs a model of its own (prompt/prefix tuning, IA3, bottleneck adapters, full
  fine-tunes, PiSSA/OLoRA, QLoRA, classifiers): loaded with `tunelab.load`, one adapter per batch.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

BATCHED_METHODS = {"lora", "rslora", "loraplus", "dora"}  # plain LoRA on the unchanged base
# LoRA inits that rewrite the base weights when the adapter is loaded: never on a shared base
BASE_CHANGING_INITS = {"pissa", "olora", "corda", "eva", "loftq", "orthogonal"}
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


class AdapterError(Exception):
    """A request about an adapter that cannot be met; `status` is the HTTP status (4xx)."""

    def __init__(self, status: int, message: str, code: str = "invalid_adapter"):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class UnknownModel(AdapterError):
    def __init__(self, name: str):
        super().__init__(404, f"The model `{name}` does not exist.", code="model_not_found")


@dataclass(frozen=True, eq=False)  # identity: two loads of one name are two handles
class AdapterHandle:
    name: str  # the model id clients send
    kind: str  # base | lora | solo | own
    task: str  # causal_lm | classification
    parent: str | None
    chat_template: str | None
    system_prompt: str | None
    slot: str = ""  # the peft adapter name in the shared model (lora, solo)
    source: str | None = None
    info: dict = field(default_factory=dict)  # method, rank, target modules (for /admin)
    model: object = field(default=None, repr=False)  # own: the model of its own
    tokenizer: object = field(default=None, repr=False)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def group(self):
        """Handles with the same group can share a forward pass."""
        if self.kind in ("base", "lora"):
            return ("shared",)
        return (self.kind, self.slot or id(self))


@dataclass
class SharedBase:
    """The base model every `base`/`lora`/`solo` handle runs on, and what its adapters must match."""

    model_id: str
    path: str  # the resolved model directory (adapters name it in base_model_name_or_path)
    model: object
    tokenizer: object
    chat_template: str | None
    system_prompt: str | None
    linear_shapes: dict  # module path -> (in_features, out_features) of the base's linear layers
    max_positions: int | None

    @classmethod
    def load(cls, spec: str, device=None) -> SharedBase:
        """A model name/folder (merged and quantized exports included) or a run's model."""
        from ..loading import load

        model, tokenizer = load(spec, device=device)
        cfg = getattr(model, "tunelab_config", None)
        if hasattr(model, "peft_config"):
            raise UserError(f"--base {spec}: an adapter run is served with --adapter NAME={spec}, on its base")
        return cls.from_model(spec, model, tokenizer, cfg)

    @classmethod
    def from_model(cls, model_id: str, model, tokenizer, cfg=None) -> SharedBase:
        from torch import nn

        from ..models import resolve_model_path

        path = getattr(model.config, "_name_or_path", "") or model_id
        if cfg is None:
            try:
                path = resolve_model_path(model_id)
            except UserError:
                pass
        shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        return cls(
            model_id=str(model_id),
            path=str(path),
            model=model,
            tokenizer=tokenizer,
            chat_template=tokenizer.chat_template,
            system_prompt=cfg.data.system_prompt if cfg is not None else None,
            linear_shapes=shapes,
            max_positions=getattr(model.config, "max_position_embeddings", None),
        )

    def same_model(self, name: str) -> bool:
        from ..models import resolve_model_path

        if name == self.model_id:
            return True
        try:
            return Path(resolve_model_path(name)).resolve() == Path(self.path).resolve()
        except (UserError, OSError):
            return False


def _read_adapter_config(folder: Path) -> dict:
    from ..io import read_json_object
    from ..trust import check_adapter_folder

    try:
        check_adapter_folder(folder, allow_pickle=False)  # serving never unpickles
        return read_json_object(folder / "adapter_config.json")
    except UserError as exc:
        raise AdapterError(422, str(exc)) from None


def lora_facts(config: dict) -> dict:
    """What the checks (and `serve --check`) need from a LoRA adapter_config.json."""
    ranks = [config.get("r") or 0] + list((config.get("rank_pattern") or {}).values())
    return {
        "peft_type": config.get("peft_type"),
        "rank": max(int(r) for r in ranks if isinstance(r, (int, float))),
        "target_modules": config.get("target_modules"),
        "dora": bool(config.get("use_dora")),
        "rslora": bool(config.get("use_rslora")),
        "modules_to_save": config.get("modules_to_save") or [],
        "init": config.get("init_lora_weights", True),
        "bias": config.get("bias", "none"),
        "base_model": config.get("base_model_name_or_path"),
    }


def check_lora_for_base(folder: Path, base: SharedBase, max_rank: int) -> dict:
    """Refuse a LoRA adapter that does not fit the shared base; returns its facts."""
    from safetensors import safe_open

    from ..methods.base import check_module_names

    facts = lora_facts(_read_adapter_config(folder))
    if facts["peft_type"] != "LORA":
        raise AdapterError(422, f"{folder}: a {facts['peft_type']} adapter, not LoRA (served as a run of its own)")
    if isinstance(facts["init"], str) and facts["init"].split("_")[0] in BASE_CHANGING_INITS:
        raise AdapterError(422, f"{folder}: init_lora_weights={facts['init']!r} rewrites the base weights on load")
    if facts["rank"] > max_rank:
        raise AdapterError(422, f"{folder}: rank {facts['rank']} is above the server's --max-lora-rank {max_rank}")
    model = base.model.get_base_model() if hasattr(base.model, "get_base_model") else base.model
    try:
        check_module_names(model, {"target_modules": facts["target_modules"]})
    except UserError as exc:
        raise AdapterError(422, f"{folder}: {exc}") from None
    # every LoRA matrix must fit the base layer it adapts (a LoRA of another base does not)
    weights = folder / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
            if not match:
                continue
            module, which = match.groups()
            shape = tuple(f.get_slice(key).get_shape())
            if module not in base.linear_shapes:
                raise AdapterError(422, f"{folder}: {key} adapts '{module}', which is not a linear layer of the base")
            n_in, n_out = base.linear_shapes[module]
            if (which == "A" and shape[1:] != (n_in,)) or (which == "B" and shape[:1] != (n_out,)):
                raise AdapterError(
                    422,
                    f"{folder}: {key} has shape {list(shape)}, which does not fit '{module}' of the base "
                    f"({n_in} -> {n_out}); was it trained on another base model?",
                )
    return facts


@dataclass
class LoadPlan:
    """What a load will do, decided from the files before the model is touched."""

    kind: str
    task: str
    folder: Path | None  # the peft adapter folder (lora, solo)
    run: Path | None  # the run folder (own)
    parent: str
    chat_template: str | None
    system_prompt: str | None
    info: dict


def plan_load(path: str, base: SharedBase, max_rank: int, mixed_batching: bool = True) -> LoadPlan:
    """Validate an adapter (a run folder, or a bare peft adapter folder) against the base."""
    from ..config import load_config
    from ..data.encode import resolve_chat_template
    from ..loading import is_run_dir
    from ..methods import get_method

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise AdapterError(422, f"{folder}: not a folder (a run folder or a peft adapter folder)")
    if (folder / "config.yaml").is_file():
        if not is_run_dir(folder):
            raise AdapterError(422, f"{folder}: the run has no summary.json (unfinished?)")
        try:
            cfg = load_config(folder / "config.yaml")
        except UserError as exc:
            raise AdapterError(422, str(exc)) from None
        if cfg.allow_pickle:
            raise AdapterError(422, f"{folder}: the run reads pickle weights (allow_pickle: true); serving never does")
        template = resolve_chat_template(base.tokenizer, cfg.data.chat_template)
        info = {"method": cfg.method, "run": str(folder)}
        if cfg.task == "classification":
            return LoadPlan(
                "own", "classification", None, folder, cfg.model, None, None, info | {"labels": cfg.data.labels}
            )
        if cfg.task != "causal_lm":
            raise AdapterError(422, f"{folder}: a {cfg.task} run; serving takes causal_lm and classification runs")
        if not base.same_model(cfg.model):
            raise AdapterError(422, f"{folder}: trained on '{cfg.model}', not on the served base '{base.model_id}'")
        artifact = folder / get_method(cfg.method).artifact
        if cfg.method in BATCHED_METHODS and not cfg.quant.bits and cfg.lora.init in ("default", "gaussian"):
            facts = check_lora_for_base(artifact, base, max_rank)
            kind = "lora" if mixed_batching and not facts["dora"] else "solo"
            return LoadPlan(
                kind, "causal_lm", artifact, None, base.model_id, template, cfg.data.system_prompt, info | facts
            )
        if get_method(cfg.method).artifact == "adapter":
            _read_adapter_config(artifact)  # no pickle, whole weights
        return LoadPlan("own", "causal_lm", None, folder, base.model_id, template, cfg.data.system_prompt, info)
    if (folder / "adapter_config.json").is_file():
        facts = check_lora_for_base(folder, base, max_rank)
        if facts["base_model"] and not base.same_model(facts["base_model"]):
            raise AdapterError(
                422, f"{folder}: made for '{facts['base_model']}', not for the served base '{base.model_id}'"
            )
        kind = "lora" if mixed_batching and not facts["dora"] else "solo"
        return LoadPlan(kind, "causal_lm", folder, None, base.model_id, base.chat_template, base.system_prompt, facts)
    raise AdapterError(
        422, f"{folder}: neither a run folder (config.yaml) nor a peft adapter folder (adapter_config.json)"
    )


class AdapterRegistry:
    """Names -> handles, with the count of requests bound to each. `run_on_worker(fn)` runs `fn` on the
    thread that runs the model (between forward passes) and returns its result."""

    def __init__(self, base: SharedBase, max_rank: int = 64, mixed_batching: bool = True):
        self.base, self.max_rank, self.mixed_batching = base, max_rank, mixed_batching
        self.run_on_worker: Callable = lambda fn: fn()
        self._lock = threading.Lock()
        self._slots = itertools.count(1)
        base_handle = AdapterHandle(
            base.model_id, "base", "causal_lm", None, base.chat_template, base.system_prompt, source=base.path
        )
        self._handles: dict[str, AdapterHandle] = {base.model_id: base_handle}
        self._inflight: dict[AdapterHandle, int] = {}
        self._retired: set[AdapterHandle] = set()

    def handles(self) -> list[AdapterHandle]:
        with self._lock:
            return list(self._handles.values())

    def inflight(self, handle: AdapterHandle) -> int:
        with self._lock:
            return self._inflight.get(handle, 0)

    def acquire(self, name: str) -> AdapterHandle:
        """The handle `name` is bound to now, counted in flight until `release`."""
        with self._lock:
            handle = self._handles.get(name)
            if handle is None:
                raise UnknownModel(name)
            self._inflight[handle] = self._inflight.get(handle, 0) + 1
            return handle

    def release(self, handle: AdapterHandle) -> None:
        with self._lock:
            self._inflight[handle] -= 1
            free = self._inflight[handle] == 0 and handle in self._retired
            if self._inflight[handle] == 0:
                del self._inflight[handle]
            if free:
                self._retired.discard(handle)
        if free:
            self.run_on_worker(lambda: self._free(handle))

    def load(self, name: str, path: str) -> AdapterHandle:
        """Validate and load `path` as `name` (replacing what `name` was; requests in flight keep theirs)."""
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise AdapterError(422, f"adapter name {name!r}: use 1-64 letters, digits, '_', '-', '.', ':'")
        if name == self.base.model_id:
            raise AdapterError(409, f"'{name}' is the base model's id")
        plan = plan_load(path, self.base, self.max_rank, self.mixed_batching)
        if plan.kind == "own":
            handle = self._load_own(name, plan)
        else:
            slot = f"slot{next(self._slots)}"
            self.run_on_worker(lambda: self._load_slot(slot, plan.folder))
            handle = AdapterHandle(
                name,
                plan.kind,
                plan.task,
                plan.parent,
                plan.chat_template,
                plan.system_prompt,
                slot=slot,
                source=str(path),
                info=plan.info,
            )
        self._swap(name, handle)
        return handle

    def unload(self, name: str) -> AdapterHandle:
        if name == self.base.model_id:
            raise AdapterError(409, f"'{name}' is the base model; it cannot be unloaded")
        with self._lock:
            if name not in self._handles:
                raise UnknownModel(name)
        return self._swap(name, None)

    def _swap(self, name: str, handle: AdapterHandle | None) -> AdapterHandle | None:
        with self._lock:
            old = self._handles.pop(name, None)
            if handle is not None:
                self._handles[name] = handle
            free = old is not None and not self._inflight.get(old)
            if old is not None and not free:
                self._retired.add(old)
        if free:
            self.run_on_worker(lambda: self._free(old))
        return old

    def _load_slot(self, slot: str, folder: Path) -> None:
        """On the worker thread: the adapter's weights into the shared model as `slot`."""
        from peft import PeftModel

        from ..loading import ARTIFACT_ERRORS

        model = self.base.model
        try:
            if hasattr(model, "peft_config"):
                model.load_adapter(str(folder), adapter_name=slot, is_trainable=False)
            else:
                self.base.model = PeftModel.from_pretrained(model, str(folder), adapter_name=slot, is_trainable=False)
                self.base.model.eval()
        except ARTIFACT_ERRORS as exc:
            if hasattr(self.base.model, "peft_config") and slot in self.base.model.peft_config:
                self.base.model.delete_adapter(slot)
            raise AdapterError(422, f"{folder}: peft cannot load it: {' '.join(str(exc).split())[:300]}") from None

    def _load_own(self, name: str, plan: LoadPlan) -> AdapterHandle:
        from ..loading import load

        try:
            model, tokenizer = load(plan.run, device=next(self.base.model.parameters()).device)
        except UserError as exc:
            raise AdapterError(422, str(exc)) from None
        return AdapterHandle(
            name,
            "own",
            plan.task,
            plan.parent,
            tokenizer.chat_template,
            plan.system_prompt,
            source=str(plan.run),
            info=plan.info,
            model=model,
            tokenizer=tokenizer,
        )

    def _free(self, handle: AdapterHandle) -> None:
        """On the worker thread, once nothing in flight uses the handle: its weights leave the model."""
        model = self.base.model
        if handle.slot and hasattr(model, "peft_config") and handle.slot in model.peft_config:
            model.delete_adapter(handle.slot)

    def slots(self) -> list[str]:
        """The peft adapter names in the shared model now (loaded or retired but in flight)."""
        return list(getattr(self.base.model, "peft_config", {}) or {})
