"""The LSP base protocol's framing (`Content-Length: N` header lines, a blank line, N bytes of body), read
so that no byte stream can stop the server.

pygls' own reader trusts the header: `Content-Length: 1000000000000` asks for the memory at once (the
server died), and a wrong, missing or non-numeric length, or LF-only lines, leave it waiting for a bare
CRLF that may never come. This reader is used instead (`serve`, below); everything after the framing —
JSON, JSON-RPC, replies — stays pygls' (through `StarProtocol.receive`).

Accepted: header lines ending in CRLF or LF, header names in any case, headers other than Content-Length
(Content-Type) ignored, bodies of at most MAX_CONTENT_LENGTH bytes.

Refused, with a `FramingError` (the server answers it as a parse error with id null), after which the
reader resynchronises on the next `Content-Length: N` line in the stream: a header block without
Content-Length, two of them, a length that is not a number or is over MAX_CONTENT_LENGTH, and a length
longer than its message (seen when the next message's header line turns up inside the body). Bytes that
are not headers (a header line over MAX_HEADER_LINE bytes included) are dropped up to the next header
line, with one log line. A length shorter than its body cuts the body: that body is not JSON (a parse
error) and its tail is dropped the same way."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

MAX_CONTENT_LENGTH = 64 * 2**20      # far above any source file an editor sends whole
MAX_HEADER_LINE = 8 * 2**10
CHUNK = 64 * 2**10

# A complete Content-Length line anywhere in the stream, where the reader resynchronises. Valid JSON never
# contains one: outside strings `Content-Length` is no JSON token, and inside a string no raw line break
# can follow the digits. So found inside a body, it proves the declared length wrong.
HEADER_LINE = re.compile(rb"Content-Length:[ \t]{0,16}\d{1,20}[ \t]{0,16}\r?\n", re.IGNORECASE)
HEADER_LINE_MAX = 80                  # the longest match of HEADER_LINE
HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*(.*?)[ \t]*")    # RFC 9110 field syntax


class FramingError(Exception):
    """A message that could not be read (its reason is the exception's text)."""


class FrameReader:
    """Bodies out of a byte stream; `read_chunk` returns the next bytes available, b"" at the end."""

    def __init__(self, read_chunk: Callable[[], Awaitable[bytes]]):
        self._read_chunk = read_chunk
        self._buf = bytearray()
        self._eof = False
        self._lost = False            # the framing broke: the next message starts at the next header line

    async def next(self) -> bytes | FramingError | None:
        """The next body, a FramingError for a message that could not be read, None at the end."""
        while True:
            if self._lost:
                self._lost = False
                await self._resync(0)
            headers = await self._headers()
            if headers is None:
                return None
            if isinstance(headers, FramingError):
                self._lost = True
                return headers
            if headers is not _JUNK:
                return await self._body(headers)
            await self._resync(1)     # the junk's first byte may be no header, the rest may hold one

    async def _headers(self):
        """The body length from a header block; _JUNK at a line that is no header; None at the end."""
        length = None
        while True:
            end = await self._line_end()
            if end is None:
                return None
            if end < 0:
                return _JUNK
            line = bytes(self._buf[:end]).removesuffix(b"\r")
            if not line:
                del self._buf[: end + 1]
                return length if length is not None else FramingError("a header block without Content-Length")
            header = HEADER.fullmatch(line)
            if header is None:
                return _JUNK
            del self._buf[: end + 1]
            if header.group(1).lower() == b"content-length":
                if length is not None:
                    return FramingError("two Content-Length headers")
                length = _length(header.group(2))
                if isinstance(length, FramingError):
                    return length

    async def _line_end(self) -> int | None:
        """The index of the next line feed in the buffer (-1: not within MAX_HEADER_LINE), None at the end."""
        while True:
            end = self._buf.find(b"\n", 0, MAX_HEADER_LINE + 1)
            if end >= 0:
                return end
            if len(self._buf) > MAX_HEADER_LINE:
                return -1
            if not await self._fill():
                return None

    async def _body(self, length: int) -> bytes | FramingError | None:
        scanned = 0
        while True:
            header = HEADER_LINE.search(self._buf, max(0, scanned - HEADER_LINE_MAX))
            if header is not None and header.start() < length:
                del self._buf[: header.start()]
                return FramingError(f"Content-Length {length} is longer than the message "
                                    f"({header.start()} bytes came before the next header)")
            if len(self._buf) >= length:
                body = bytes(self._buf[:length])
                del self._buf[:length]
                return body
            scanned = len(self._buf)
            if not await self._fill():
                return None

    async def _resync(self, start: int) -> None:
        """Drop the bytes before the next Content-Length line at or after `start`."""
        dropped = 0
        while True:
            header = HEADER_LINE.search(self._buf, start)
            if header is not None:
                dropped += header.start()
                del self._buf[: header.start()]
                break
            cut = max(start, len(self._buf) - HEADER_LINE_MAX)     # a header line may straddle two chunks
            dropped += cut
            del self._buf[:cut]
            start = 0
            if not await self._fill():
                dropped += len(self._buf)
                self._buf.clear()
                break
        if dropped:
            log.warning("dropped %d byte(s) that were no LSP message", dropped)

    async def _fill(self) -> bool:
        if self._eof:
            return False
        chunk = await self._read_chunk()
        if not chunk:
            self._eof = True
            return False
        self._buf += chunk
        return True


_JUNK = object()


def _length(value: bytes) -> int | FramingError:
    if not value.isdigit():
        return FramingError(f"Content-Length is not a number: {value[:40]!r}")
    digits = value.lstrip(b"0") or b"0"
    if len(digits) > len(str(MAX_CONTENT_LENGTH)) or int(digits) > MAX_CONTENT_LENGTH:
        return FramingError(f"Content-Length {digits[:40].decode()} is over the limit of {MAX_CONTENT_LENGTH} bytes")
    return int(digits)


async def serve(read_chunk: Callable[[], Awaitable[bytes]], protocol, stop_event: threading.Event) -> None:
    """pygls' message loop (`pygls.io_.run_async`) over a FrameReader: each body goes to
    `protocol.receive`, each framing error to `protocol.refuse_unreadable`."""
    frames = FrameReader(read_chunk)
    while not stop_event.is_set():
        frame = await frames.next()
        if frame is None:
            break
        try:
            if isinstance(frame, FramingError):
                protocol.refuse_unreadable(str(frame))
            else:
                protocol.receive(frame)
        except Exception:
            log.exception("unable to handle a message")


def stdin_chunks(stdin, executor) -> Callable[[], Awaitable[bytes]]:
    """Reads of whatever stdin has (up to CHUNK bytes), in `executor` as pygls does."""
    return lambda: asyncio.get_running_loop().run_in_executor(executor, stdin.read1, CHUNK)
