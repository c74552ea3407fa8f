"""The dashboard's routes: five pages (one HTML shell; static/app.js draws each from the JSON API) and the API.

Pages: / (runs), /run/D/NAME, /compare?runs=D/A,D/B, /playground, /start. Runs are named `D/NAME`: the
index of their runs directory and the folder name. Files are served from inside the runs directories only
(/files/D/PATH, symlinks resolved first).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from ..eval.plots import label_names
from ..generation import GenerationSettings
from ..io import read_json_object, read_jsonl_objects
from ..runs import diff_run_folders, run_status
from ..training.checkpoint_dirs import complete_checkpoints
from .index import RunsIndex, with_x_axes
from .jobs import UI_DIR, Jobs, StartForm
from .playground import Playground
from .security import COOKIE, key_matches

STATIC = resources.files("tunelab.ui") / "static"
PAGES = ("runs", "run", "compare", "playground", "start")
PREDICTIONS = re.compile(r"predictions(-[\w.-]+)?\.jsonl")
LOG_TAIL_BYTES = 8000


class StartRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dir: int = 0
    model: str = ""
    method: str = ""
    data: str = ""
    steps: str = ""
    lr: str = ""
    method_block: str = ""
    overrides: str = ""
    run_name: str = ""


class Message(BaseModel):
    role: str = Field(pattern="^(system|user|assistant)$")
    content: str


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run: str
    messages: list[Message] = Field(min_length=1, max_length=200)
    max_new_tokens: int = GenerationSettings().max_new_tokens
    temperature: float = GenerationSettings().temperature
    top_p: float = GenerationSettings().top_p
    top_k: int = GenerationSettings().top_k
    repetition_penalty: float | None = None
    seed: int | None = None
    system: str | None = None


class Dashboard:
    """What the routes share: the runs index, the trainings started here, the loaded models."""

    def __init__(self, dirs: list[Path], api_key: str | None = None, cwd: Path | None = None):
        self.index = RunsIndex(dirs)
        self.jobs = Jobs(cwd)
        self.playground = Playground()
        self.api_key = api_key

    def run(self, run_id: str) -> Path:
        path = self.index.run_path(run_id)
        if path is None:
            raise StarletteHTTPException(404, f"no run {run_id!r} in the runs directories")
        return path


def _finite(value):
    """JSON without NaN or Infinity (a diverged run logs them; browsers' JSON.parse refuses them): null instead."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class JSON(JSONResponse):
    def render(self, content) -> bytes:
        return json.dumps(_finite(content), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=status)


def _read_object(path: Path) -> dict:
    try:
        return read_json_object(path)
    except UserError:
        return {}


def _log_tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _worst_first(row: dict) -> tuple:
    """Failures first: by exact match, then the user scorer's score, then ROUGE-L (lowest first)."""
    return tuple(row.get(k) if isinstance(row.get(k), int | float) else 1.0 for k in ("exact_match", "score", "rougeL"))


def run_details(dash: Dashboard, run_id: str, run: Path) -> dict:
    status, summary, detail = run_status(run)
    evals = _read_object(run / "eval.json")
    matrix = evals.get("eval_confusion_matrix")
    try:
        config_text = (run / "config.yaml").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        config_text = ""
    job = dash.jobs.get(run)
    return {
        "id": run_id,
        "name": run.name,
        "status": status,
        "detail": detail,
        "row": dash.index.row(run, run_id),
        "config": config_text,
        "summary": {k: v for k, v in summary.items() if k not in ("hints", "versions")},
        "hints": summary.get("hints") or [],
        "versions": summary.get("versions") or {},
        "eval": {k: v for k, v in evals.items() if k != "eval_confusion_matrix"},
        "confusion": {"matrix": matrix, "labels": label_names(run, len(matrix))} if isinstance(matrix, list) else None,
        "checkpoints": [c.name for c in complete_checkpoints(run / "checkpoints")],
        "plots": sorted(p.name for p in (run / "plots").glob("*.png")),
        "predictions": sorted(p.name for p in run.glob("predictions*.jsonl") if PREDICTIONS.fullmatch(p.name)),
        "report": (run / "report.html").is_file(),
        "job": None if job is None else {"returncode": job.returncode, "log": _log_tail(job.log)},
    }


def create_app(dash: Dashboard) -> FastAPI:
    app = FastAPI(title="tunelab ui", docs_url=None, redoc_url=None, openapi_url=None, default_response_class=JSON)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    shell = (STATIC / "index.html").read_text(encoding="utf-8")

    @app.exception_handler(UserError)
    async def _user_error(request, exc: UserError):
        return _error(422, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in exc.errors()[:5]]
        return _error(422, "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    def page(name: str) -> HTMLResponse:
        return HTMLResponse(shell.replace("{{page}}", name), headers={"Cache-Control": "no-store"})

    @app.get("/")
    async def runs_page():
        return page("runs")

    @app.get("/run/{run_id:path}")
    async def run_page(run_id: str):
        return page("run")

    @app.get("/compare")
    async def compare_page():
        return page("compare")

    @app.get("/playground")
    async def playground_page():
        return page("playground")

    @app.get("/start")
    async def start_page():
        return page("start")

    @app.get("/login")
    async def login_page():
        return page("login")

    @app.post("/login")
    async def login(request: Request):
        form = parse_qs((await request.body()).decode("utf-8", errors="replace"))
        given, target = form.get("key", [""])[0], form.get("next", ["/"])[0]
        if not target.startswith("/") or target.startswith("//"):
            target = "/"
        if dash.api_key is None or key_matches(given, dash.api_key):
            response = RedirectResponse(target, status_code=303)
            if dash.api_key is not None:
                response.set_cookie(COOKIE, dash.api_key, httponly=True, samesite="strict")
            return response
        return RedirectResponse(f"/login?failed=1&next={quote(target, safe='')}", status_code=303)

    # --- the API
    @app.get("/api/runs")
    async def api_runs():
        rows = await asyncio.to_thread(dash.index.rows)
        # plain JSON already: returning the response skips FastAPI's (slow, per value) encoder for hundreds of rows
        return JSON({"dirs": [str(d) for d in dash.index.dirs], "runs": rows, "reports": dash.index.reports()})

    @app.get("/api/run/{run_id:path}/metrics")
    async def api_metrics(run_id: str, since: int = 0):
        run = dash.run(run_id)
        records = dash.index.metrics.records(run / "metrics.jsonl")
        status = run_status(run)[0]
        return JSON({"status": status, "count": len(records), "records": records[max(since, 0) :]})

    @app.get("/api/run/{run_id:path}/predictions")
    async def api_predictions(run_id: str, file: str = "predictions.jsonl", offset: int = 0, limit: int = 50):
        run = dash.run(run_id)
        if not PREDICTIONS.fullmatch(file):
            raise StarletteHTTPException(404, f"{file}: not a predictions file")
        rows = sorted(read_jsonl_objects(run / file), key=_worst_first)
        return {"total": len(rows), "offset": offset, "rows": rows[max(offset, 0) : max(offset, 0) + min(limit, 500)]}

    @app.post("/api/run/{run_id:path}/stop")
    async def api_stop(run_id: str):
        return {"signalled": dash.jobs.stop(dash.run(run_id)), "signal": "SIGTERM"}

    @app.get("/api/run/{run_id:path}")
    async def api_run(run_id: str):
        run = dash.index.run_path(run_id)
        if run is None:
            return _pending(run_id)
        return await asyncio.to_thread(run_details, dash, run_id, run)

    def _pending(run_id: str):
        """A run started here whose folder does not exist yet (loading), or never will (it failed first)."""
        index, _, name = run_id.partition("/")
        if index.isdigit() and int(index) < len(dash.index.dirs):
            job = dash.jobs.get(dash.index.dirs[int(index)] / name)
            if job is not None:
                code = job.returncode
                return {
                    "id": run_id,
                    "name": name,
                    "status": "starting" if code is None else "failed",
                    "detail": "" if code is None else f"tunelab train exited with code {code} before the run started",
                    "job": {"returncode": code, "log": _log_tail(job.log)},
                }
        raise StarletteHTTPException(404, f"no run {run_id!r} in the runs directories")

    @app.get("/api/compare")
    async def api_compare(runs: str):
        paths = {run_id: dash.run(run_id) for run_id in runs.split(",") if run_id}
        if not paths:
            raise StarletteHTTPException(422, "no runs to compare (?runs=D/NAME,D/NAME)")

        def build():
            out = []
            for run_id, run in paths.items():
                summary = _read_object(run / "summary.json")
                records = with_x_axes(dash.index.metrics.records(run / "metrics.jsonl"), summary)
                out.append({"id": run_id, "row": dash.index.row(run, run_id), "records": records})
            return JSON({"runs": out, "diff": diff_run_folders(list(paths.values()))})

        return await asyncio.to_thread(build)

    @app.get("/api/options")
    async def api_options():
        from ..methods import METHODS
        from ..models import DEFAULT_MODEL

        return {
            "methods": sorted(METHODS),
            "default_model": DEFAULT_MODEL,
            "generation": GenerationSettings().__dict__,
            "dirs": [str(d) for d in dash.index.dirs],
        }

    @app.post("/api/start")
    async def api_start(body: StartRequest):
        if not 0 <= body.dir < len(dash.index.dirs):
            raise UserError(f"dir {body.dir}: there are {len(dash.index.dirs)} runs directories")
        form = StartForm(**body.model_dump(exclude={"dir"}))
        job = await asyncio.to_thread(dash.jobs.start, form, dash.index.dirs[body.dir])
        return {"id": f"{body.dir}/{job.name}", "config": str(job.config), "log": str(job.log)}

    @app.post("/api/chat")
    async def api_chat(body: ChatRequest):
        run = dash.run(body.run)
        settings = GenerationSettings(
            max_new_tokens=body.max_new_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            repetition_penalty=body.repetition_penalty,
            seed=body.seed,
        )
        messages = [m.model_dump() for m in body.messages]
        text = await asyncio.to_thread(dash.playground.reply, run, messages, settings, body.system or None)
        return {"run": body.run, "text": text}

    @app.get("/files/{index}/{path:path}")
    async def files(index: int, path: str):
        """A file inside a runs directory (a report, a plot); anything resolving outside is a 404."""
        if not 0 <= index < len(dash.index.dirs):
            raise StarletteHTTPException(404, "no such runs directory")
        root = dash.index.dirs[index]
        target = (root / path).resolve()
        if not target.is_relative_to(root) or not target.is_file() or UI_DIR in target.relative_to(root).parts[:1]:
            raise StarletteHTTPException(404, f"{path}: no such file in the runs directory")
        return FileResponse(target, headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    return app
