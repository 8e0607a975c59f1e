"""Greedy completion with editor stop rules and cooperative cancellation.

Single-line mode ends the completion at the end of the line; multi-line mode ends it at a blank line or
at a line indented less than the block it started. Both stop at the model's end-of-sequence token.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .capture import encode
from .case import EncodedCase
from .model import LoadedModel
from .text import indent_width

# Greedy decoding may spell a fix with another (longer) tokenisation than the fix's own; and what it writes
# instead is shown as a whole wrong line, within an editor-sized budget.
DECODE_SLACK = 4
SHOWN_TOKENS = 48


class GenerationCancelled(Exception):
    pass


def cut_completion(text: str, multiline: bool, base_indent: int = 0) -> tuple[str, bool]:
    """Cut generated text at the editor's natural end. Returns (completion, ended)."""
    if not multiline:
        head, sep, _ = text.partition("\n")
        return head, bool(sep)
    lines = text.split("\n")
    for i, line in enumerate(lines[1:-1] if len(lines) > 1 else [], start=1):
        if not line.strip() or indent_width(line) < base_indent:
            return "\n".join(lines[:i]), True
    return text, False


class _StopRule(StoppingCriteria):
    def __init__(self, lm: LoadedModel, start: int, multiline: bool, base_indent: int, cancel):
        self.lm, self.start, self.multiline, self.base_indent, self.cancel = lm, start, multiline, base_indent, cancel

    def __call__(self, input_ids, scores, **kwargs):
        if self.cancel is not None and self.cancel.is_set():
            raise GenerationCancelled()
        text = self.lm.tokenizer.decode(input_ids[0, self.start :], skip_special_tokens=True)
        _, ended = cut_completion(text, self.multiline, self.base_indent)
        return torch.full((input_ids.shape[0],), ended, dtype=torch.bool)


@torch.no_grad()
def greedy_ids(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    stopping: StoppingCriteriaList | None = None,
) -> list[int]:
    ids = torch.tensor([list(prompt_ids)])
    out = lm.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=lm.tokenizer.pad_token_id or lm.tokenizer.eos_token_id,
        stopping_criteria=stopping,
    )
    return out[0, ids.shape[1] :].tolist()


def complete(
    lm: LoadedModel,
    prompt: str,
    *,
    max_new_tokens: int = 48,
    multiline: bool = False,
    base_indent: int = 0,
    cancel: threading.Event | None = None,
) -> str:
    """The greedy completion an editor would show after `prompt`."""
    prompt_ids = encode(lm, prompt)
    if not prompt_ids:
        return ""
    rule = _StopRule(lm, len(prompt_ids), multiline, base_indent, cancel)
    new = greedy_ids(lm, prompt_ids, max_new_tokens, StoppingCriteriaList([rule]))
    text = lm.tokenizer.decode(new, skip_special_tokens=True)
    return cut_completion(text, multiline, base_indent)[0]


class _LinesDone(StoppingCriteria):
    def __init__(self, lm: LoadedModel, start: int, n_lines: int):
        self.lm, self.start, self.n_lines = lm, start, n_lines

    def __call__(self, input_ids, scores, **kwargs):
        text = self.lm.tokenizer.decode(input_ids[0, self.start :], skip_special_tokens=True)
        return torch.full((input_ids.shape[0],), text.count("\n") >= self.n_lines, dtype=torch.bool)


def writes_fix(lm: LoadedModel, enc: EncodedCase) -> tuple[bool, str]:
    """Does greedy decoding after the case's prompt write its fix now? Returns (yes, what it wrote: as many
    whole lines as the fix has, or the token budget's worth). The one check of the repair driver, the
    patch stack and the bench."""
    budget = max(len(enc.target_ids) + DECODE_SLACK, SHOWN_TOKENS)
    stop = _LinesDone(lm, len(enc.prompt_ids), enc.target_text.count("\n"))
    new = greedy_ids(lm, enc.prompt_ids, budget, StoppingCriteriaList([stop]))
    text = lm.tokenizer.decode(new, skip_special_tokens=True)
    return text.startswith(enc.target_text), text
