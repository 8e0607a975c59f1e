"""Greedy decoding, the one decoder of the engine: what the editor shows, what the repair checks.

Exactly greedy (each token the argmax of the model's next-token logits), made fast the only way that keeps
it exact, and given what an editor needs:

* **Prompt lookup (speculative decoding without a draft model).** Code repeats itself: the tokens after
  the last occurrence of the current 1–3-token tail in the context are a likely continuation. They are
  fed with the new token in one forward pass, which yields the model's own next-token logits at every
  drafted position; the draft is kept up to its first token that is not the argmax there. On a
  memory-bound CPU a pass over a few tokens costs little more than one (the weights are read once), and
  the output is the one greedy decoding writes. The draft length adapts to how much of the last drafts
  was accepted.
* **A KV cache per key** (the editor's document), with the argmax and the logits of the positions it
  computed. The next prompt usually shares all but its last token or two with what was fed (the user
  typed a character), so only those are computed; a tail already fed beyond the prompt (what the last
  request generated, e.g. the rest of a block the user just accepted) is taken without a forward pass as
  long as it is what greedy decoding writes now.
* **Token healing.** The prompt's last token is often cut by the cursor ("\\n" before an indented line,
  " " before a word): the caller leaves it out and passes its text as `heal`; decoding is then constrained
  until it has spelled `heal` again (each token must start with what is left of it, or be a prefix of it).
* **Cooperative cancellation** between forward passes (`GenerationCancelled`) and a deadline after which
  the caller gets what is ready.

A `Decoder` belongs to one model and is used from one thread at a time.
"""

from __future__ import annotations

import bisect
import inspect
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .model import LoadedModel

PREFILL_CHUNK = 128
KV_KEYS = 4          # documents whose KV cache is kept
KEPT_LOGITS = 32     # full next-token logits kept for the last positions of a cache (healing needs them)
KEPT_ARGMAX = 2048   # next-token argmax kept per cache (a fed tail is re-used through them)
MAX_NGRAM = 3        # the longest context tail looked up for a draft
# Drafted tokens per forward pass, at most. On a 2-core CPU a pass over 2 or 3 tokens costs 1.13x / 1.18x
# one token, over 4 already 1.66x (the matrix kernels change), so longer drafts lose more than they win.
MAX_DRAFT = 2
_MAX_CHAR = "\U0010ffff"


class GenerationCancelled(Exception):
    pass


@dataclass
class Decoded:
    ids: list[int]          # the new tokens, healing ones included
    ended: bool             # stopped by `stop` or an end-of-sequence token, not by the budget or deadline
    truncated: bool         # stopped by the deadline
    prompt_tokens: int
    reused_tokens: int      # prompt tokens whose keys and values came from the cache
    forward_passes: int
    drafted: int            # tokens proposed by prompt lookup
    accepted: int           # ... of them, the ones greedy decoding wrote
    seconds: float


class Vocabulary:
    """Token texts, for the healing constraint: which tokens spell the start of a string, or a prefix of it."""

    def __init__(self, tokenizer, size: int, special: set[int]):
        n = min(size, len(tokenizer))
        texts = tokenizer.batch_decode([[i] for i in range(n)]) + [""] * (size - n)
        self.texts = texts
        usable = sorted((t, i) for i, t in enumerate(texts) if t and i not in special)
        self._sorted = [t for t, _ in usable]
        self._ids = [i for _, i in usable]
        self._exact: dict[str, list[int]] = {}
        for t, i in usable:
            self._exact.setdefault(t, []).append(i)
        self._allowed: OrderedDict[str, torch.Tensor] = OrderedDict()

    def allowed(self, rest: str) -> torch.Tensor:
        """Ids of the tokens that start with `rest` or are a (non-empty) prefix of it."""
        hit = self._allowed.get(rest)
        if hit is None:
            lo = bisect.bisect_left(self._sorted, rest)
            hi = bisect.bisect_left(self._sorted, rest + _MAX_CHAR)
            ids = self._ids[lo:hi]
            for k in range(1, len(rest)):
                ids = ids + self._exact.get(rest[:k], [])
            hit = torch.tensor(sorted(set(ids)), dtype=torch.long)
            self._allowed[rest] = hit
            while len(self._allowed) > 512:
                self._allowed.popitem(last=False)
        self._allowed.move_to_end(rest)
        return hit


