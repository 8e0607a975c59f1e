"""Locality: how much of the model's behaviour on unrelated code a patch moved.

    unchanged  = share of corpus positions whose teacher-forced next-token argmax is the same as before
    mean_dnll  = mean |NLL_after - NLL_before| of the corpus's own next tokens, in nats per token

The repair's guard measures it on a small sample of the "stat" corpus half (what the solve protects); the
benchmark measures it on the "held" half, which no part of the repair ever sees.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .corpus import CorpusSpec, corpus_windows
from .guard import GuardConfig
from .model import LoadedModel


@dataclass(frozen=True)
class Behaviour:
    """The model's next-token argmax and NLL at every position of some windows."""

    argmax: torch.Tensor   # (positions,)
    nll: torch.Tensor      # (positions,)


# Logits held at once by `behaviour` (float32 elements, 256 MB): 4 windows of 256 positions on a 49k
# vocabulary, one on Qwen2.5-Coder's 152k (whose 4-window batch made a repair's peak RSS ~1.3 GB higher).
LOGITS_BUDGET = 64 << 20


def logits_batch(lm: LoadedModel, window: int) -> int:
    """Windows per forward pass whose logits stay within LOGITS_BUDGET floats (1 to 4)."""
    return max(1, min(4, LOGITS_BUDGET // max(1, window * lm.model.config.get_text_config().vocab_size)))


@torch.no_grad()
def behaviour(lm: LoadedModel, windows: list[tuple[int, ...]], batch: int | None = None) -> Behaviour:
    batch = batch or logits_batch(lm, max(map(len, windows), default=1))
    argmax, nll = [], []
    for b in range(0, len(windows), batch):
        ids = torch.tensor(windows[b : b + batch])
        logits = lm.model(input_ids=ids).logits[:, :-1].float()
        argmax.append(logits.argmax(-1).flatten())
        nll.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none"))
    if not argmax:
        return Behaviour(torch.zeros(0, dtype=torch.long), torch.zeros(0))
    return Behaviour(torch.cat(argmax), torch.cat(nll))


_REMEMBERED = 4   # weight states whose behaviour `behaviour_now` keeps (a few KB each)


def behaviour_now(lm: LoadedModel, windows: list[tuple[int, ...]]) -> Behaviour:
    """`behaviour` on the weights as they are, remembered per exact state of the output projections (the only
    weights a patch changes; their digest takes a fraction of a second, a pass over the guard's windows
    several): the repair after a kept fix starts from the state whose behaviour the last guard measured."""
    digest = hashlib.sha256(repr(hash(tuple(windows))).encode())
    for l in range(lm.arch.n_layers):
        digest.update(lm.arch.weight(l).detach().contiguous().view(torch.uint8).numpy())
    remembered = lm.cache.setdefault("behaviour_now", OrderedDict())
    key = digest.hexdigest()
    if key not in remembered:
        remembered[key] = behaviour(lm, windows)
        while len(remembered) > _REMEMBERED:
            remembered.popitem(last=False)
    remembered.move_to_end(key)
    return remembered[key]


@dataclass(frozen=True)
class Locality:
    unchanged: float
    mean_dnll: float

    @property
    def moved(self) -> float:
        return 1.0 - self.unchanged


def compare(before: Behaviour, after: Behaviour) -> Locality:
    if not len(before.argmax):
        return Locality(1.0, 0.0)
    return Locality(float((before.argmax == after.argmax).float().mean()), float((after.nll - before.nll).abs().mean()))


HELD_CORPUS = CorpusSpec(split="held", n_tokens=5120)   # 20 windows of 256: the benchmark's unrelated code


def windows(lm: LoadedModel, spec: CorpusSpec) -> list[tuple[int, ...]]:
    """The corpus windows of `spec`, tokenised once per model."""
    key = ("corpus_windows", spec)
    if key not in lm.cache:
        lm.cache[key] = corpus_windows(lm, spec)
    return lm.cache[key]


def guard_windows(lm: LoadedModel, guard: GuardConfig) -> list[tuple[int, ...]]:
    return windows(lm, CorpusSpec(split="stat", n_tokens=guard.tokens))


def held_windows(lm: LoadedModel) -> list[tuple[int, ...]]:
    return windows(lm, HELD_CORPUS)
