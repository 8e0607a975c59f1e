"""What every repair method works on: the model, the encoded cases, and the shared walk over failures.

A session re-predicts each failing position on the current weights when it reaches it, lets the method
fix it, and walks the cases again (up to `max_passes`) in case a later edit broke an earlier position.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch

from .capture import teacher_forced_argmax
from .case import EncodedCase, FailurePoint
from .model import LoadedModel

Progress = Callable[[str, float | None], None]


class RepairCancelled(Exception):
    pass


class RepairSession:
    def __init__(
        self,
        lm: LoadedModel,
        cases: list[EncodedCase],
        *,
        max_passes: int = 3,
        protect: list[EncodedCase] | None = None,
        cancel: threading.Event | None = None,
        progress: Progress | None = None,
    ):
        self.lm, self.arch, self.cases = lm, lm.arch, cases
        self.protect = list(protect or [])     # earlier fixes a method should leave as they are
        self.max_passes = max_passes
        self.cancel = cancel
        self._progress = progress
        self.failures_seen = 0

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise RepairCancelled()

    def report(self, message: str, fraction: float | None = None) -> None:
        if self._progress:
            self._progress(message, fraction)

    def failing_points(self) -> Iterator[FailurePoint]:
        """Each failing position in turn, re-predicted on the weights as they are when it is reached."""
        for _ in range(self.max_passes):
            clean = True
            for ci, enc in enumerate(self.cases):
                start = 0
                while True:
                    self.check_cancel()
                    predicted = teacher_forced_argmax(self.lm, enc)
                    wrong = [i for i in range(start, len(enc.target_ids)) if predicted[i] != enc.target_ids[i]]
                    if not wrong:
                        break
                    i, clean = wrong[0], False
                    self.failures_seen += 1
                    self.report(f"case {ci + 1}/{len(self.cases)}: token {i + 1}/{len(enc.target_ids)}", None)
                    yield FailurePoint(ci, i, enc.context(i), enc.target_ids[i], predicted[i])
                    start = i + 1
            if clean:
                return

    @contextmanager
    def trainable(self, layers: Iterable[int]) -> Iterator[list[torch.nn.Parameter]]:
        """Gradients on the output-projection weights of `layers` only, for the duration."""
        params = [self.arch.weight(l) for l in layers]
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        try:
            with torch.enable_grad():
                yield params
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
