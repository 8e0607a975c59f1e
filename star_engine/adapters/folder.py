"""The adapters folder on disk, without a model: adapter directories plus the manifest `stack.json`.

Layout:

    <folder>/stack.json              {"version": 1, "order": [id, ...], "enabled": {id: bool}}
    <folder>/<id>/adapter_config.json, adapter_model.safetensors, star.json
    <folder>/.tmp-*, .trash-*, .lock, .stack.json.tmp-*   (ignored by every reader and the watcher)

Every write is atomic (temp + fsync + rename; the manifest last), so whatever moment a writer dies at, the
folder reads as the previous state or the new one. An adapter directory not in the manifest (dropped in by
hand) is appended; an entry whose directory is gone is dropped with a warning.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs
from filelock import FileLock

from .atomic import atomic_write_file, atomic_write_with, clean_dead_temps
from .format import ADAPTER_FILES, MAX_BYTES, META_NAME, WEIGHTS_NAME, read_weights, valid_name
from .sidecar import read_sidecar_or_none
from .untrusted import MAX_JSON_BYTES, AdapterError, is_pickle, read_regular_file

MANIFEST = "stack.json"
MANIFEST_VERSION = 1
ARCHIVE_SUFFIX = ".star.zip"
_STALE_SECONDS = 3600      # leftover temp dirs older than this are deleted on load
_READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


class ReadOnlyFolderError(AdapterError):
    """A change was asked of an adapters folder this process cannot write (read-only mount, no permission)."""


def default_folder() -> Path:
    """$STAR_ADAPTERS_DIR, else the user's data dir (e.g. ~/.local/share/star/adapters)."""
    env = os.environ.get("STAR_ADAPTERS_DIR")
    return Path(env).expanduser() if env else Path(platformdirs.user_data_dir("star")) / "adapters"


@dataclass
class Manifest:
    order: list[str] = field(default_factory=list)
    enabled: dict[str, bool] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        data = {"version": MANIFEST_VERSION, "order": self.order, "enabled": {i: self.enabled.get(i, True) for i in self.order}}
        return (json.dumps(data, indent=2) + "\n").encode()

    def copy(self) -> "Manifest":
        return Manifest(list(self.order), dict(self.enabled))

    def same(self, other: "Manifest") -> bool:
        return self.to_bytes() == other.to_bytes()


@dataclass
class PatchInfo:
    """One entry of the stack, for listing."""

    id: str
    name: str
    enabled: bool
    applied: bool                  # its deltas are in the model now (False without a model)
    method: str
    created: str
    cases: list                    # RepairCase
    layers: list[int]
    neurons: int
    size_bytes: int
    path: Path
    problem: str | None = None     # why an enabled patch is not applied / cannot be read
    messages: list[str] = field(default_factory=list)   # e.g. regressions accepted with keep_going

    def to_json(self) -> dict:
        return dict(self.__dict__, cases=[c.to_dict() for c in self.cases], path=str(self.path))


def dir_signature(directory: Path) -> tuple:
    """Changes when any file of the directory is added, removed, resized or rewritten."""
    try:
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir()))
    except OSError:
        return ()


