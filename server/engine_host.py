"""Owns the models and the lock discipline.

* SERVING model: completions only, read under `rw.read()`.
* WORKBENCH model (a deep copy): repairs and patch-stack changes run on it, under `stack.lock`, while
  completions keep being served from the old weights.
* After a successful change the output-projection weights are copied workbench -> serving under
  `rw.write()`, so a completion sees either the old or the new weights, never a half-patched model.
  STAR (and the patch stack) only ever change those weights; everything else is identical in both.

Lock order: stack.lock -> rw.write. Completions take rw.read only. Every method here is blocking and
runs in a worker thread; the language server calls them through its executors.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from star_engine.case import RepairCase
from star_engine.decode import Decoder
from star_engine.generate import Completion, complete_prompt
from star_engine.guard import GuardConfig, guard_for
from star_engine.model import LoadedModel, load_model, workbench_copy
from star_engine.repair import RepairResult, keep_or_undo, repair

from .patches import open_stack
from .rwlock import RWLock

log = logging.getLogger(__name__)


class RepairBusy(RuntimeError):
    pass


def _copy_tokenizer(tokenizer):
    """The workbench gets its own tokenizer: fast tokenizers are not safe to share between threads."""
    try:
        return copy.deepcopy(tokenizer)
    except Exception:   # pragma: no cover - depends on the tokenizer class
        return tokenizer


def worker_pool(name: str, workers: int = 1) -> ThreadPoolExecutor:
    """A thread pool whose threads use the process's torch thread count (set once by the CLI)."""
    threads = torch.get_num_threads()
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name,
                              initializer=torch.set_num_threads, initargs=(threads,))


@dataclass
class LoadReport:
    model: str
    adapters_dir: Path
    patches: int
    problems: list[str]


