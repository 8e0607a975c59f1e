"""The repair driver, the same for every method: check the input, snapshot the weights, run the method,
verify that greedy decoding now writes every fix and that unrelated code did not move (the locality
guard: over budget, retry with a tightened method), and keep the patch or restore the weights exactly."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TypeVar

from .adapters.format import AdapterError
from .capture import encode_case, teacher_forced_argmax, token_exact_match
from .case import EncodedCase, RepairCase, RepairInputError
from .generate import writes_fix
from .guard import GuardConfig
from .locality import Locality, behaviour_now, compare, guard_windows
from .methods import get_method
from .model import LoadedModel
from .patch import Patch, SavedColumns, WeightSnapshot, restore_columns
from .session import Progress, RepairCancelled, RepairSession

T = TypeVar("T")


@dataclass
class TokenReport:
    position: int
    target: str
    before: str
    after: str


@dataclass
class CaseReport:
    prompt: str
    fix: str
    before: str          # what greedy decoding wrote before the repair
    after: str           # ... and after it
    fixed: bool
    em_before: float     # token ExactMatch, teacher-forced
    em_after: float
    tokens: list[TokenReport] = field(default_factory=list)


@dataclass
class RepairResult:
    fixed: bool
    reason: str
    method: str
    config: dict
    seconds: float
    cases: list[CaseReport]
    patch: Patch | None = None            # the column deltas, when fixed
    saved: SavedColumns | None = None     # the columns as they were: undo(lm, result) restores them
    method_seconds: float | None = None   # of `seconds`, the method's own work (not the driver's checks)
    locality: Locality | None = None      # the guard's measure of the kept patch (None: guard off)
    attempts: int = 1                     # method runs, the guard's tightened retries included

    @property
    def layers(self) -> list[int]:
        return self.patch.layer_ids if self.patch else []

    @property
    def neurons(self) -> int:
        return self.patch.n_neurons if self.patch else 0

    @property
    def before(self) -> str:
        return self.cases[0].before

    @property
    def after(self) -> str:
        return self.cases[0].after

    def to_json(self) -> dict:
        return {
            "fixed": self.fixed,
            "reason": self.reason,
            "method": self.method,
            "config": self.config,
            "seconds": round(self.seconds, 3),
            "method_seconds": None if self.method_seconds is None else round(self.method_seconds, 3),
            "layers": self.layers,
            "neurons": self.neurons,
            "locality_unchanged": None if self.locality is None else round(self.locality.unchanged, 5),
            "attempts": self.attempts,
            "before": self.before,
            "after": self.after,
            "cases": [asdict(c) for c in self.cases],
        }


def _shown(text: str, enc: EncodedCase) -> str:
    """The completion as an editor would show it: up to the end of the fix's last line."""
    n_lines = enc.target_text.count("\n")
    return "\n".join(text.split("\n")[:n_lines])


def _encode_checked(lm: LoadedModel, cases: list[RepairCase]) -> tuple[list[EncodedCase], list[str]]:
    """The encoded cases and what greedy decoding writes for each now (decoded once, reused as 'before')."""
    if not cases:
        raise RepairInputError("no repair case given")
    encoded = [encode_case(lm, c) for c in cases]
    texts = []
    for i, enc in enumerate(encoded):
        ok, text = writes_fix(lm, enc)
        if ok:
            where = f"case {i + 1}: " if len(cases) > 1 else ""
            raise RepairInputError(f"{where}the model already writes this fix: nothing to repair")
        texts.append(text)
    return encoded, texts