class AdapterFolder:
    """The folder: manifest, adapter directories, archives. Safe against concurrent writers in other
    processes and threads (a reentrant file lock on `.lock`).

    A folder this process cannot write (a read-only mount, no write permission) is read without the lock:
    its patches are listed and applied, and every change (`locked(write=True)`) raises ReadOnlyFolderError
    with one line."""

    def __init__(self, path=None):
        self.path = Path(path).expanduser() if path is not None else default_folder()
        self._lock = FileLock(self.path / ".lock")
        self.read_only: str | None = None      # why the folder cannot be written (None: it can, as far as known)

    @contextmanager
    def locked(self, *, write: bool = False):
        err = self._acquire()
        if err is None:
            self.read_only = None
            try:
                yield
            finally:
                self._lock.release()
            return
        self.read_only = os.strerror(err)
        if write:
            raise ReadOnlyFolderError(
                f"the adapters folder {self.path} is read-only ({self.read_only}): its patches are applied, "
                "but none can be added, removed, enabled, disabled or imported"
            )
        yield

    def _acquire(self) -> int | None:
        """Take the lock (creating the folder if needed); the errno when the folder cannot be written."""
        lock = self.path / ".lock"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if not os.access(lock if os.path.lexists(lock) else self.path, os.W_OK):
                return errno.EROFS if _on_read_only_mount(self.path) else errno.EACCES
            self._lock.acquire()
        except OSError as e:
            if e.errno in _READ_ONLY_ERRNOS:
                return e.errno
            raise
        return None

    # -- reading --------------------------------------------------------------------------------------------

    def adapter_dirs(self) -> list[str]:
        """Names of the candidate adapter directories (dot-names are temp files and ignored)."""
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            return []
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))

    def read_manifest(self) -> tuple[Manifest, list[str]]:
        """The manifest as stored (empty when absent); unreadable -> empty plus a warning."""
        p = self.path / MANIFEST
        if not os.path.lexists(p):
            return Manifest(), []
        try:
            raw = read_regular_file(p, MAX_JSON_BYTES, MANIFEST)
        except AdapterError as e:
            return Manifest(), [f"{e}; rebuilt from the folder"]
        try:
            data = json.loads(raw)
            order = list(dict.fromkeys(str(i) for i in data["order"]))
            enabled = {str(k): bool(v) for k, v in (data.get("enabled") or {}).items()}
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return Manifest(), [f"{MANIFEST} is unreadable; rebuilt from the folder"]
        return Manifest(order, {i: enabled.get(i, True) for i in order}), []

    def state(self) -> tuple[Manifest, list[str], list[str]]:
        """The manifest reconciled with the directories present: (manifest, new ids, messages). New
        directories are appended, oldest star.json `created` first, enabled."""
        stored, messages = self.read_manifest()
        present = set(self.adapter_dirs())
        for gone in [i for i in stored.order if i not in present]:
            messages.append(f"{gone}: its directory is gone; dropped from the stack")
        order = [i for i in stored.order if i in present]
        new = sorted(present - set(order), key=lambda i: (self._created(i), i))
        order += new
        return Manifest(order, {i: stored.enabled.get(i, True) for i in order}), new, messages

    def _created(self, adapter_id: str) -> str:
        sidecar = read_sidecar_or_none(self.path / adapter_id)
        return (sidecar.created if sidecar else None) or ""

    def write_manifest(self, manifest: Manifest) -> None:
        with self.locked(write=True):
            atomic_write_file(self.path / MANIFEST, manifest.to_bytes())

    def resolve(self, ref: str, ids: list[str] | None = None) -> str:
        """An id from an exact id or a unique prefix."""
        ids = ids if ids is not None else self.state()[0].order
        if ref in ids:
            return ref
        hits = [i for i in ids if i.startswith(ref)]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise AdapterError(f"no adapter {ref!r} in {self.path}")
        raise AdapterError(f"{ref!r} is ambiguous: {', '.join(hits[:5])}")

    def info(self, adapter_id: str, enabled: bool, applied: bool = False, problem: str | None = None) -> PatchInfo:
        directory = self.path / adapter_id
        sidecar = read_sidecar_or_none(directory)
        try:
            size = sum(e.stat(follow_symlinks=False).st_size for e in os.scandir(directory)
                       if e.is_file(follow_symlinks=False))
        except OSError:
            size = 0
        if sidecar is None:
            return PatchInfo(adapter_id, adapter_id, enabled, applied, "?", "", [], [], 0, size, directory,
                             problem or f"no readable {META_NAME}")
        return PatchInfo(adapter_id, sidecar.name or adapter_id, enabled, applied, sidecar.method or "?",
                         sidecar.created or "", sidecar.repair_cases, sidecar.layers or [], sidecar.n_neurons or 0,
                         size, directory, problem)

    def list(self) -> list[PatchInfo]:
        manifest, _, _ = self.state()
        return [self.info(i, manifest.enabled[i]) for i in manifest.order]

    # -- writing --------------------------------------------------------------------------------------------

    def set_enabled(self, adapter_id: str, enabled: bool) -> str:
        """Enable or disable an adapter in the manifest. Returns the id."""
        with self.locked(write=True):
            manifest, _, _ = self.state()
            adapter_id = self.resolve(adapter_id, manifest.order)
            manifest.enabled[adapter_id] = enabled
            self.write_manifest(manifest)
            return adapter_id

    def delete_dir(self, adapter_id: str) -> None:
        """Remove an adapter directory atomically: rename it to a dot-name first, then delete that."""
        src = self.path / adapter_id
        if not src.exists():
            return
        trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=self.path))
        os.replace(src, trash / adapter_id)
        shutil.rmtree(trash, ignore_errors=True)

    def remove(self, adapter_id: str) -> str:
        """Drop an adapter from the manifest, then delete its directory. Returns the id."""
        with self.locked(write=True):
            manifest, _, _ = self.state()
            adapter_id = self.resolve(adapter_id, manifest.order)
            manifest.order.remove(adapter_id)
            manifest.enabled.pop(adapter_id, None)
            # Directory first: a crash in between leaves a manifest entry without a directory (dropped on
            # the next load), never an unlisted directory (which would come back as a new patch).
            self.delete_dir(adapter_id)
            self.write_manifest(manifest)
            return adapter_id

    def clean_stale(self) -> None:
        """Delete temporaries left by writers that died. Under the folder lock, so no writer of this folder
        is at work: those of a dead pid or only ever made under the lock go at once, any other `.tmp-*` (an
        older star, a live pid) once older than an hour."""
        with self.locked():
            if self.read_only:
                return
            clean_dead_temps(self.path)
            self._clean_old()

    def _clean_old(self) -> None:
        now = time.time()
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            return
        for e in entries:
            if e.name.startswith((".tmp-", ".trash-", f".{MANIFEST}.tmp-")):
                locked_only = e.name.startswith((".tmp-import-", ".trash-", f".{MANIFEST}.tmp-"))
                try:
                    if locked_only or now - e.stat(follow_symlinks=False).st_mtime > _STALE_SECONDS:
                        if e.is_dir(follow_symlinks=False):
                            shutil.rmtree(e.path, ignore_errors=True)
                        else:
                            os.unlink(e.path)
                except OSError:
                    pass

    # -- sharing --------------------------------------------------------------------------------------------

    def export(self, adapter_id: str, destination) -> Path:
        """Write one adapter as a single `.star.zip` archive (stored, not compressed: the weights are
        floats). An existing directory (or a path ending in /) gets `<id>.star.zip` inside it; a file name
        without `.zip` gets `.star.zip` appended."""
        with self.locked():
            adapter_id = self.resolve(adapter_id)
            src = self.path / adapter_id
            missing = [f for f in ADAPTER_FILES if not (src / f).is_file()]
            if missing:
                raise AdapterError(f"{adapter_id} is incomplete (missing {', '.join(missing)})")
            dest = Path(destination).expanduser()
            if dest.is_dir() or str(destination).endswith(("/", os.sep)):
                dest = dest / f"{adapter_id}{ARCHIVE_SUFFIX}"
            elif not dest.name.endswith(".zip"):
                dest = dest.with_name(dest.name + ARCHIVE_SUFFIX)
            dest.parent.mkdir(parents=True, exist_ok=True)

            def pack(f) -> None:
                with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as z:
                    for name in ADAPTER_FILES:
                        z.write(src / name, f"{adapter_id}/{name}")

            atomic_write_with(dest, pack)
            return dest