class EngineHost:
    def __init__(self):
        self.rw = RWLock()
        self.serving: LoadedModel | None = None
        self.workbench: LoadedModel | None = None
        self.stack = None
        self.decoder: Decoder | None = None
        self.version = 0
        self.adapters_dir: Path | None = None
        self._repairing = threading.Lock()
        self._watcher = None
        # called (from a worker or watcher thread) after the serving weights changed: (reason, problems)
        self.on_weights_changed: Callable[[str, list[str]], None] | None = None

    # -- loading -----------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.serving is not None

    @property
    def model_name(self) -> str:
        return self.serving.name if self.serving else ""

    @property
    def context_window(self) -> int:
        return self.serving.context_window if self.serving else 2048

    def load(self, spec: str | None, adapters_dir: str | None) -> LoadReport:
        """Load a model (and its patch stack) and switch to it."""
        serving = load_model(spec)
        return self.install(serving, adapters_dir)

    def install(self, serving: LoadedModel, adapters_dir: str | None) -> LoadReport:
        workbench = workbench_copy(serving, _copy_tokenizer(serving.tokenizer))
        stack = open_stack(workbench, Path(adapters_dir).expanduser() if adapters_dir else None)
        folder = stack.path
        with stack.lock:
            problems = list(stack.load() or [])
            _copy_out_proj(workbench, serving, _touched(stack))
            patches = len(stack.list())
        self.close()
        with self.rw.write():
            self.serving, self.workbench, self.stack = serving, workbench, stack
            self.decoder = Decoder(serving)
            self.adapters_dir = folder
            self.version += 1
        try:
            self._watcher = stack.watch(self._on_stack_change)
        except Exception as e:   # hot reload is a convenience: serve without it
            log.warning("cannot watch %s: %s", folder, e)
            problems.append(f"hot reload of {folder} is off: {e}")
        return LoadReport(serving.name, folder, patches, problems)

    def close(self) -> None:
        watcher, self._watcher = self._watcher, None
        stop = getattr(watcher, "stop", None)
        if callable(stop):
            try:
                stop()
            except Exception:
                pass

    # -- completions ---------------------------------------------------------------------------------

    def complete(self, key: str, prompt, cancel: threading.Event | None,
                 deadline: float | None = None, speculate: bool = True) -> tuple[Completion, int]:
        """Complete a `prompting.Prompt` on the serving model. Returns (completion, weights version)."""
        with self.rw.read():
            version, decoder = self.version, self.decoder
            out = complete_prompt(
                decoder,
                prompt.text,
                max_new_tokens=prompt.max_new_tokens,
                multiline=prompt.multiline,
                base_indent=prompt.base_indent,
                heal=prompt.heal,
                cancel=cancel,
                deadline=deadline,
                key=key,
                speculate=speculate,
            )
            return out, version

    # -- weights switch ------------------------------------------------------------------------------

    def _switch(self) -> None:
        """Copy the workbench's output projections to the serving model (caller holds stack.lock)."""
        layers = _touched(self.stack)
        with self.rw.write():
            _copy_out_proj(self.workbench, self.serving, layers)
            self.version += 1
            self.decoder.reset()

    def _changed(self, reason: str, problems: list[str] | None = None) -> None:
        if self.on_weights_changed is not None:
            self.on_weights_changed(reason, problems or [])

    def _on_stack_change(self, problems=None) -> None:
        """Hot reload: the stack already applied the folder's changes to the workbench."""
        try:
            with self.stack.lock:
                self._switch()
        except Exception as e:   # pragma: no cover - defensive: a watcher thread must not die
            log.exception("hot reload failed")
            problems = list(problems or []) + [f"reload failed: {e}"]
        self._changed("reloaded", list(problems or []))

    # -- repair and the patch stack -----------------------------------------------------------------

    def repair(self, case: RepairCase, method: str, cancel=None, progress=None,
               locality_budget: float = GuardConfig().budget) -> tuple[RepairResult, object]:
        """Run a repair on the workbench; on success persist it and switch the serving weights.
        One repair at a time: a second one raises RepairBusy. The commit point is `stack.add`: a cancel
        set before it raises RepairCancelled with the weights restored and nothing on disk; a cancel set
        later leaves the patch kept (the caller sees `cancel.is_set()` and says so)."""
        if not self._repairing.acquire(blocking=False):
            raise RepairBusy("a repair is already running: wait for it to finish or cancel it")
        try:
            with self.stack.lock:
                result = repair(self.workbench, [case], method, protect=self.stack.cases(), cancel=cancel,
                                guard=guard_for(locality_budget),
                                progress=progress)
                result, info = keep_or_undo(self.workbench, result, self.stack.add, cancel=cancel)
                if result.fixed:
                    self._switch()
        finally:
            self._repairing.release()
        if result.fixed:
            self._changed("repaired")
        return result, info

    @property
    def repairing(self) -> bool:
        return self._repairing.locked()

    def patches(self) -> list:
        return list(self.stack.list())

    def undo_last(self):
        with self._changing_stack("undo_last"):
            return self.stack.undo_last()

    def set_enabled(self, patch_id: str, enabled: bool):
        with self._changing_stack("set_enabled"):
            return self.stack.set_enabled(patch_id, enabled)

    def remove(self, patch_id: str):
        with self._changing_stack("remove"):
            return self.stack.remove(patch_id)

    def import_(self, path: str):
        with self._changing_stack("import_"):
            return self.stack.import_(path)

    @contextmanager
    def _changing_stack(self, reason: str):
        """Around a patch-stack change: the stack's lock, then (whatever happened) the serving weights
        switched to the workbench's and the change announced."""
        with self.stack.lock:
            try:
                yield
            finally:
                self._switch()
                self._changed(reason)

    def export(self, patch_id: str, path: str):
        with self.stack.lock:
            return self.stack.export(patch_id, path)


def _touched(stack) -> list[int]:
    """The layers whose output projection the stack has ever changed: the only ones to copy."""
    return list(stack.touched_layers())


@torch.no_grad()
def _copy_out_proj(src: LoadedModel, dst: LoadedModel, layers: list[int]) -> None:
    for layer in layers:
        dst.arch.weight(layer).copy_(src.arch.weight(layer))
