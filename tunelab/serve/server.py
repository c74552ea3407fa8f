"""Putting a server together (base, adapters, batcher, app) and running it with uvicorn."""

from __future__ import annotations

import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .app import Limits, Server, create_app


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class ServeOptions:
    base: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)  # name -> run or peft adapter folder
    adapters_dir: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # None: no authentication (only with --no-auth)
    limits: Limits = field(default_factory=Limits)
    max_batch_size: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 256
    max_lora_rank: int = 64
    mixed_batching: bool = True  # False: one adapter per batch (for comparison)
    watch_interval_s: float = 2.0


def base_spec(options: ServeOptions) -> tuple[str, dict[str, str]]:
    """The base to load and the adapters to add: --base, else the first adapter run's base, else the
    default model. A LoRA run given as --base serves its base with the run as an adapter (named by its folder)."""
    from ..config import load_config
    from ..loading import is_run_dir
    from ..methods import get_method
    from ..models import DEFAULT_MODEL

    adapters = dict(options.adapters)
    base = options.base
    if base is not None and is_run_dir(base):
        cfg = load_config(Path(base) / "config.yaml")
        if get_method(cfg.method).artifact == "adapter" and cfg.task == "causal_lm":
            adapters = {Path(base).resolve().name: base} | adapters
            base = cfg.model
    if base is None:
        for run in adapters.values():
            if is_run_dir(run):
                cfg = load_config(Path(run) / "config.yaml")
                if cfg.task == "causal_lm":
                    base = cfg.model
                    break
    return base or DEFAULT_MODEL, adapters


class Serving:
    """A built server: `app` for uvicorn, and what the app needs (`start()` before, `stop()` after)."""

    def __init__(self, options: ServeOptions, log=log):
        from .adapters import AdapterError, AdapterRegistry, SharedBase
        from .batcher import Batcher
        from .metrics import ServeMetrics

        self.options = options
        base, adapters = base_spec(options)
        self.registry = AdapterRegistry(SharedBase.load(base), options.max_lora_rank, options.mixed_batching)
        self.batcher = Batcher(self.registry, options.max_batch_size, options.max_wait_ms / 1000, options.max_queue)
        self.metrics = ServeMetrics(self.batcher, self.registry)
        self.batcher.on_batch = self.metrics.on_batch
        for name, path in adapters.items():
            try:
                self.registry.load(name, path)
            except AdapterError as exc:
                raise UserError(f"--adapter {name}={path}: {exc.message}") from None
        self.server = Server(self.registry, self.batcher, self.metrics, options.limits, log)
        self.app = _wrap(create_app(self.server), options, self.metrics, log)
        self.watcher = None
        if options.adapters_dir is not None:
            from .watch import AdapterDirWatcher

            if not Path(options.adapters_dir).is_dir():
                raise UserError(f"--adapters-dir {options.adapters_dir}: not a folder")
            self.watcher = AdapterDirWatcher(self.registry, options.adapters_dir, log, options.watch_interval_s)

    def start(self) -> None:
        self.batcher.start()
        if self.watcher is not None:
            self.watcher.start()

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.batcher.stop()


def _wrap(app, options: ServeOptions, metrics, log):
    from .security import AccessLogMiddleware, ApiKeyMiddleware, BodyLimitMiddleware

    inner = BodyLimitMiddleware(app, options.limits.max_body_bytes)
    inner = ApiKeyMiddleware(inner, options.api_key)
    return AccessLogMiddleware(inner, log, metrics.on_response)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def uvicorn_server(app):
    import uvicorn

    # our access log (no prompt text) replaces uvicorn's
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def run_server(serving: Serving) -> None:
    """Serve until Ctrl-C / SIGTERM."""
    options = serving.options
    sock = bind(options.host, options.port)
    host, port = sock.getsockname()[:2]
    names = ", ".join(h.name for h in serving.registry.handles())
    auth = "API key required" if options.api_key else "no authentication (--no-auth)"
    log(f"serving {names} on http://{host}:{port}/v1 ({auth})")
    serving.start()
    try:
        uvicorn_server(serving.app).run(sockets=[sock])
    finally:
        serving.stop()
        sock.close()


class ServerThread:
    """A server on 127.0.0.1 in a background thread (tests, serve-bench): `with ServerThread(serving) as url:`."""

    def __init__(self, serving: Serving, host: str = "127.0.0.1", port: int = 0):
        self.serving, self.host, self.port = serving, host, port

    def __enter__(self) -> str:
        self.sock = bind(self.host, self.port)
        self.serving.start()
        self.uvicorn = uvicorn_server(self.serving.app)
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.uvicorn.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            threading.Event().wait(0.01)
        port = self.sock.getsockname()[1]
        return f"http://{self.host}:{port}"

    def __exit__(self, *exc) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)
        self.serving.stop()
        self.sock.close()
