"""Open documents and cursor positions, checked: an unknown document or a position outside the text
is a one-line `BadPosition`, never an exception deep in a handler."""

from __future__ import annotations

from urllib.parse import unquote

from lsprotocol import types


MAX_UINTEGER = 2**31 - 1     # LSP's uinteger


class BadPosition(ValueError):
    pass


def open_document(ls, uri):
    """The open document `uri` (never a file read from disk behind the client's back)."""
    if not isinstance(uri, str) or not uri:
        raise BadPosition("no document uri given")
    doc = ls.workspace.text_documents.get(unquote(uri))
    if doc is None:
        raise BadPosition(f"document {uri} is not open")
    return doc


def offset_at(doc, position: types.Position) -> int:
    """The index into `doc.source` of a client position, or BadPosition if it is outside the text."""
    line, character = position.line, position.character
    if not isinstance(line, int) or not isinstance(character, int) or line < 0 or character < 0:
        raise BadPosition(f"invalid position {line}:{character}")
    lines = doc.lines
    if line >= len(lines):
        ends_with_eol = not lines or lines[-1].endswith(("\n", "\r"))
        if line == len(lines) and character == 0 and ends_with_eol:
            return len(doc.source)
        raise BadPosition(f"position {line}:{character} is outside the document ({len(lines)} lines)")
    text = lines[line].rstrip("\r\n")
    units = doc.position_codec.impl
    column = 0
    for ch in text:
        if character <= 0:
            break
        character -= units.code_units_for_char(ch)
        column += 1
    if character > 0:
        raise BadPosition(
            f"position {position.line}:{position.character} is outside line {position.line} "
            f"({units.num_units(text)} characters)"
        )
    if character < 0:   # the column falls between the two UTF-16 units of one character
        raise BadPosition(
            f"position {position.line}:{position.character} is inside a character (between the two halves of "
            f"a UTF-16 surrogate pair)"
        )
    return sum(len(l) for l in lines[:line]) + column


def position_arg(value) -> types.Position:
    """A Position from a command argument ({line, character})."""
    if isinstance(value, types.Position):
        return value
    if not isinstance(value, dict):
        raise BadPosition("position must be an object {line, character}")
    line, character = value.get("line"), value.get("character")
    for name, v in (("line", line), ("character", character)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise BadPosition(f"position.{name} must be an integer")
        if not 0 <= v <= MAX_UINTEGER:
            raise BadPosition(f"position.{name} must be between 0 and {MAX_UINTEGER}, not {v}")
    return types.Position(line=line, character=character)