class _KV:
    """A KV cache and what is known at its positions: p -> the next token after fed[: p + 1]."""

    def __init__(self):
        self.cache = DynamicCache()
        self.fed: list[int] = []
        self.argmax: dict[int, int] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def crop(self, length: int) -> None:
        if length == 0:
            self.__init__()
        elif length < len(self.fed):
            self.cache.crop(length - len(self.fed))
            del self.fed[length:]
            self.argmax = {p: t for p, t in self.argmax.items() if p < length}
            self.logits = {p: v for p, v in self.logits.items() if p < length}

    def record(self, first: int, logits: torch.Tensor) -> None:
        """Next-token logits for positions first .. first + len(logits) - 1."""
        for i, row in enumerate(logits):
            self.argmax[first + i] = int(row.argmax())
            self.logits[first + i] = row
        last = first + len(logits) - 1
        if len(self.logits) > 2 * KEPT_LOGITS:
            self.logits = {p: v for p, v in self.logits.items() if p > last - KEPT_LOGITS}
        if len(self.argmax) > 2 * KEPT_ARGMAX:
            self.argmax = {p: t for p, t in self.argmax.items() if p > last - KEPT_ARGMAX}


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def lookup_draft(seq: Sequence[int], length: int, max_ngram: int = MAX_NGRAM) -> list[int]:
    """The tokens that followed the latest earlier occurrence of the longest tail of `seq` (≤ max_ngram)."""
    for n in range(min(max_ngram, len(seq) - 1), 0, -1):
        tail = list(seq[-n:])
        for start in range(len(seq) - n - 1, -1, -1):
            if seq[start] == tail[0] and list(seq[start : start + n]) == tail:
                return list(seq[start + n : start + n + length])
    return []


