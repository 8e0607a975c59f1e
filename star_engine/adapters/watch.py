"""Hot reload: a watchdog Observer on the adapters folder. Adapter directories that appear (renamed or
copied in) or disappear, and manifest changes made by another process (`star adapters disable ...`), are
applied without a restart: after a quiet period (debounce) the stack re-syncs with the folder under its
lock and `on_change(messages)` is called from the watcher's thread.

Ignored: dot-names (`.tmp-*` directories being written, `.trash-*`, `.lock`, the manifest's temp file) and
events that do not change anything (opened, closed without writing). A directory still being copied is
re-validated after its next change; until it validates it is reported once per state and not applied.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

log = logging.getLogger(__name__)

_RELEVANT = {"created", "deleted", "moved", "modified", "closed"}


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: "Watcher"):
        super().__init__()
        self.watcher = watcher

    def on_any_event(self, event) -> None:
        if event.event_type not in _RELEVANT:
            return
        paths = [event.src_path]
        if event.event_type == "moved":
            paths.append(event.dest_path)
        if any(self.watcher.relevant(p) for p in paths):
            self.watcher.poke()


class Watcher:
    def __init__(self, stack, on_change, *, debounce: float = 0.3):
        self.stack = stack
        self.on_change = on_change
        self.debounce = debounce
        self.root = Path(os.path.realpath(stack.path))
        self._event = threading.Event()
        self._stop = threading.Event()
        self._observer = None
        self._thread = None
        self.syncs = 0             # how many re-syncs ran (for tests and status)

    def relevant(self, path) -> bool:
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        try:
            rel = Path(os.path.realpath(path)).relative_to(self.root)
        except ValueError:
            rel = Path(path)
            try:
                rel = rel.relative_to(self.stack.path)
            except ValueError:
                return False
        parts = rel.parts
        return bool(parts) and not parts[0].startswith(".")

    def poke(self) -> None:
        self._event.set()

    def start(self) -> "Watcher":
        self.stack.path.mkdir(parents=True, exist_ok=True)
        self._observer = Observer()
        self._observer.schedule(_Handler(self), str(self.stack.path), recursive=True)
        self._observer.daemon = True
        self._observer.start()
        self._thread = threading.Thread(target=self._run, name="star-adapters-watch", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._event.wait()
            if self._stop.is_set():
                return
            while True:                       # debounce: wait for a quiet period
                self._event.clear()
                if self._stop.wait(self.debounce):
                    return
                if not self._event.is_set():
                    break
            try:
                messages = self.stack.sync()
            except Exception as e:  # noqa: BLE001 - a watcher must survive anything the folder throws at it
                log.exception("hot reload failed")
                messages = [f"hot reload failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"]
            self.syncs += 1
            if messages:
                try:
                    self.on_change(messages)
                except Exception:  # noqa: BLE001
                    log.exception("on_change callback failed")

    def stop(self) -> None:
        self._stop.set()
        self._event.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "Watcher":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
