"""Greedy completion for the editor: token healing, a reused KV cache and cooperative cancellation.

The same decoding as `star_engine.generate.complete` (greedy, no special tokens added, the engine's
`cut_completion` stop rules), plus what an editor needs:

* Token healing. A prompt cut at the cursor often ends in the middle of what the tokenizer would have
  made one token: "\\n" before an indented line ("\\n    " is one token), " " before a word (" sorted"),
  "os.wa" before "walk". Left as is, the model sees an unnatural last token and writes a blank line, a
  double space or a different word. So the prompt's last token is left out (`build_prompt` does that and
  records its text as `heal`) and decoding is constrained until it has spelled `heal` again: each token
  must either start with what is left of `heal` or be a prefix of it. `heal` is then stripped from the
  result. A repair uses the same prompt with `heal + fix` as its target, so the repaired model writes the
  fix through this same constrained path.
* The KV cache of the previous prompt in the same document is kept; the next prompt usually shares all
  but its last token or two with it (the user typed a character), so only those are computed.
* Cancellation is checked between prefill chunks and between tokens (`GenerationCancelled`).
* Only the last position's logits are computed (`logits_to_keep=1`) where the model supports it.

One `Generator` per serving model, used from one worker thread at a time.
"""

from __future__ import annotations

import bisect
import inspect
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from star_engine.capture import encode
from star_engine.generate import GenerationCancelled, cut_completion
from star_engine.model import LoadedModel

PREFILL_CHUNK = 128
KV_DOCUMENTS = 4     # documents whose KV cache is kept
KEPT_LOGITS = 32     # next-token logits kept for the last positions of each cache
_MAX_CHAR = "\U0010ffff"


@dataclass
class Generated:
    text: str                # cut at the editor's natural end, `heal` removed
    ended: bool              # a natural end (stop rule or end-of-sequence), not the token limit
    prompt_tokens: int
    reused_tokens: int       # prompt tokens served from the KV cache
    new_tokens: int
    seconds: float
    truncated: bool = False  # stopped by the latency deadline (single-line only): a partial line


class _KV:
    def __init__(self):
        self.cache = DynamicCache()
        self.fed: list[int] = []     # the tokens whose keys/values are in `cache`
        self.logits: dict[int, torch.Tensor] = {}   # position p -> next-token logits after fed[: p + 1]

    def crop(self, length: int) -> None:
        if length == 0:
            self.cache, self.fed, self.logits = DynamicCache(), [], {}
        elif length < len(self.fed):
            self.cache.crop(length - len(self.fed))
            del self.fed[length:]
            self.logits = {p: v for p, v in self.logits.items() if p < length}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Vocabulary:
    """Token texts, for the healing constraint: which tokens spell the start of a string, or a prefix of it."""

    def __init__(self, tokenizer, size: int, special: set[int]):
        n = min(size, len(tokenizer))
        texts = tokenizer.batch_decode([[i] for i in range(n)]) + [""] * (size - n)
        self.texts = texts
        usable = [(t, i) for i, t in enumerate(texts) if t and i not in special]
        usable.sort()
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


