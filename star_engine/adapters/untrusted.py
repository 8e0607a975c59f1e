"""Reading files that may come from someone else (a colleague's adapter, a hand-edited folder): regular files
only, bounded in size, never blocking, never unpickled; every refusal is an AdapterError of one line."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

MAX_JSON_BYTES = 4 * 2**20
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class AdapterError(ValueError):
    """An adapter that cannot be used; the message is one line saying why."""


def is_pickle(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def read_regular_file(path: Path, limit: int, what: str) -> bytes:
    """The bytes of `path` if it is a regular file of at most `limit` bytes; AdapterError otherwise. Never
    follows a symbolic link (so never out of the adapter's directory), never blocks on a FIFO or a device
    (checked with lstat before opening, opened with O_NOFOLLOW | O_NONBLOCK, checked again with fstat), and
    never reads more than `limit` + 1 bytes, even from a file that grows while it is read."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise AdapterError(f"{what} is a symbolic link (only regular files are read)")
        if not stat.S_ISREG(st.st_mode):
            raise AdapterError(f"{what} is not a regular file")
        if st.st_size > limit:
            raise AdapterError(f"{what} is too large ({st.st_size} bytes, at most {limit})")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):        # replaced between lstat and open
                raise AdapterError(f"{what} is not a regular file")
            chunks, size = [], 0
            while size <= limit:
                chunk = os.read(fd, min(1 << 20, limit + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise AdapterError(f"{what} is missing") from None
    except OSError as e:
        raise AdapterError(f"cannot read {what}: {e.strerror}") from None
    if size > limit:
        raise AdapterError(f"{what} is too large (over {limit} bytes)")
    return b"".join(chunks)


def read_json_object(path: Path, what: str) -> dict:
    """A JSON object from a small regular file (read_regular_file's guarantees); AdapterError otherwise."""
    raw = read_regular_file(path, MAX_JSON_BYTES, what)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise AdapterError(f"{what} is not valid JSON ({e.__class__.__name__}: {str(e)[:80]})") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{what} is not a JSON object")
    return data
