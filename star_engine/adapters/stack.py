"""The patch stack: every enabled adapter in the folder, applied in manifest order to the base weights
(merged into them, so inference runs at base speed), with exact undo.

Invariants (under `lock`):

* `_base[l] = (idx, values)` holds the *base* value of every column of layer l any applied patch touched;
  every other column of the model still has its base value.
* the model's touched columns = base + delta_1 + ... + delta_n, added in manifest order, always computed
  the same way (restore base, add each delta) so that the same stack gives the same bits in any process.
* disabling or removing a patch restores the saved base columns and re-adds the others: bit-exact, never
  by subtracting a merged delta.

Regression policy: a patch that is *applied anew* (added after a repair, imported, enabled, dropped into
the folder) re-verifies the stored cases of the patches already applied. If a case that was fixed before
is broken after, the new patch is refused (the model and the folder stay as they were) unless
`keep_going=True`; a patch dropped into the watched folder is then kept but disabled. Disabling and removing
never refuse (they are the user's undo); `verify()` shows what holds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..capture import encode_case
from ..case import RepairCase, RepairInputError
from ..generate import writes_fix
from ..model import LoadedModel
from ..text import excerpt
from .folder import AdapterFolder, Manifest, PatchInfo, copy_adapter_dir, dir_signature, unpack_archive
from .format import (
    MAX_BYTES,
    Adapter,
    AdapterError,
    check_delta_bound,
    encode_result,
    layer_digest,
    load_adapter,
    valid_name,
    write_adapter_dir,
)
from .sidecar import read_sidecar_or_none

@dataclass
class VerifyRow:
    id: str
    case: int            # 1-based case number within the patch
    prompt: str
    fix: str
    wrote: str           # what greedy decoding writes now
    fixed: bool
    enabled: bool

    def to_json(self) -> dict:
        return dict(self.__dict__)


class RegressionError(AdapterError):
    """Applying a patch would break cases that earlier patches fixed; nothing was changed."""

    def __init__(self, message: str, rows: list[VerifyRow]):
        super().__init__(message)
        self.rows = rows


def check_case(lm: LoadedModel, case: RepairCase) -> tuple[bool, str]:
    """Does greedy decoding write the case's fix now? (The repair driver's check.)"""
    try:
        enc = encode_case(lm, case)
    except RepairInputError as e:
        return False, f"(cannot check: {e})"
    ok, text = writes_fix(lm, enc)
    return ok, text.split("\n")[0] if "\n" not in case.fix.strip("\n") else text


@torch.no_grad()
def _add_patch(arch, patch) -> None:
    """W[:, cols] += delta (the same float additions as star_engine.patch.apply_patch, without the copy of
    the old columns; a dense layer is added in place in one go)."""
    for layer, ld in patch.layers.items():
        w = arch.columns(layer)
        delta = ld.delta.to(w.dtype)
        cols = ld.columns
        if len(cols) == w.shape[1] and bool((cols[1:] > cols[:-1]).all()):    # every column, in order
            w.add_(delta)
        else:
            w[:, ld.columns] += delta


class PatchStack:
    """The user's patch stack on a loaded model. See the module docstring for the invariants and policy."""

    def __init__(self, lm: LoadedModel, folder=None, *, max_bytes: int = MAX_BYTES, check_regressions: bool = True):
        self.lm = lm
        self.folder = AdapterFolder(folder)
        self.max_bytes = max_bytes
        self.check_regressions = check_regressions
        self.lock = threading.RLock()
        self._base: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._base_digests: dict[int, str] = {}
        self._adapters: dict[str, Adapter] = {}        # loaded (validated) adapters, by id
        self._applied: list[str] = []                  # ids whose deltas are in the model, in order
        self._manifest = Manifest()
        self._problems: dict[str, str] = {}            # id -> why it is not applied
        self._problem_sigs: dict[str, tuple] = {}      # id -> its files when that was found
        self._rejected: dict[str, tuple] = {}          # unlisted dir -> signature when it was rejected
        self._loaded = False

    @property
    def path(self) -> Path:
        return self.folder.path

    # -- base weights -----------------------------------------------------------------------------------------

    def _remember_base(self, patch) -> None:
        """Record the base values of columns this patch touches that no applied patch touched yet."""
        arch = self.lm.arch
        for layer, ld in patch.layers.items():
            cols = ld.columns.to(torch.long)
            if layer in self._base:
                idx, values = self._base[layer]
                new = cols[~torch.isin(cols, idx)]
                if len(new):
                    merged = torch.cat([idx, new])
                    order = merged.argsort()
                    vals = torch.cat([values, arch.columns(layer)[:, new].detach().clone()], dim=1)
                    self._base[layer] = (merged[order], vals[:, order].contiguous())
            else:
                self._base[layer] = (cols.clone(), arch.columns(layer)[:, cols].detach().clone())

    def base_columns(self, layer: int) -> torch.Tensor:
        """The base (unpatched) weight of a layer in the (d, d_ff) layout (a copy)."""
        w = self.lm.arch.columns(layer).detach().clone()
        if layer in self._base:
            idx, values = self._base[layer]
            w[:, idx] = values
        return w

    def base_digest(self, layer: int) -> str:
        if layer not in self._base_digests:
            idx, values = self._base.get(layer, (None, None))
            full = idx is not None and len(idx) == values.shape[1] == self.lm.arch.d_ff
            self._base_digests[layer] = layer_digest(values if full else self.base_columns(layer))
        return self._base_digests[layer]

    @torch.no_grad()
    def _apply_state(self, ids: list[str]) -> None:
        """Make the model base + the given patches, in order (exact restore of the base first)."""
        for i in ids:
            self._remember_base(self._adapters[i].patch)
        arch = self.lm.arch
        for layer, (idx, values) in self._base.items():
            w = arch.columns(layer)
            if len(idx) == w.shape[1]:
                w.copy_(values)
            else:
                w[:, idx] = values
        for i in ids:
            _add_patch(arch, self._adapters[i].patch)
        self._applied = list(ids)

    def touched_layers(self) -> list[int]:
        """Layers whose output-projection weights the stack has changed at some point (a server that
        serves a copy of the model copies these after on_change)."""
        return sorted(self._base)

    # -- loading and syncing with the folder ----------------------------------------------------------------

    def _load(self, adapter_id: str) -> Adapter:
        if adapter_id not in self._adapters:
            self._adapters[adapter_id] = load_adapter(self.lm, self.path / adapter_id, base_digest=self.base_digest,
                                                      max_bytes=self.max_bytes)
        return self._adapters[adapter_id]

    def load(self) -> list[str]:
        """Apply every enabled patch in manifest order. Returns messages about problems found (an adapter
        that fails validation is skipped and reported; it stays in the manifest)."""
        with self.lock:
            self.folder.clean_stale()          # (creates the folder, unless it cannot be written)
            problems, _ = self._sync()
            self._loaded = True
            return problems

    def sync(self) -> list[str]:
        """Bring the model in line with the folder: new directories are validated and appended, removed
        ones undone, manifest changes (e.g. `star adapters disable` in another process) followed. Returns
        one message per change or problem; [] when nothing changed."""
        problems, changes = self._sync()
        return problems + changes

    def _sync(self) -> tuple[list[str], list[str]]:
        with self.lock, self.folder.locked():
            manifest, new_ids, messages = self.folder.state()
            accepted = self._admit(new_ids, manifest, messages)
            self._forget_gone(set(manifest.order))
            wanted = self._load_enabled(manifest, messages)
            changes = self._follow(manifest, wanted, accepted, messages)
            self._store(manifest)
            return messages, changes

    def _admit(self, new_ids: list[str], manifest: Manifest, messages: list[str]) -> list[str]:
        """Unlisted directories, validated before they enter the manifest; returns those accepted. One
        rejected before with the same files is dropped again without a new message."""
        accepted = []
        for i in new_ids:
            sig = dir_signature(self.path / i)
            if self._rejected.get(i) != sig:
                try:
                    self._load_new(i)
                    accepted.append(i)
                    continue
                except AdapterError as e:
                    self._rejected[i] = sig
                    messages.append(f"ignored {i}: {e}")
            manifest.order.remove(i)
            manifest.enabled.pop(i, None)
        return accepted

    def _load_new(self, adapter_id: str) -> None:
        if not valid_name(adapter_id):
            raise AdapterError("bad directory name (letters, digits, '.', '_', '-' only)")
        self._adapters.pop(adapter_id, None)
        self._load(adapter_id)
        self._rejected.pop(adapter_id, None)

    def _forget_gone(self, present: set[str]) -> None:
        for i in [i for i in self._adapters if i not in present]:
            del self._adapters[i]
        self._problems = {i: p for i, p in self._problems.items() if i in present}

    def _load_enabled(self, manifest: Manifest, messages: list[str]) -> list[str]:
        """The enabled, listed patches that validate (loaded now if not yet), in manifest order; one whose
        files are the same as when they last failed is not re-read."""
        wanted = []
        for i in manifest.order:
            if not manifest.enabled[i]:
                self._adapters.pop(i, None)      # not needed in memory while disabled
                continue
            if i in self._problems and self._problem_sigs.get(i) == dir_signature(self.path / i):
                continue
            try:
                self._load(i)
                self._problems.pop(i, None)
                wanted.append(i)
            except AdapterError as e:
                if self._problems.get(i) != str(e):
                    messages.append(f"{i} is not applied: {e}")
                self._problems[i] = str(e)
                self._problem_sigs[i] = dir_signature(self.path / i)
        return wanted

    def _follow(self, manifest: Manifest, wanted: list[str], accepted: list[str], messages: list[str]) -> list[str]:
        """Make the model the wanted patches: those known before follow the manifest at once, newcomers are
        applied one by one under the regression policy (one that breaks an earlier case is disabled)."""
        changes = []
        known = [i for i in wanted if i not in accepted]
        if known != self._applied:
            removed = [i for i in self._applied if i not in known]
            added = [i for i in known if i not in self._applied]
            self._apply_state(known)
            changes += [f"removed {i}" for i in removed] + [f"applied {i}" for i in added]
        for i in [i for i in wanted if i in accepted]:
            broken = self._try_apply([j for j in wanted if j in self._applied or j == i], keep_going=False,
                                     raise_on_regression=False)
            if broken:
                manifest.enabled[i] = False
                messages.append(f"{i} added but disabled: {self._regression_text(broken)}")
            else:
                changes.append(f"applied {i}")
        return changes

    def _store(self, manifest: Manifest) -> None:
        """Write the manifest when it changed (and is not already on disk as it is); a folder that cannot
        be written keeps it in memory only."""
        if not manifest.same(self._manifest) or not (self.path / "stack.json").exists():
            stored, _ = self.folder.read_manifest()
            if not manifest.same(stored) and not self.folder.read_only:
                self.folder.write_manifest(manifest)
            self._manifest = manifest

    # -- regression checks --------------------------------------------------------------------------------

    def _check(self, ids: list[str], enabled: bool = True) -> list[VerifyRow]:
        rows = []
        for i in ids:
            for n, case in enumerate(self._cases(i), start=1):
                ok, wrote = check_case(self.lm, case)
                rows.append(VerifyRow(i, n, case.prompt, case.fix, wrote, ok, enabled))
        return rows

    def cases(self) -> list[RepairCase]:
        """The stored cases of every applied patch: the earlier fixes a new repair must protect."""
        with self.lock:
            return [c for i in self._applied for c in self._cases(i)]

    def _cases(self, adapter_id: str) -> list[RepairCase]:
        if adapter_id in self._adapters:
            return self._adapters[adapter_id].cases
        sidecar = read_sidecar_or_none(self.path / adapter_id)
        return sidecar.repair_cases if sidecar else []

    def _try_apply(self, new_ids: list[str], *, keep_going: bool, raise_on_regression: bool = True) -> list[VerifyRow]:
        """Switch the model to `new_ids`; if cases of patches applied before (and kept) that held before
        now fail, either revert and raise RegressionError, or (keep_going) keep the new state. Returns
        the regressions (empty when none)."""
        old_ids = list(self._applied)
        self._apply_state(new_ids)
        if not self.check_regressions:
            return []
        earlier = [i for i in new_ids if i in old_ids]
        failing = [r for r in self._check(earlier) if not r.fixed]
        if not failing:
            return []
        self._apply_state(old_ids)
        held_before = {(r.id, r.case) for r in failing if check_case(self.lm, self._cases(r.id)[r.case - 1])[0]}
        self._apply_state(new_ids)
        broken = [r for r in failing if (r.id, r.case) in held_before]
        if broken and not keep_going:
            self._apply_state(old_ids)
            if raise_on_regression:
                raise RegressionError(self._regression_text(broken) + "; use --keep-going to apply it anyway", broken)
        return broken

    @staticmethod
    def _regression_text(rows: list[VerifyRow]) -> str:
        first = rows[0]
        more = f" (and {len(rows) - 1} more)" if len(rows) > 1 else ""
        return (
            f"it breaks {len(rows)} case(s) fixed by earlier patches: {first.id} case {first.case} "
            f"({excerpt(first.prompt)!s}) now writes {excerpt(first.wrote)!r} instead of {excerpt(first.fix)!r}{more}"
        )

    # -- mutations -------------------------------------------------------------------------------------------

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self.load()

    @contextmanager
    def _synced(self):
        """The opening of every mutation: the stack's lock, loaded, the folder's lock, the model in line
        with the folder."""
        with self.lock:
            self._ensure_loaded()
            with self.folder.locked(write=True):
                self.sync()
                yield

    def add(self, result, *, name: str | None = None, keep_going: bool = False) -> PatchInfo:
        """Persist a fixed RepairResult on top of the stack. The repair must have been made on this stack's
        model with the stack applied (its weights still hold the repair). The patch is saved as an adapter
        in the folder and stays applied; if it breaks earlier cases it is refused (weights restored to
        the stack without it, nothing written) unless keep_going."""
        from ..patch import restore_columns

        if not getattr(result, "fixed", False) or result.patch is None or result.saved is None:
            raise AdapterError("only a repair that fixed its case(s) can be added")
        with self.lock:
            # Back to the stack's state exactly, then re-add the delta the way a reload would.
            restore_columns(self.lm.arch, result.saved)
            with self._synced():
                try:     # what a reload would refuse is not saved either
                    for layer, ld in result.patch.layers.items():
                        check_delta_bound(layer, ld.columns, ld.delta, self.lm.arch.columns(layer))
                except AdapterError:
                    self._apply_state(self._applied)
                    raise
                self._remember_base(result.patch)
                encoded = encode_result(self.lm, result, name=name, base_digest=self.base_digest)
                adapter_id = encoded.default_id()
                if adapter_id in self._manifest.order:
                    self._apply_state(self._applied)
                    raise AdapterError(f"the same patch is already in the stack as {adapter_id}")
                # (B @ A decodes to exactly these deltas, so a reload gives the same bits.)
                adapter = Adapter(adapter_id, self.path / adapter_id, encoded.sidecar, result.patch, encoded.weights_sha256)
                return self._push(adapter, lambda dest: write_adapter_dir(dest, encoded.files), keep_going)

    def set_enabled(self, adapter_id: str, enabled: bool, *, keep_going: bool = False) -> PatchInfo:
        """Enable (under the regression policy) or disable (exact restore) one patch."""
        with self._synced():
            adapter_id = self.folder.resolve(adapter_id, self._manifest.order)
            manifest = self._manifest.copy()
            manifest.enabled[adapter_id] = enabled
            broken = []
            if not enabled:
                self._drop(adapter_id)
            elif adapter_id not in self._applied:
                self._load(adapter_id)
                self._problems.pop(adapter_id, None)
                new_ids = [i for i in manifest.order if i in self._applied or i == adapter_id]
                broken = self._try_apply(new_ids, keep_going=keep_going)
            self.folder.write_manifest(manifest)
            self._manifest = manifest
            return self._info(adapter_id, broken)

    def remove(self, adapter_id: str) -> PatchInfo:
        """Undo a patch exactly and delete its adapter directory."""
        with self._synced():
            adapter_id = self.folder.resolve(adapter_id, self._manifest.order)
            info = self._info(adapter_id)
            self._drop(adapter_id)
            manifest = self._manifest.copy()
            manifest.order.remove(adapter_id)
            manifest.enabled.pop(adapter_id, None)
            self.folder.delete_dir(adapter_id)      # directory first (see AdapterFolder.remove)
            self.folder.write_manifest(manifest)
            self._manifest = manifest
            info.applied = False
            return info

    def _drop(self, adapter_id: str) -> None:
        """Undo a patch exactly (if applied) and forget what was read or found about it."""
        if adapter_id in self._applied:
            self._apply_state([i for i in self._applied if i != adapter_id])
        self._adapters.pop(adapter_id, None)
        self._problems.pop(adapter_id, None)

    def undo_last(self) -> PatchInfo | None:
        """Remove the most recent applied patch (exact restore, directory deleted); None if none."""
        with self.lock:
            self._ensure_loaded()
            return self.remove(self._applied[-1]) if self._applied else None

    def import_(self, path, *, keep_going: bool = False) -> PatchInfo:
        """Add a colleague's adapter (a `.star.zip` archive or an adapter directory). Everything is
        validated before the model is touched; a bad file raises AdapterError and changes nothing."""
        src = Path(path).expanduser()
        if not src.exists():
            raise AdapterError(f"no such file: {src}")
        with self._synced():
            staging = Path(tempfile.mkdtemp(prefix=".tmp-import-", dir=self.path))
            try:
                suggested = self._stage(src, staging)
                adapter = load_adapter(self.lm, staging, base_digest=self.base_digest, max_bytes=self.max_bytes)
                adapter.id = self._import_id(suggested, adapter.weights_sha256)
                adapter.path = self.path / adapter.id

                def place(dest: Path) -> None:
                    os.chmod(staging, 0o755)
                    os.replace(staging, dest)

                return self._push(adapter, place, keep_going)
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)

    def _stage(self, src: Path, staging: Path) -> str:
        """The adapter's files copied or unpacked into `staging`; returns the id its name suggests."""
        if not src.is_dir():
            return unpack_archive(src, staging, max_bytes=self.max_bytes)
        copy_adapter_dir(src, staging, max_bytes=self.max_bytes)
        return src.name

    def _import_id(self, suggested: str, sha: str) -> str:
        dup = [i for i in self._manifest.order if self._same_weights(i, sha)]
        if dup:
            raise AdapterError(f"already in the stack as {dup[0]}")
        adapter_id = suggested if valid_name(suggested) else f"{sha[:10]}-import"
        if (self.path / adapter_id).exists():
            adapter_id = f"{adapter_id}-{sha[:6]}"
        if (self.path / adapter_id).exists():
            raise AdapterError(f"{adapter_id} already exists in {self.path}")
        return adapter_id

    def _push(self, adapter: Adapter, place: Callable[[Path], None], keep_going: bool) -> PatchInfo:
        """Put a validated adapter on top of the stack: apply it under the regression policy, then
        place its directory and append it to the manifest (last); undo everything if any step fails."""
        adapter_id = adapter.id
        self._adapters[adapter_id] = adapter
        try:
            broken = self._try_apply(self._applied + [adapter_id], keep_going=keep_going)
        except RegressionError:
            del self._adapters[adapter_id]
            raise
        placed = False
        try:
            place(self.path / adapter_id)
            placed = True
            manifest = Manifest(self._manifest.order + [adapter_id], {**self._manifest.enabled, adapter_id: True})
            self.folder.write_manifest(manifest)
            self._manifest = manifest
        except BaseException:
            # Nothing of the failed push may remain: a directory left in place but unlisted would be
            # admitted (and applied) by the next load or the folder watcher.
            if placed:
                try:
                    self.folder.delete_dir(adapter_id)
                except OSError:
                    shutil.rmtree(self.path / adapter_id, ignore_errors=True)
            self._drop(adapter_id)
            raise
        return self._info(adapter_id, broken)

    def _same_weights(self, adapter_id: str, sha: str) -> bool:
        if adapter_id in self._adapters:
            return self._adapters[adapter_id].weights_sha256 == sha
        sidecar = read_sidecar_or_none(self.path / adapter_id)
        return sidecar is not None and sidecar.adapter_sha256 == sha

    def export(self, adapter_id: str, path) -> Path:
        return self.folder.export(adapter_id, path)

    # -- reading ----------------------------------------------------------------------------------------------

    def _info(self, adapter_id: str, broken: list[VerifyRow] | None = None) -> PatchInfo:
        info = self.folder.info(adapter_id, enabled=self._manifest.enabled.get(adapter_id, True),
                                applied=adapter_id in self._applied, problem=self._problems.get(adapter_id))
        if broken:
            info.messages.append(f"applied with --keep-going: {self._regression_text(broken)}")
        return info

    def list(self) -> list[PatchInfo]:
        with self.lock:
            return [self._info(i) for i in self._manifest.order]

    @property
    def applied(self) -> list[str]:
        return list(self._applied)

    def verify(self) -> list[VerifyRow]:
        """Re-check every stored case (of enabled and disabled patches) against the current model."""
        with self.lock:
            self._ensure_loaded()
            return [r for i in self._manifest.order for r in self._check([i], enabled=self._manifest.enabled.get(i, True))]

    def watch(self, on_change, *, debounce: float = 0.3):
        """Hot reload: watch the folder with watchdog and apply what appears / disappears. Returns a
        started Watcher (call .stop())."""
        from .watch import Watcher

        self._ensure_loaded()
        return Watcher(self, on_change, debounce=debounce).start()