def repair(
    lm: LoadedModel,
    cases: list[RepairCase],
    method: str = "star",
    overrides: dict | None = None,
    *,
    protect: list[RepairCase] | None = None,
    guard: GuardConfig | None = GuardConfig(),
    cancel: threading.Event | None = None,
    progress: Progress | None = None,
) -> RepairResult:
    """Repair the model in place so that it writes every case's fix. On failure the weights are restored
    bit for bit and the result says why; on success result.patch holds the exact column deltas.

    `protect`: earlier fixes (e.g. the patch stack's cases) the method should leave as they are.
    `guard`: the locality budget on unrelated code; None turns the guard off."""
    repairer = get_method(method, overrides)
    started = time.perf_counter()
    encoded, texts = _encode_checked(lm, cases)
    kept = _encode_protected(lm, protect or [])
    before = [(text, teacher_forced_argmax(lm, e)) for e, text in zip(encoded, texts)]
    held = guard_windows(lm, guard) if guard else []
    held_before = behaviour_now(lm, held) if guard else None
    snapshot = WeightSnapshot(lm.arch)
    attempts, method_seconds, locality, over_budget = 0, 0.0, None, None
    while True:
        attempts += 1
        session = RepairSession(lm, encoded, protect=kept, cancel=cancel, progress=progress)
        method_started = time.perf_counter()
        try:
            repairer.repair(session)
            patch = snapshot.settle()
        except BaseException:
            snapshot.restore()
            raise
        method_seconds += time.perf_counter() - method_started
        after = [(writes_fix(lm, e), teacher_forced_argmax(lm, e)) for e in encoded]
        reports = [_case_report(lm, e, b, a) for e, b, a in zip(encoded, before, after)]
        fixed = all(r.fixed for r in reports)
        over_budget = None
        if fixed and guard:
            locality = compare(held_before, behaviour_now(lm, held))
            if locality.moved > guard.budget:
                over_budget = locality
        if over_budget is None:
            break
        snapshot.restore()
        tighter = _retry_with(repairer, guard, attempts, time.perf_counter() - started)
        if tighter is None:
            fixed = False
            break
        repairer = tighter
    patch = patch if fixed else None
    saved = snapshot.saved_columns(patch) if fixed else None
    if not fixed:
        snapshot.restore()
    reason = _reason(reports, session.failures_seen)
    if over_budget is not None:
        reason = (f"every fix found moves {over_budget.moved:.2%} of unrelated next-token predictions, over the "
                  f"locality budget of {guard.budget:.2%}; weights restored")
    return RepairResult(
        fixed=fixed,
        reason=reason,
        method=repairer.name,
        config=asdict(repairer.config),
        seconds=time.perf_counter() - started,
        cases=reports,
        patch=patch,
        saved=saved,
        method_seconds=method_seconds,
        locality=locality if fixed else None,
        attempts=attempts,
    )


def _retry_with(repairer, guard: GuardConfig, attempts: int, elapsed: float):
    if attempts > guard.retries or elapsed > guard.seconds:
        return None
    return repairer.tightened()


def _encode_protected(lm: LoadedModel, cases: list[RepairCase]) -> list[EncodedCase]:
    """The earlier fixes to protect, encoded; one that no longer fits the model is simply not protected."""
    out = []
    for c in cases:
        try:
            out.append(encode_case(lm, c))
        except RepairInputError:
            continue
    return out


def _case_report(lm: LoadedModel, enc: EncodedCase, before, after) -> CaseReport:
    (text_before, argmax_before), ((ok, text_after), argmax_after) = before, after
    decode = lambda t: lm.tokenizer.decode([t])
    tokens = [
        TokenReport(i, decode(t), decode(b), decode(a))
        for i, (t, b, a) in enumerate(zip(enc.target_ids, argmax_before, argmax_after))
    ]
    return CaseReport(
        prompt=enc.case.prompt,
        fix=enc.case.fix,
        before=_shown(text_before, enc),
        after=_shown(text_after, enc),
        fixed=ok,
        em_before=token_exact_match(argmax_before, enc.target_ids),
        em_after=token_exact_match(argmax_after, enc.target_ids),
        tokens=tokens,
    )


def _reason(reports: list[CaseReport], failures_seen: int) -> str:
    broken = [i for i, r in enumerate(reports) if not r.fixed]
    if not broken:
        return f"fixed {failures_seen} failing token(s)"
    r = reports[broken[0]]
    where = f"case {broken[0] + 1}: " if len(reports) > 1 else ""
    return f"{where}after the repair the model still writes {r.after!r} instead of {r.fix!r}; weights restored"


def undo(lm: LoadedModel, result: RepairResult) -> None:
    """Exactly undo a kept repair (restores the original columns)."""
    if result.saved is not None:
        restore_columns(lm.arch, result.saved)


def keep_or_undo(lm: LoadedModel, result: RepairResult, keep: Callable[[RepairResult], T], *,
                 cancel: threading.Event | None = None) -> tuple[RepairResult, T | None]:
    """The one policy for a fixed repair, the server's and `star repair --save`'s: `keep` persists it (the
    patch stack's add, save_adapter) and is its commit point. A cancel set before it raises RepairCancelled;
    a refusal (an AdapterError: it breaks an earlier fix, the directory exists) gives back the result as not
    fixed, with the refusal as its reason; in both cases, and on any other error, the weights are restored
    exactly. Returns the result and what `keep` returned (None when nothing was kept)."""
    if not result.fixed:
        return result, None
    if cancel is not None and cancel.is_set():
        undo(lm, result)
        raise RepairCancelled("cancelled before the patch was saved")
    try:
        return result, keep(result)
    except AdapterError as e:
        undo(lm, result)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return replace(result, fixed=False, reason=f"the patch was not kept: {first}", patch=None, saved=None), None
    except BaseException:
        undo(lm, result)
        raise


__all__ = ["RepairCancelled", "RepairInputError", "RepairResult", "keep_or_undo", "repair", "undo"]
