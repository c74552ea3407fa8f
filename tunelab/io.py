"""File I/O in one place: atomic writes (temporary file in the same folder, fsync, rename), and
safetensors reads that turn a missing, corrupted or truncated file into a UserError naming it."""

import itertools
import json
import os
import re
import tempfile
from pathlib import Path

from .errors import UserError


def _umask() -> int:
    """The process's umask: read from /proc where Linux shows it, else set and put back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def created_mode(directory: bool = False) -> int:
    """The mode a plain open() or mkdir() gives a new file or folder (0644 / 0755 under the usual umask).
    tempfile's are private (0600 / 0700), and so are the files safetensors writes (0.8): a saved model, a
    cleaned data file or a GGUF would stay unreadable to anyone else, the Ollama service's user included."""
    return (0o777 if directory else 0o666) & ~_umask()


def normal_modes(root) -> None:
    """Give folder `root` and everything under it the modes a plain write would have (`created_mode`)."""
    file_mode, dir_mode = created_mode(), created_mode(directory=True)
    for folder, _, files in os.walk(root):
        os.chmod(folder, dir_mode)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` atomically; a new file gets the usual mode, a replaced one keeps its own."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        mode = created_mode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def atomic_write_jsonl(path, rows) -> None:
    """One JSON object per line, UTF-8 kept readable (Chinese is not escaped)."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl_objects(path) -> list[dict]:
    """The JSON objects of a JSON Lines file that the project itself appends to (metrics, resumes); a line
    that does not parse (cut short by a kill while it was appended) is skipped; a missing file is empty."""
    try:
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    return jsonl_objects(text)


def jsonl_objects(text: str) -> list[dict]:
    """The JSON objects of JSON Lines text, lines that do not parse skipped (see `read_jsonl_objects`)."""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError, ValueError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_metrics(path) -> list[dict]:
    """A run's metrics.jsonl records (those with an integer step), so a torn log never blocks a resume or a plot."""
    return metric_records(read_jsonl_objects(path))


def metric_records(objects: list[dict]) -> list[dict]:
    """The objects that are metrics records: those with an integer step."""
    return [r for r in objects if isinstance(r.get("step"), int) and not isinstance(r.get("step"), bool)]


def fsync_dir(path) -> None:
    """Flush a directory entry (after a rename) so it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dir_bytes(path) -> int:
    """Total size in bytes of the regular files under a directory."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# JSON nested deeper than this is refused before parsing: json's decoder recurses, so whether a deep file parses
# would otherwise depend on how deep the caller's stack already is (the same summary.json readable or "broken")
JSON_MAX_DEPTH = 200
_JSON_STRING = re.compile(r'"(?:\\.|[^"\\])*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text: str) -> int:
    """The deepest nesting of arrays/objects in JSON text (brackets inside strings do not count)."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(itertools.accumulate(1 if c in "[{" else -1 for c in brackets), default=0)


def loads_json(text: str):
    """json.loads with a nesting limit that does not depend on the caller's stack depth."""
    if json_depth(text) > JSON_MAX_DEPTH:
        raise ValueError(f"nested deeper than {JSON_MAX_DEPTH} levels")
    return json.loads(text)


def read_json_object(path, missing: str = "missing") -> dict:
    """A JSON file that must hold an object; missing, unreadable, invalid or another type is a UserError."""
    path = Path(path)
    try:
        obj = loads_json(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: {missing}") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise UserError(f"{path}: not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def check_safetensors(path, missing: str = "missing") -> None:
    """Validate a safetensors file's header against its size (catches truncation and garbage) without
    reading the tensors; `missing` completes the message when the file does not exist."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {missing}")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: corrupted or truncated safetensors file ({exc})") from None


def read_safetensors(path, missing: str = "missing") -> dict:
    """All tensors of a safetensors file, on the CPU; a missing or damaged file is a UserError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors(path, missing)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: corrupted or truncated safetensors file ({exc})") from None


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