class Decoder:
    def __init__(self, lm: LoadedModel):
        self.lm = lm
        tok = lm.tokenizer
        stop = set(tok.all_special_ids)
        eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
        stop.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        self.stop_ids = stop
        self._keeps_logits = "logits_to_keep" in inspect.signature(lm.model.forward).parameters
        self._vocab: Vocabulary | None = None
        self._newline: set[int] | None = None
        self._kv: OrderedDict[str, _KV] = OrderedDict()
        self._draft_len = MAX_DRAFT
        self._lock = threading.Lock()   # defensive: callers use one thread

    @property
    def vocab(self) -> Vocabulary:
        if self._vocab is None:   # built on first use: healing needs it, a plain decode does not
            size = self.lm.model.get_output_embeddings().weight.shape[0]
            self._vocab = Vocabulary(self.lm.tokenizer, size, self.stop_ids)
        return self._vocab

    def ends_line(self, token: int) -> bool:
        if self._newline is None:
            self._newline = {i for i, t in enumerate(self.vocab.texts) if "\n" in t}
        return token in self._newline

    def reset(self) -> None:
        """Forget every KV cache (the weights changed)."""
        self._kv.clear()

    def _state(self, key: str | None) -> _KV:
        if key is None:
            return _KV()
        kv = self._kv.pop(key, None) or _KV()
        self._kv[key] = kv
        while len(self._kv) > KV_KEYS:
            self._kv.popitem(last=False)
        return kv

    def _forward(self, kv: _KV, ids: list[int], keep: int) -> None:
        """Feed `ids`; record the next-token logits of their last `keep` positions."""
        kw = {"logits_to_keep": keep} if self._keeps_logits else {}
        out = self.lm.model(input_ids=torch.tensor([ids]), past_key_values=kv.cache, use_cache=True, **kw)
        kv.cache = out.past_key_values
        kv.fed.extend(ids)
        kv.record(len(kv.fed) - keep, out.logits[0, -keep:].float())

    @torch.inference_mode()
    def run(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        stop: Callable[[list[int]], bool] | None = None,
        heal: str = "",
        one_line: bool = False,
        cancel: threading.Event | None = None,
        deadline: float | None = None,
        ready: Callable[[list[int]], bool] | None = None,
        key: str | None = None,
        speculate: bool = True,
    ) -> Decoded:
        """Greedy tokens after `prompt_ids`, at most `max_new_tokens` once `heal` is spelled.

        `stop(new_ids)` is asked after every token once healing is done: True ends the decode (`ended`).
        `one_line`: drafts end at their first token with a line break (the caller stops there anyway).
        `deadline` (a time.perf_counter() value): once passed, the decode returns as soon as
        `ready(new_ids)` says what it has is worth showing (`truncated`). `key`: keep the KV cache under
        this name for the next call (None: a fresh cache, dropped after). `speculate`: draft by prompt lookup
        (the output is the same without; only slower)."""
        started = time.perf_counter()
        ids = list(prompt_ids)
        if not ids:
            return Decoded([], True, False, 0, 0, 0, 0, 0, 0.0)
        with self._lock:
            kv = self._state(key)
            try:
                return self._decode(kv, ids, max_new_tokens, stop, heal, one_line if speculate else None, cancel,
                                    deadline, ready, started)
            except GenerationCancelled:
                raise   # checked between forward passes: the cache is consistent, keep it for the next call
            except BaseException:
                if key is not None:
                    self._kv.pop(key, None)   # the cache may be half-extended: drop it
                raise

    def _decode(self, kv, ids, max_new_tokens, stop, heal, drafts, cancel, deadline, ready, started) -> Decoded:
        """`drafts`: None for no drafting, else whether drafts end at their first line break."""
        def check():
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled()

        passes = drafted = accepted = 0
        last = len(ids) - 1
        common = _common_prefix(kv.fed, ids)
        if common >= len(ids) and last in kv.argmax:
            reused = len(ids)   # typical while the user types: the last call fed these very tokens
        else:
            reused = min(common, last)
            kv.crop(reused)
            for i in range(reused, len(ids), PREFILL_CHUNK):
                check()
                self._forward(kv, ids[i : i + PREFILL_CHUNK], keep=1)
                passes += 1

        seq, new = list(ids), []
        rest = heal           # what the next tokens must still spell
        ended = truncated = False
        limit = max_new_tokens + len(heal)   # healing tokens do not count against the budget
        while True:
            position = len(seq) - 1
            if rest:
                token, refed = self._healing_choice(kv, seq, position, rest)
                passes += refed
                spelled = self.vocab.texts[token]
                rest = rest[len(spelled):] if rest.startswith(spelled) else ""
            else:
                token = kv.argmax[position]
                if token in self.stop_ids:
                    ended = True
                    break
            seq.append(token)
            new.append(token)
            if not rest and stop is not None and stop(new):
                ended = True
                break
            if len(new) >= limit:
                break
            if deadline is not None and not rest and time.perf_counter() >= deadline and (ready is None or ready(new)):
                truncated = True
                break
            nxt = position + 1
            if len(kv.fed) > nxt and kv.fed[nxt] == token and nxt in kv.argmax:
                continue   # already fed (a draft, or the last call's tail) and its next token is known
            check()
            kv.crop(nxt)
            draft = self._draft(seq, drafts) if drafts is not None and not rest else []
            self._forward(kv, [token] + draft, keep=1 + len(draft))
            passes += 1
            if draft:
                hits = _common_prefix([kv.argmax[nxt + i] for i in range(len(draft))], draft)
                drafted += len(draft)
                accepted += hits
                self._adapt(hits, len(draft))
        return Decoded(new, ended, truncated, len(ids), reused, passes, drafted, accepted,
                       time.perf_counter() - started)

    def _healing_choice(self, kv: _KV, seq: list[int], position: int, rest: str) -> tuple[int, int]:
        """The argmax over the tokens allowed while `rest` is still to be spelled, and the forward passes it
        took. The plain argmax, when allowed, is also the constrained one: no logits needed (a fed tail
        keeps only its argmax beyond the last KEPT_LOGITS positions)."""
        allowed = self.vocab.allowed(rest)
        best = kv.argmax[position]
        i = int(torch.searchsorted(allowed, best))
        if i < len(allowed) and int(allowed[i]) == best:
            return best, 0
        refed = 0
        if position not in kv.logits:   # feed that position's token again for its logits
            kv.crop(position)
            self._forward(kv, [seq[position]], keep=1)
            refed = 1
        return int(allowed[kv.logits[position][allowed].argmax()]), refed

    def _draft(self, seq: list[int], one_line: bool) -> list[int]:
        draft = lookup_draft(seq, self._draft_len)
        if one_line:
            for i, t in enumerate(draft):
                if self.ends_line(t):
                    return draft[: i + 1]
        return draft

    def _adapt(self, hits: int, length: int) -> None:
        """Longer drafts while they are accepted, shorter while they are not."""
        if hits == length:
            self._draft_len = min(MAX_DRAFT, self._draft_len + 1)
        elif hits == 0:
            self._draft_len = max(1, self._draft_len // 2)