class Generator:
    def __init__(self, lm: LoadedModel):
        self.lm = lm
        tok = lm.tokenizer
        stop = set(tok.all_special_ids)
        eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
        stop.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        self.stop_ids = stop
        params = inspect.signature(lm.model.forward).parameters
        self._logits_kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        size = lm.model.get_output_embeddings().weight.shape[0]
        self.vocab = Vocabulary(tok, size, stop)
        self._kv: OrderedDict[str, _KV] = OrderedDict()
        self._lock = threading.Lock()   # defensive: the server calls from one worker thread

    def reset(self) -> None:
        """Forget every KV cache (the weights changed)."""
        self._kv.clear()

    def _state(self, key: str) -> _KV:
        kv = self._kv.pop(key, None) or _KV()
        self._kv[key] = kv
        while len(self._kv) > KV_DOCUMENTS:
            self._kv.popitem(last=False)
        return kv

    def _forward(self, kv: _KV, ids: list[int]):
        out = self.lm.model(
            input_ids=torch.tensor([ids]), past_key_values=kv.cache, use_cache=True, **self._logits_kw
        )
        kv.cache = out.past_key_values
        kv.fed.extend(ids)
        logits = out.logits[0, -1]
        last = len(kv.fed) - 1
        kv.logits[last] = logits
        if len(kv.logits) > 2 * KEPT_LOGITS:
            kv.logits = {p: v for p, v in kv.logits.items() if p > last - KEPT_LOGITS}
        return logits

    @torch.inference_mode()
    def run(
        self,
        prompt: str,
        *,
        max_new_tokens: int,
        multiline: bool = False,
        base_indent: int = 0,
        heal: str = "",
        cancel: threading.Event | None = None,
        deadline: float | None = None,
        key: str = "",
    ) -> Generated:
        """`deadline` (a time.perf_counter() value): a single-line generation stops there once it has
        something to show, and returns that partial line (`truncated`)."""
        started = time.perf_counter()
        with self._lock:
            ids = encode(self.lm, prompt)
            if not ids:
                return Generated("", True, 0, 0, 0, 0.0)
            kv = self._state(key)
            common = _common_prefix(kv.fed, ids)
            # The whole prompt is in the cache and its next-token logits are known (typical while the user
            # types: the previous request fed these very tokens): no forward pass is needed to start.
            keep = len(ids) if common >= len(ids) and len(ids) - 1 in kv.logits else min(common, len(ids) - 1)
            kv.crop(keep)
            try:
                return self._decode(kv, ids, keep, max_new_tokens, multiline, base_indent, heal, cancel,
                                    None if multiline else deadline, started)
            except GenerationCancelled:
                raise   # checked between forward passes: the cache is consistent, keep it for the next request
            except BaseException:
                self._kv.pop(key, None)   # the cache may be half-extended: drop it
                raise

    def _decode(self, kv, ids, reused, max_new_tokens, multiline, base_indent, heal, cancel, deadline,
                started) -> Generated:
        def check():
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled()

        pending = ids[reused:]
        logits = kv.logits.get(len(ids) - 1) if not pending else None
        for i in range(0, len(pending), PREFILL_CHUNK):
            check()
            logits = self._forward(kv, pending[i : i + PREFILL_CHUNK])
        new: list[int] = []
        rest = heal          # what the next tokens must still spell
        ended = truncated = False
        text = ""
        limit = max_new_tokens + len(heal)   # healing tokens do not count against the limit
        while True:
            if rest:
                allowed = self.vocab.allowed(rest)
                token = int(allowed[logits[allowed].argmax()])
                spelled = self.vocab.texts[token]
                rest = rest[len(spelled):] if rest.startswith(spelled) else ""
            else:
                token = int(logits.argmax())
                if token in self.stop_ids:
                    ended = True
                    break
            new.append(token)
            if not rest:
                text = self.lm.tokenizer.decode(new, skip_special_tokens=True)
                text = text[len(heal):] if text.startswith(heal) else text
                if cut_completion(text, multiline, base_indent)[1]:
                    ended = True
                    break
            if len(new) >= limit:
                break
            if deadline is not None and not rest and text.strip() and time.perf_counter() >= deadline:
                truncated = True
                break
            check()
            logits = self._forward(kv, [token])
        # the last line was never checked by the stop rule: check it as a complete line
        text = cut_completion(text + "\n", multiline, base_indent)[0]
        text = text[:-1] if text.endswith("\n") else text
        if not ended and multiline and "\n" in text:
            text = text.rsplit("\n", 1)[0]   # the token limit cut the last line: don't show half a line
        return Generated(text, ended, len(ids), reused, len(new), time.perf_counter() - started, truncated)
