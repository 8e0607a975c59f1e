"""Text helpers shared by the engine, the command line and the language server."""

from __future__ import annotations


def indent_width(line: str) -> int:
    """The number of spaces and tabs the line starts with."""
    return len(line) - len(line.lstrip(" \t"))


def excerpt(text: str, n: int = 40) -> str:
    """`text` stripped and on one line (⏎ for a new line), cut to at most `n` characters (… where cut)."""
    text = text.strip().replace("\n", "⏎")
    return text if len(text) <= n else text[: n - 1] + "…"
