"""The patch stack as the server sees it: `star_engine.adapters.PatchStack` (adapter files in a folder,
hot-reloaded), or, where that module is not available, an in-memory stack with the same API so that
repairs and their undo still work for the session."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from star_engine.model import LoadedModel
from star_engine.patch import WeightSnapshot, apply_patch
from star_engine.repair import RepairResult


class PatchError(ValueError):
    """A patch-stack operation that cannot be done as asked (one-line message)."""


def open_stack(lm: LoadedModel, folder):
    """The persistent PatchStack on `folder` (None: its default folder), or the in-memory fallback."""
    try:
        from star_engine.adapters import PatchStack
    except ImportError:
        return MemoryPatchStack(lm, folder)
    return PatchStack(lm, folder)


def info_json(info) -> dict | None:
    """A PatchInfo (either implementation) as the protocol's patch object."""
    if info is None:
        return None
    to_json = getattr(info, "to_json", None)
    data = dict(to_json()) if callable(to_json) else dict(vars(info))
    data.pop("result", None)
    cases = getattr(info, "cases", None) or []
    first = cases[0] if cases else None
    prompt = first.prompt if first else data.get("prompt", "")
    fix = first.fix if first else data.get("fix", "")
    # The stored case starts the fix with the prompt's healed last token (prompting.py); show the
    # whitespace part of it where the user sees it, at the end of the code before the cursor.
    lead = fix[: len(fix) - len(fix.lstrip())]
    out = {
        "id": str(data.get("id")),
        "enabled": bool(data.get("enabled", True)),
        "method": data.get("method", ""),
        "prompt": prompt + lead,
        "completion": (first.wrong or "") if first else data.get("completion", ""),
        "fix": fix[len(lead):],
        "neurons": data.get("neurons", 0),
        "layers": list(data.get("layers") or []),
        "created": data.get("created", ""),
    }
    for extra in ("name", "applied", "problem", "messages"):   # beyond the protocol's minimum
        if extra in data:
            out[extra] = data[extra]
    return out


@dataclass
class MemoryPatchInfo:
    id: str
    method: str
    prompt: str
    completion: str
    fix: str
    neurons: int
    layers: list[int]
    created: str
    enabled: bool = True
    result: RepairResult | None = field(default=None, repr=False)


class MemoryPatchStack:
    """PatchStack's API, in memory: patches live as long as the server."""

    def __init__(self, lm: LoadedModel, folder=None):
        self.lm = lm
        self.path = folder
        self.lock = threading.RLock()
        self._base: WeightSnapshot | None = None
        self._patches: list[MemoryPatchInfo] = []
        self._next = 1

    def load(self) -> list[str]:
        return []

    def add(self, result: RepairResult) -> MemoryPatchInfo:
        with self.lock:
            if self._base is None:   # the weights before any patch: the first patch's saved columns undone
                self._base = WeightSnapshot(self.lm.arch)
                if result.saved is not None:
                    for l, (idx, values) in result.saved.columns.items():
                        self._base.original[l][:, idx] = values
            case = result.cases[0]
            info = MemoryPatchInfo(
                id=f"patch-{self._next}",
                method=result.method,
                prompt=case.prompt,
                completion=case.before,   # what the model wrote
                fix=case.fix,
                neurons=result.neurons,
                layers=result.layers,
                created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                result=result,
            )
            self._next += 1
            self._patches.append(info)
            return info

    def list(self) -> list[MemoryPatchInfo]:
        return list(self._patches)

    def _find(self, patch_id: str) -> MemoryPatchInfo:
        for p in self._patches:
            if p.id == patch_id:
                return p
        raise PatchError(f"no patch {patch_id!r}")

    def _rebuild(self) -> None:
        if self._base is None:
            return
        self._base.restore()
        for p in self._patches:
            if p.enabled and p.result is not None and p.result.patch is not None:
                apply_patch(self.lm.arch, p.result.patch)

    def set_enabled(self, patch_id: str, enabled: bool) -> MemoryPatchInfo:
        with self.lock:
            p = self._find(patch_id)
            if p.enabled != enabled:
                p.enabled = enabled
                self._rebuild()
            return p

    def remove(self, patch_id: str) -> MemoryPatchInfo:
        with self.lock:
            p = self._find(patch_id)
            self._patches.remove(p)
            self._rebuild()
            return p

    def undo_last(self) -> MemoryPatchInfo | None:
        with self.lock:
            if not self._patches:
                return None
            p = self._patches.pop()
            self._rebuild()
            return p

    def import_(self, path) -> MemoryPatchInfo:
        raise PatchError("importing patches needs star_engine.adapters, which this install lacks")

    def export(self, patch_id: str, path):
        raise PatchError("exporting patches needs star_engine.adapters, which this install lacks")

    def verify(self) -> list:
        return []

    def watch(self, on_change):
        return None