def _on_read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def unpack_archive(archive: Path, into: Path, *, max_bytes: int = MAX_BYTES) -> str:
    """Check a `.star.zip` and extract it into the (empty) directory `into`. Every member is checked before
    anything is written: known file names only, one adapter directory at most, no absolute or `..`
    paths, no links, sizes within the limit. Returns the id its name suggests."""
    if not zipfile.is_zipfile(archive):
        raise AdapterError(f"{archive.name} is not a zip archive (expected a {ARCHIVE_SUFFIX} file)")
    try:
        z = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise AdapterError(f"{archive.name} is not a valid zip archive ({e})") from None
    with z:
        members = [m for m in z.infolist() if not m.is_dir()]
        if len(members) > len(ADAPTER_FILES) + 1:
            raise AdapterError(f"{archive.name} has {len(members)} files; an adapter archive has {len(ADAPTER_FILES)}")
        allowed = set(ADAPTER_FILES) | {"README.md"}
        tops, total, chosen = set(), 0, {}
        for m in members:
            name = m.filename
            parts = name.split("/")
            if name.startswith("/") or "\\" in name or ":" in name or any(p in ("", ".", "..") for p in parts):
                raise AdapterError(f"{archive.name}: unsafe path {name!r} in the archive")
            if len(parts) > 2:
                raise AdapterError(f"{archive.name}: unexpected nested path {name!r}")
            if (m.external_attr >> 16) & 0o170000 == 0o120000:
                raise AdapterError(f"{archive.name}: {name!r} is a symbolic link")
            if parts[-1] not in allowed:
                if is_pickle(parts[-1]):
                    raise AdapterError(f"{archive.name}: {parts[-1]} is a pickle file; only safetensors are accepted")
                raise AdapterError(f"{archive.name}: unexpected file {name!r}")
            tops.add(parts[0] if len(parts) == 2 else "")
            if parts[-1] in chosen:
                raise AdapterError(f"{archive.name}: {parts[-1]} appears twice")
            chosen[parts[-1]] = m
            total += m.file_size
        if len(tops) != 1:
            raise AdapterError(f"{archive.name} holds more than one adapter")
        if total > max_bytes + 8 * 2**20:
            raise AdapterError(f"{archive.name} unpacks to {total / 2**20:.0f} MB, over the limit")
        missing = [f for f in ADAPTER_FILES if f not in chosen]
        if missing:
            raise AdapterError(f"{archive.name} is not a STAR adapter (missing {', '.join(missing)})")
        top = tops.pop()
        for name in ADAPTER_FILES:
            try:
                # zipfile yields at most the declared size (checked against the total above), then checks the CRC
                with z.open(chosen[name]) as src, open(into / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                    dst.flush()
                    os.fsync(dst.fileno())
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
                raise AdapterError(f"{archive.name} is corrupted ({e.__class__.__name__}: {str(e)[:60]})") from None
    suggested = top[: -len(".star")] if top.endswith(".star") else top
    if not suggested or not valid_name(suggested):
        suggested = archive.name[: -len(ARCHIVE_SUFFIX)] if archive.name.endswith(ARCHIVE_SUFFIX) else archive.stem
    return suggested


def copy_adapter_dir(src: Path, into: Path, *, max_bytes: int = MAX_BYTES) -> None:
    """Copy an adapter directory's known files into `into`: regular files only (no links, FIFOs or
    devices), each within its size cap, no pickles."""
    for p in src.iterdir():
        if is_pickle(p.name):
            raise AdapterError(f"{p.name} is a pickle file: only safetensors adapters are accepted (never pickle)")
    for name in ADAPTER_FILES:
        p = src / name
        if not os.path.lexists(p):
            if name == WEIGHTS_NAME:
                raise AdapterError(f"no {WEIGHTS_NAME} in {src.name}")
            raise AdapterError(f"{name} is missing in {src.name}")
        data = read_weights(p, max_bytes) if name == WEIGHTS_NAME else read_regular_file(p, MAX_JSON_BYTES, name)
        with open(into / name, "wb") as f:
            f.write(data)
