"""Failure capture: encode a case with one BOS policy and find where the model goes wrong.

Contexts are built by concatenating token ids (never by re-tokenising strings), and no special tokens
are added anywhere: completion, repair and evaluation all see the same inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .case import EncodedCase, RepairCase, RepairInputError
from .model import LoadedModel


def encode(lm: LoadedModel, text: str) -> list[int]:
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


def target_text(fix: str) -> str:
    return fix if fix.endswith("\n") else fix + "\n"


def encode_case(lm: LoadedModel, case: RepairCase) -> EncodedCase:
    if not case.fix.strip():
        raise RepairInputError("the fix is empty")
    if not case.prompt:
        raise RepairInputError("the prompt is empty: there is nothing before the cursor to repair from")
    text = target_text(case.fix)
    prompt_ids, target_ids = encode(lm, case.prompt), encode(lm, text)
    total = len(prompt_ids) + len(target_ids)
    if total > lm.context_window:
        raise RepairInputError(
            f"prompt and fix take {total} tokens, over the model's context window of {lm.context_window}"
        )
    return EncodedCase(case, tuple(prompt_ids), tuple(target_ids), text)


@torch.no_grad()
def _teacher_forced_logits(lm: LoadedModel, enc: EncodedCase) -> torch.Tensor:
    """(len(target), vocab) logits at every target position, given the reference prefix."""
    logits = lm.model(input_ids=torch.tensor([enc.ids])).logits[0]
    start = len(enc.prompt_ids) - 1
    return logits[start : start + len(enc.target_ids)]


def teacher_forced_argmax(lm: LoadedModel, enc: EncodedCase) -> list[int]:
    """The model's argmax at every target position, given the reference prefix (teacher forcing)."""
    return _teacher_forced_logits(lm, enc).argmax(-1).tolist()


def target_leads(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) at each position the target's logit minus the best other one: above 0 where the target is the argmax."""
    right = logits.gather(1, target[:, None]).squeeze(1)
    others = logits.scatter(1, target[:, None], float("-inf")).max(-1).values
    return right - others


def teacher_forced_leads(lm: LoadedModel, enc: EncodedCase) -> torch.Tensor:
    """`target_leads` at every target position, given the reference prefix."""
    return target_leads(_teacher_forced_logits(lm, enc), torch.tensor(enc.target_ids))


def token_exact_match(predicted: Sequence[int], target: Sequence[int]) -> float:
    """The share of target tokens that are the model's prediction at their position."""
    return sum(p == t for p, t in zip(predicted, target)) / len(target)
