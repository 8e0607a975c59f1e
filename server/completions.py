"""Completions: from a request to a completion text, with the latency machinery.

* The completion cache (with typing-forward) is checked first, on the event loop.
* Otherwise the generation runs in a single worker thread; the event loop never blocks.
* Cancel-previous: a new request for a document stops the generation of the previous one (it answers
  empty); `$/cancelRequest` cancels the handler's task and stops its generation too.
* At most MAX_PENDING generations wait at a time (a flood of requests on many documents cancels the
  oldest), and an optional server-side debounce delays automatic requests.
* Latency budget: an automatic single-line completion still running `latencyBudgetMs` after its
  request arrived stops with the partial line it has (cached for typing-forward only; an explicitly
  invoked completion is never cut). An automatic multi-line completion still running
  `multilineBudgetMs` after it arrived shows the whole lines it has (or its first line so far); the
  decoder keeps what it fed, so the next request — after the user accepts those lines, or asks again —
  continues the block from there instead of starting over. A cut completion also goes on decoding in
  the worker after the answer (until the next request for the document stops it), so that what follows
  is ready before it is asked for.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from lsprotocol import types

from star_engine.generate import GenerationCancelled

from .cache import CompletionCache
from .documents import BadPosition, offset_at, open_document
from .engine_host import worker_pool
from .prompting import Context, build_prompt, postprocess

log = logging.getLogger(__name__)

MAX_PENDING = 4
SHOWN_KEPT = 256
ACCEPT_COMMAND = "star.completion.accepted"


@dataclass
class Shown:
    """A completion the server returned (for acceptance and for "mark as wrong")."""

    id: str
    uri: str
    position: types.Position
    text: str
    accepted: bool = False
    at: float = field(default_factory=time.monotonic)


@dataclass
class Stats:
    requests: int = 0
    generated: int = 0
    cached: int = 0
    cancelled: int = 0
    empty: int = 0
    accepted: int = 0
    truncated: int = 0
    continued: int = 0   # cut completions decoded on to their end in the background
    errors: int = 0
    new_tokens: int = 0
    forward_passes: int = 0
    drafted: int = 0
    draft_accepted: int = 0
    generation_seconds: list = field(default_factory=list)

    def count(self, decoded, background: bool = False) -> None:
        if not background:
            self.generated += 1
            self.generation_seconds.append(decoded.seconds)
        self.new_tokens += len(decoded.ids)
        self.forward_passes += decoded.forward_passes
        self.drafted += decoded.drafted
        self.draft_accepted += decoded.accepted

    def to_json(self, cache: CompletionCache) -> dict:
        g = sorted(self.generation_seconds[-1000:])
        p = lambda q: round(g[min(len(g) - 1, int(q * len(g)))] * 1000, 1) if g else None
        return {
            "requests": self.requests, "generated": self.generated, "cached": self.cached,
            "cancelled": self.cancelled, "empty": self.empty, "accepted": self.accepted,
            "truncated": self.truncated, "continued": self.continued, "errors": self.errors, "newTokens": self.new_tokens,
            "forwardPasses": self.forward_passes, "drafted": self.drafted, "draftAccepted": self.draft_accepted,
            "generationMsP50": p(0.5), "generationMsP95": p(0.95), "cache": cache.stats(),
        }


class CompletionService:
    def __init__(self, server):
        self.server = server
        self.cache = CompletionCache()
        self.executor = worker_pool("star-generate")
        self.inflight: OrderedDict[str, threading.Event] = OrderedDict()
        self.shown: OrderedDict[str, Shown] = OrderedDict()
        self.stats = Stats()

    # -- the one entry point ---------------------------------------------------------------------------

    async def complete(self, uri: str, position: types.Position, automatic: bool) -> Shown | None:
        """The completion at `position` of the open document `uri`, or None (nothing to show)."""
        self.stats.requests += 1
        arrived = time.perf_counter()
        try:
            doc = open_document(self.server, uri)
            offset = offset_at(doc, position)
        except BadPosition as e:
            log.info("no completion: %s", e)
            return None
        if not await self.server.wait_loaded():
            return None
        settings, host = self.server.settings, self.server.host
        context = Context.at(doc.source, offset, self._budget(settings))
        key = settings.generation_key() + (host.version, host.model_name)
        previous = self.inflight.pop(uri, None)
        if previous is not None:   # cancel-previous: the user moved on
            previous.set()
        text = self.cache.get(context, key)
        if text is not None:
            self.stats.cached += 1
            return self._shown(uri, position, text)

        cancel = threading.Event()
        self.inflight[uri] = cancel
        while len(self.inflight) > MAX_PENDING:
            _, oldest = self.inflight.popitem(last=False)
            oldest.set()
        try:
            if automatic and settings.debounce_ms:
                await asyncio.sleep(settings.debounce_ms / 1000)
            if cancel.is_set():
                self.stats.cancelled += 1
                return None
            loop = asyncio.get_running_loop()
            async with self.server.status.generation() as g:
                try:
                    text, generated, version, prompt = await loop.run_in_executor(
                        self.executor, self._generate, uri, context, settings, cancel,
                        arrived if automatic else None,
                    )
                except GenerationCancelled:
                    self.stats.cancelled += 1
                    return None
                if not prompt.multiline:   # long multi-line completions are expected to take seconds
                    g.seconds = generated.decoded.seconds
            self.stats.count(generated.decoded)
            self.stats.truncated += generated.truncated
            self.cache.put(context, settings.generation_key() + (version, host.model_name), text,
                           exact=not generated.truncated)
        except asyncio.CancelledError:
            cancel.set()
            self.stats.cancelled += 1
            raise
        finally:
            if self.inflight.get(uri) is cancel:
                del self.inflight[uri]
        if generated.truncated:
            self._continue_later(uri, context, prompt, settings)
        return self._shown(uri, position, text)

    def _continue_later(self, uri: str, context: Context, prompt, settings) -> None:
        """A completion its budget cut goes on in the worker to its natural end, so that the next request
        (the user accepted what was shown, or asks again) finds the rest already fed — and, at the same
        spot, the whole completion in the cache. Any request for the document stops it first."""
        cancel = threading.Event()
        self.inflight[uri] = cancel
        done = asyncio.get_running_loop().run_in_executor(
            self.executor, self._generate, uri, context, settings, cancel, None, prompt)

        def finished(future) -> None:
            if self.inflight.get(uri) is cancel:
                del self.inflight[uri]
            if future.cancelled() or isinstance(future.exception(), GenerationCancelled):
                return   # the next request came first
            if future.exception() is not None:
                log.warning("continuing a completion failed: %s", future.exception())
                return
            text, generated, version, _ = future.result()
            self.stats.continued += 1
            self.stats.count(generated.decoded, background=True)
            self.cache.put(context, settings.generation_key() + (version, self.server.host.model_name), text)

        done.add_done_callback(finished)

    def _budget(self, settings) -> int:
        window = self.server.host.context_window
        return max(16, min(settings.context_tokens, window - max(settings.max_tokens, settings.max_line_tokens) - 8))

    def _generate(self, uri, context: Context, settings, cancel: threading.Event, arrived: float | None,
                  prompt=None):
        """In the generation worker: prompt (unless given), generate, post-process. `arrived`: when an
        automatic request came (its latency budget counts from there); None: never cut."""
        if cancel.is_set():
            raise GenerationCancelled()
        host = self.server.host
        prompt = prompt or build_prompt(
            context,
            host.serving.tokenizer,
            multiline=settings.multiline,
            max_tokens=settings.max_tokens,
            max_line_tokens=settings.max_line_tokens,
        )
        budget = settings.multiline_budget_ms if prompt.multiline else settings.latency_budget_ms
        deadline = arrived + budget / 1000 if arrived is not None and budget else None
        generated, version = host.complete(uri, prompt, cancel, deadline, settings.speculate)
        text = postprocess(generated.text, prompt)
        d = generated.decoded
        log.debug(
            "completion %.0f ms (prompt %d tokens, %d reused, %d new in %d passes, %d/%d drafted accepted): %r",
            d.seconds * 1000, d.prompt_tokens, d.reused_tokens, len(d.ids), d.forward_passes, d.accepted,
            d.drafted, text,
        )
        return text, generated, version, prompt

    def _shown(self, uri: str, position: types.Position, text: str) -> Shown | None:
        if not text:
            self.stats.empty += 1
            return None
        shown = Shown(id=uuid.uuid4().hex[:12], uri=uri, position=position, text=text)
        self.shown[shown.id] = shown
        while len(self.shown) > SHOWN_KEPT:
            self.shown.popitem(last=False)
        return shown

    # -- after the fact ----------------------------------------------------------------------------------

    def accepted(self, completion_id) -> None:
        shown = self.shown.get(completion_id) if isinstance(completion_id, str) else None
        if shown is not None and not shown.accepted:
            shown.accepted = True
            self.stats.accepted += 1

    def last_shown(self, uri: str) -> Shown | None:
        """The latest completion shown (or accepted) in `uri`."""
        for shown in reversed(self.shown.values()):
            if shown.uri == uri:
                return shown
        return None

    def weights_changed(self) -> None:
        self.cache.clear()

    def cancel_all(self) -> None:
        for event in self.inflight.values():
            event.set()

    # -- LSP shapes ----------------------------------------------------------------------------------------

    @staticmethod
    def command(shown: Shown) -> types.Command:
        return types.Command(title="STAR: completion accepted", command=ACCEPT_COMMAND, arguments=[shown.id])

    def inline_items(self, shown: Shown | None) -> types.InlineCompletionList:
        if shown is None:
            return types.InlineCompletionList(items=[])
        at = shown.position
        return types.InlineCompletionList(
            items=[
                types.InlineCompletionItem(
                    insert_text=shown.text,
                    range=types.Range(start=at, end=at),
                    command=self.command(shown),
                )
            ]
        )

    def completion_items(self, shown: Shown | None, word: str) -> types.CompletionList:
        """Fallback for clients without inline completion: one item replacing the word before the cursor
        (so the client's prefix filter keeps it)."""
        if shown is None:
            return types.CompletionList(is_incomplete=True, items=[])
        at = shown.position
        start = types.Position(line=at.line, character=at.character - len(word.encode("utf-16-le")) // 2)
        text = word + shown.text
        label = text.split("\n", 1)[0]
        return types.CompletionList(
            is_incomplete=True,
            items=[
                types.CompletionItem(
                    label=label[:80] + ("…" if len(label) > 80 or "\n" in text else ""),
                    kind=types.CompletionItemKind.Snippet,
                    detail="STAR",
                    documentation=text,
                    filter_text=text,
                    sort_text="0",
                    insert_text_format=types.InsertTextFormat.PlainText,
                    text_edit=types.TextEdit(range=types.Range(start=start, end=at), new_text=text),
                    command=self.command(shown),
                )
            ],
        )
