"""`--adapters-dir DIR`: each sub-folder (a run or a peft adapter folder) is served under its name;
new or changed folders are loaded, removed ones unloaded. Polled: a folder is loaded once its files
have stopped changing for one interval, so a copy in progress is not read half-written."""

from __future__ import annotations

import threading
from pathlib import Path

from .adapters import AdapterError

WATCHED_FILES = ("config.yaml", "summary.json", "adapter_config.json", "adapter_model.safetensors")


def folder_signature(folder: Path) -> tuple:
    """(name, size, mtime) of the files whose change means a new adapter."""
    files = [folder / n for n in WATCHED_FILES] + [p for p in folder.glob("*/*") if p.name in WATCHED_FILES]
    out = []
    for path in sorted(files):
        try:
            st = path.stat()
        except OSError:
            continue
        out.append((str(path.relative_to(folder)), st.st_size, st.st_mtime_ns))
    return tuple(out)


class AdapterDirWatcher:
    def __init__(self, registry, folder, log, interval_s: float = 2.0):
        self.registry, self.folder, self.log, self.interval_s = registry, Path(folder), log, interval_s
        self.loaded: dict[str, tuple] = {}  # name -> signature it was loaded (or refused) with
        self._seen: dict[str, tuple] = {}  # name -> signature at the last scan
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def scan(self, settle: bool = True) -> None:
        """One pass. `settle=False` (at start-up) loads what is there without waiting an interval."""
        try:
            folders = {p.name: p for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith(".")}
        except OSError as exc:
            self.log(f"warning: --adapters-dir {self.folder}: {exc}")
            return
        for name in list(self.loaded):
            if name not in folders:
                del self.loaded[name]
                try:
                    self.registry.unload(name)
                    self.log(f"adapters-dir: unloaded {name} (its folder is gone)")
                except AdapterError:
                    pass
        for name, path in sorted(folders.items()):
            signature = folder_signature(path)
            previous, self._seen[name] = self._seen.get(name), signature
            if not signature or self.loaded.get(name) == signature or (settle and previous != signature):
                continue
            self.loaded[name] = signature  # a refused folder is not retried until it changes
            try:
                handle = self.registry.load(name, str(path))
                self.log(f"adapters-dir: loaded {name} ({handle.kind}) from {path}")
            except AdapterError as exc:
                self.log(f"warning: adapters-dir: {name} not loaded: {exc.message}")
            except Exception as exc:  # a bad folder never stops the watcher (nor the server)
                self.log(f"warning: adapters-dir: {name} not loaded: {type(exc).__name__}: {exc}")

    def start(self) -> None:
        self.scan(settle=False)
        self._thread = threading.Thread(target=self._loop, name="tunelab-serve-watch", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.scan()

    def stop(self) -> None:
        self._stop.set()
