"""The `star/status` notification: `{busy, kind, message}`, sent on every change of the server's state.

Kinds, by priority: loading > error > repairing > generating > slow > ready. `generating` is announced
only for a generation still running after GENERATING_DELAY_S, so fast completions and cache hits do not
make the client's status bar flicker on every keystroke. A client should take the first `ready` as the
signal that completions work."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

GENERATING_DELAY_S = 0.15
SLOW_S = 1.0     # a single-line completion slower than this makes the status "slow" until a fast one


class StatusBoard:
    def __init__(self, send: Callable[[dict], None]):
        self._send = send
        self.model = ""
        self.loading: str | None = None
        self.error: str | None = None
        self.repairing: str | None = None
        self.slow: str | None = None
        self._generating = 0
        self._last: dict | None = None

    def current(self) -> dict:
        if self.loading:
            return {"busy": True, "kind": "loading", "message": self.loading}
        if self.error:
            return {"busy": False, "kind": "error", "message": self.error}
        if self.repairing:
            return {"busy": True, "kind": "repairing", "message": self.repairing}
        if self._generating:
            return {"busy": True, "kind": "generating", "message": "generating a completion"}
        if self.slow:
            return {"busy": False, "kind": "slow", "message": self.slow}
        return {"busy": False, "kind": "ready", "message": f"ready ({self.model})" if self.model else "ready"}

    def update(self, **changes) -> None:
        for name, value in changes.items():
            setattr(self, name, value)
        self.publish()

    def publish(self) -> None:
        now = self.current()
        if now != self._last:
            self._last = now
            try:
                self._send(now)
            except Exception:   # the client is gone: nothing to tell
                pass

    def generation(self) -> "_Generating":
        """`async with board.generation() as g: ...; g.seconds = ...` around a model generation."""
        return _Generating(self)


class _Generating:
    def __init__(self, board: StatusBoard):
        self.board, self.seconds, self._timer, self._shown = board, None, None, False

    async def __aenter__(self):
        self._timer = asyncio.get_running_loop().call_later(GENERATING_DELAY_S, self._show)
        return self

    def _show(self):
        self._shown = True
        self.board._generating += 1
        self.board.publish()

    async def __aexit__(self, *exc):
        self._timer.cancel()
        if self._shown:
            self.board._generating -= 1
        if self.seconds is not None:
            self.board.slow = f"the last completion took {self.seconds:.1f} s" if self.seconds > SLOW_S else None
        self.board.publish()
        return False
