"""Putting the dashboard together (app, the server's middleware) and running it with uvicorn."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..serve.security import AccessLogMiddleware, BodyLimitMiddleware
from ..serve.server import bind, log, uvicorn_server
from .app import Dashboard, create_app
from .security import LOOPBACK, DashboardKey, SameOriginMiddleware

MAX_BODY_BYTES = 1 << 20


@dataclass
class UiOptions:
    runs: list[str] = field(default_factory=lambda: ["runs"])
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None  # None: no key (the default on a loopback address; elsewhere only with --no-auth)


class UiServing:
    """The dashboard's app wrapped in the server's middleware; `start`/`stop` for `ServerThread`."""

    def __init__(self, options: UiOptions, log=log):
        dirs = [Path(d).expanduser() for d in options.runs]
        for d in dirs:
            if not d.is_dir():
                raise UserError(f"--runs {d}: not a folder")
        self.options = options
        self.dashboard = Dashboard(dirs, options.api_key)
        app = BodyLimitMiddleware(create_app(self.dashboard), MAX_BODY_BYTES)
        app = DashboardKey(app, options.api_key)
        app = SameOriginMiddleware(app, loopback=options.host in LOOPBACK)
        self.app = AccessLogMiddleware(app, log)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def run_ui(serving: UiServing) -> None:
    """Serve until Ctrl-C / SIGTERM; trainings started from the page go on."""
    options = serving.options
    sock = bind(options.host, options.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    auth = "API key required (log in on the page)" if options.api_key else "no API key"
    dirs = ", ".join(str(d) for d in serving.dashboard.index.dirs)
    log(f"tunelab ui on http://{shown}:{port}/ ({auth}); runs: {dirs}")
    try:
        uvicorn_server(serving.app).run(sockets=[sock])
    finally:
        sock.close()
