"""The dashboard's view of the runs directories, kept current without re-reading everything per request.

A run's row (`tunelab.runs.run_row`) is rebuilt only when the run's signature changes: the folder's mtime
(every file the trainer writes atomically is renamed into it), its checkpoints folder's and metrics.jsonl's
mtime and size. A row that says "running" is rechecked each time (a killed trainer changes no file).
metrics.jsonl is read incrementally: only the bytes appended since the last read are parsed.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from ..io import jsonl_objects, metric_records
from ..runs import is_run_folder, run_row, run_status

REPORT_FILE = "report.html"  # what `tunelab compare` writes into its output folder


class MetricsTail:
    """metrics.jsonl records of many runs, each file read from where the last read stopped.

    A file that shrank or was replaced (a resume cuts the log back with an atomic rewrite) is read again
    from the start; a last line without its newline (being appended) waits for the next read."""

    def __init__(self):
        self._files: dict[Path, tuple[int, int, list[dict]]] = {}  # path -> (inode, bytes read, records)
        self._lock = threading.Lock()

    def records(self, path: Path) -> list[dict]:
        try:
            st = path.stat()
        except OSError:
            self._files.pop(path, None)
            return []
        with self._lock:
            inode, offset, records = self._files.get(path, (st.st_ino, 0, []))
            if inode != st.st_ino or st.st_size < offset:
                offset, records = 0, []
            if st.st_size > offset:
                with open(path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read(st.st_size - offset)
                complete = chunk[: chunk.rfind(b"\n") + 1]
                if complete:
                    records = records + metric_records(jsonl_objects(complete.decode("utf-8", errors="replace")))
                    offset += len(complete)
            self._files[path] = (st.st_ino, offset, records)
            return records


def _stat_key(path: str) -> tuple:
    try:
        st = os.stat(path)
    except OSError:
        return (None,)
    return (st.st_mtime_ns, st.st_size)


def run_signature(run: str) -> tuple:
    """What changes when the trainer (or `tunelab eval`) writes into the run folder (plain os calls: this
    runs for every run on every request)."""
    return (_stat_key(run), _stat_key(os.path.join(run, "checkpoints")), _stat_key(os.path.join(run, "metrics.jsonl")))


def best_value(records: list[dict], metric: str) -> float | None:
    """The best `metric` over the run's evaluations (lowest for a loss or perplexity, else highest)."""
    values = [r[metric] for r in records if isinstance(r.get(metric), int | float) and not isinstance(r[metric], bool)]
    if not values:
        return None
    return min(values) if metric.endswith(("loss", "ppl")) else max(values)


class RunsIndex:
    """The runs under one or more directories, by id `<dir index>/<run folder name>`."""

    def __init__(self, dirs: list[Path]):
        self.dirs = [Path(d).resolve() for d in dirs]
        self.metrics = MetricsTail()
        self._rows: dict[str, tuple[tuple, dict]] = {}  # run folder -> (signature, row)
        self._lock = threading.Lock()
        self.rebuilt = 0  # rows built from the files (not the cache) since the start: the cache's test

    def run_path(self, run_id: str) -> Path | None:
        """The folder of a run id, or None: only a folder directly inside one of the runs directories."""
        index, _, name = run_id.partition("/")
        if not index.isdigit() or int(index) >= len(self.dirs) or not name or "/" in name or name in (".", ".."):
            return None
        root = self.dirs[int(index)]
        path = (root / name).resolve()
        return path if path.parent == root and is_run_folder(path) else None

    def rows(self) -> list[dict]:
        seen, out = set(), []
        for index, root in enumerate(self.dirs):
            try:
                entries = sorted(os.scandir(root), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                # a symlink (perhaps to a folder elsewhere) is never served; a folder without a config is no run
                if entry.is_symlink() or not entry.is_dir():
                    continue
                row = self.row(Path(entry.path), f"{index}/{entry.name}")
                if row is not None:
                    seen.add(entry.path)
                    out.append(row)
        with self._lock:
            for gone in set(self._rows) - seen:
                del self._rows[gone]
        return out

    def row(self, run: Path, run_id: str) -> dict | None:
        """The run's row, from the cache while its signature is unchanged; None if it is not a run folder."""
        key = str(run)
        signature = run_signature(key)
        with self._lock:
            cached = self._rows.get(key)
        if cached is not None and cached[0] == signature:
            row = cached[1]
            if row["status"] != "running" or run_status(run)[0] == "running":
                return row
        if not is_run_folder(run):
            return None
        row = self._build(run, run_id)
        with self._lock:
            self._rows[key] = (signature, row)
            self.rebuilt += 1
        return row

    def _build(self, run: Path, run_id: str) -> dict:
        row = run_row(run)
        records = self.metrics.records(run / "metrics.jsonl")
        if row["steps"] is None and records:  # not finished: how far it got
            row["steps"] = records[-1]["step"]
        if row["train_tokens_per_s"] is None:
            speeds = [r["tokens_per_s"] for r in records if isinstance(r.get("tokens_per_s"), int | float)]
            row["train_tokens_per_s"] = round(sum(speeds) / len(speeds), 1) if speeds else None
        best = best_value(records, row["metric_for_best"])
        row["best_eval_metric"] = round(best, 4) if best is not None else row["eval_metric"]
        row["id"] = run_id
        row["report"] = (run / REPORT_FILE).is_file()
        return row

    def reports(self) -> list[dict]:
        """Every report.html in the runs directories (the directory itself, a folder in it, one below)."""
        found = []
        for index, root in enumerate(self.dirs):
            for pattern in (REPORT_FILE, f"*/{REPORT_FILE}", f"*/*/{REPORT_FILE}"):
                for path in sorted(root.glob(pattern)):
                    resolved = path.resolve()
                    if resolved.is_file() and resolved.is_relative_to(root):
                        rel = path.relative_to(root).as_posix()
                        found.append({"path": f"{index}/{rel}", "name": rel, "mtime": path.stat().st_mtime})
        return found


X_AXES = ("step", "epoch", "tokens_seen", "train_s")


def with_x_axes(records: list[dict], summary: dict) -> list[dict]:
    """Records with every x-axis a chart can choose. Logs written before tokens_seen/train_s were recorded
    get them spread evenly over the steps from the summary's totals (an approximation; None without one)."""
    steps = summary.get("steps") or 0
    per_step = {
        "tokens_seen": summary.get("train_tokens", 0) / steps if steps else None,
        "train_s": summary.get("train_wall_s", 0) / steps if steps else None,
    }
    out = []
    for r in records:
        missing = {k: (r["step"] * v if v is not None else None) for k, v in per_step.items() if k not in r}
        out.append(r | missing if missing else r)
    return out
