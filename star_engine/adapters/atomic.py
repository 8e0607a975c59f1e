"""Writes that readers see whole or not at all, whatever moment the writer dies at: a temp file or directory
next to the target, fsync, rename; and the cleaning of temporaries left by a writer that was killed."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Collection
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO

TMP_PREFIX = ".tmp-"
_OWNED_TMP = re.compile(r"^\.tmp-(\d+)-")     # a temp directory named after its writer's pid


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (best effort: some file systems refuse to open a directory)."""
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_file(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old or the new content."""
    atomic_write_with(path, lambda f: f.write(data))


def atomic_write_with(path: Path, fill: Callable[[BinaryIO], object]) -> None:
    """atomic_write_file for content that `fill` streams into the open temp file (e.g. a zip archive)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_dir(target: Path, fill: Callable[[Path], object]) -> Path:
    """A directory that appears complete or not at all: `fill` writes (and fsyncs) its files into a temp
    directory next to `target`, named after this process's pid, which is then renamed into place. The
    caller checks that `target` does not exist (or is an empty directory)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=target.parent))
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)
        fsync_dir(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(target.parent)
    return target


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0          # another user's process, or not a pid at all
    return True


def clean_dead_temps(parent: Path, *, only_holding: Collection[str] | None = None) -> list[str]:
    """Delete the `.tmp-<pid>-*` directories in `parent` whose writer process is gone. A live writer's
    directory is never touched; with `only_holding`, neither is one that holds any other file name (so
    nothing of the user's beside a --save target). Returns the names deleted."""
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for e in entries:
        m = _OWNED_TMP.match(e.name)
        if m is None or not e.is_dir(follow_symlinks=False) or pid_alive(int(m.group(1))):
            continue
        try:
            names = {c.name for c in os.scandir(e.path)}
        except OSError:
            continue
        if only_holding is not None and not names <= set(only_holding):
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        removed.append(e.name)
    return removed
