"""An LRU cache of completions keyed by the context around the cursor, with typing-forward entries
(Tabby's pattern): when a completion C is stored for context X, the contexts "X + C[:k]" are stored too,
mapping to C[k:], so a user typing into a shown completion gets the rest of it at once.

Keys are digests of (context, settings), so an entry costs a few dozen bytes whatever the document.
The cache is cleared whenever the weights change (a repair, an undo, a reload)."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from .prompting import Context

FORWARD_CHARS = 64     # typing-forward entries for the first characters of a completion


def _key(context: Context, settings_key: tuple) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for part in (context.prefix, "\x00" if context.prefix_truncated else "\x01", context.suffix, repr(settings_key)):
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\xff")
    return h.digest()


class CompletionCache:
    def __init__(self, capacity: int = 4000):
        self.capacity = capacity
        self._entries: OrderedDict[bytes, str] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.forward_hits = self.misses = 0
        self._forward: set[bytes] = set()

    def get(self, context: Context, settings_key: tuple) -> str | None:
        key = _key(context, settings_key)
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            if key in self._forward:
                self.forward_hits += 1
            return value

    def put(self, context: Context, settings_key: tuple, completion: str, exact: bool = True) -> None:
        """Store `completion` for `context` and its typing-forward entries; only the latter when not
        `exact` (a partial line cut by the latency budget: asked again, the context deserves a full one)."""
        items = [(_key(context, settings_key), completion, False)] if exact else []
        for k in range(1, min(len(completion), FORWARD_CHARS + 1)):
            items.append((_key(context.extended(completion[:k]), settings_key), completion[k:], True))
        with self._lock:
            for key, value, forward in items:
                if forward and key in self._entries and key not in self._forward:
                    continue   # a real completion for that context wins over a forwarded one
                self._entries[key] = value
                self._entries.move_to_end(key)
                (self._forward.add if forward else self._forward.discard)(key)
            while len(self._entries) > self.capacity:
                old, _ = self._entries.popitem(last=False)
                self._forward.discard(old)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._forward.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict:
        total = self.hits + self.misses
        return {
            "entries": len(self._entries),
            "hits": self.hits,
            "forwardHits": self.forward_hits,
            "misses": self.misses,
            "hitRate": round(self.hits / total, 3) if total else 0.0,
        }
