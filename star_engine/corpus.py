"""A general code corpus that ships with every machine: the Python standard library and CPython's C headers.

Two disjoint halves, split by a hash of each file's path relative to its root, so the split does not
depend on where the interpreter is installed:

    "stat"  the sample whose activations give the protected statistic C_l (and the repair's locality guard)
    "held"  the other files: unrelated code the benchmark measures locality on, never seen by the solve

Files are read in sorted order; each gives at most `per_file` windows of `window` tokens from its start
(the first window of many files beats many windows of a few). Test suites and third-party packages are left
out. The same interpreter, tokenizer and sizes always give the same windows.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .capture import encode
from .model import LoadedModel

Split = Literal["stat", "held"]
_SKIP_PARTS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class CorpusSpec:
    split: Split
    n_tokens: int        # at least this many tokens (whole windows), fewer only if the corpus runs out
    window: int = 256
    per_file: int = 2


def _sources() -> list[tuple[Path, str]]:
    """(root, glob) of each language in the corpus."""
    paths = sysconfig.get_paths()
    return [(Path(paths["stdlib"]), "*.py"), (Path(paths["include"]), "*.h")]


def _in_split(relative: str, split: Split) -> bool:
    digit = hashlib.sha256(relative.encode()).digest()[0] % 2
    return digit == (0 if split == "stat" else 1)


def corpus_files(split: Split) -> list[Path]:
    """The files of one half, languages interleaved so that a short prefix already mixes them."""
    per_language = []
    for root, pattern in _sources():
        files = sorted(
            f for f in root.rglob(pattern)
            if f.is_file() and not _SKIP_PARTS & set(f.relative_to(root).parts)
            and _in_split(f.relative_to(root).as_posix(), split)
        )
        per_language.append(files)
    mixed = []
    longest = max(map(len, per_language), default=0)
    for i in range(longest):
        mixed += [files[i] for files in per_language if i < len(files)]
    return mixed


def _windows_of(ids: list[int], window: int, per_file: int) -> Iterator[tuple[int, ...]]:
    for start in range(0, min(len(ids), window * per_file), window):
        chunk = ids[start : start + window]
        if len(chunk) == window:
            yield tuple(chunk)


def corpus_windows(lm: LoadedModel, spec: CorpusSpec) -> list[tuple[int, ...]]:
    """Token windows of the corpus half, enough for `spec.n_tokens` tokens."""
    out: list[tuple[int, ...]] = []
    for path in corpus_files(spec.split):
        if len(out) * spec.window >= spec.n_tokens:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        # Only the start of a file is used: tokenising a whole 200 kB module would be wasted time.
        ids = encode(lm, text[: spec.window * spec.per_file * 8])
        out += _windows_of(ids, spec.window, spec.per_file)
    return out[: -(-spec.n_tokens // spec.window)]


def windows_digest(windows: list[tuple[int, ...]]) -> str:
    h = hashlib.sha256()
    for w in windows:
        h.update(b",".join(str(t).encode() for t in w) + b";")
    return h.hexdigest()
