"""Completions with editor stop rules, on the engine's one greedy decoder (`decode.Decoder`).

Single-line mode ends the completion at the end of the line; multi-line mode ends it at a blank line or
at a line indented less than the block it started. Both stop at the model's end-of-sequence token.
`writes_fix` is the one "does the model now write the fix?" check of the repair, the patch stack and the
bench; it decodes exactly as the editor does.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .capture import encode
from .case import EncodedCase
from .decode import Decoded, Decoder, GenerationCancelled
from .model import LoadedModel
from .text import indent_width

__all__ = ["Completion", "GenerationCancelled", "complete", "complete_prompt", "cut_completion", "decoder",
           "first_line_ids", "shown_part", "worth_showing", "writes_fix"]

# Greedy decoding may spell a fix with another (longer) tokenisation than the fix's own; and what it writes
# instead is shown as a whole wrong line, within an editor-sized budget.
DECODE_SLACK = 4
SHOWN_TOKENS = 48


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


def shown_part(text: str, ended: bool, multiline: bool, base_indent: int = 0) -> str:
    """What of the generated `text` an editor shows: cut at its natural end; a multi-line completion that
    did not end (the budget or the deadline stopped it) loses its unfinished last line."""
    text = cut_completion(text + "\n", multiline, base_indent)[0]   # the last line as a complete line
    text = text[:-1] if text.endswith("\n") else text
    if not ended and multiline and "\n" in text:
        text = text.rsplit("\n", 1)[0]
    return text


def worth_showing(text: str) -> bool:
    """A deadline may cut the decode here: there is a non-blank line, whole or the first one so far."""
    return bool((text.rsplit("\n", 1)[0] if "\n" in text else text).strip())


def decoder(lm: LoadedModel) -> Decoder:
    """The model's decoder (its token tables are built once per model)."""
    if "decoder" not in lm.cache:
        lm.cache["decoder"] = Decoder(lm)
    return lm.cache["decoder"]


@dataclass
class Completion:
    text: str            # cut at the editor's natural end, `heal` removed
    ended: bool          # a natural end (stop rule or end-of-sequence), not the token budget
    truncated: bool      # stopped by the deadline: the lines (or the partial first line) ready by then
    decoded: Decoded


def complete_prompt(
    dec: Decoder,
    prompt: str,
    *,
    max_new_tokens: int,
    multiline: bool = False,
    base_indent: int = 0,
    heal: str = "",
    cancel: threading.Event | None = None,
    deadline: float | None = None,
    key: str | None = None,
    speculate: bool = True,
) -> Completion:
    """The completion an editor shows after `prompt` (whose cut last token's text is `heal`).

    `deadline`: past it, return what is ready — the whole lines written so far, or the first line so
    far when none is whole yet — and leave the rest to the next call (its KV cache is kept under `key`)."""
    tokenizer = dec.lm.tokenizer

    def text_of(new: list[int]) -> str:
        text = tokenizer.decode(new, skip_special_tokens=True)
        return text[len(heal):] if text.startswith(heal) else text

    def ends(new: list[int]) -> bool:
        return cut_completion(text_of(new), multiline, base_indent)[1]

    out = dec.run(encode(dec.lm, prompt), max_new_tokens=max_new_tokens, stop=ends, heal=heal,
                  one_line=not multiline, cancel=cancel, deadline=deadline,
                  ready=lambda new: worth_showing(text_of(new)), key=key, speculate=speculate)
    return Completion(shown_part(text_of(out.ids), out.ended, multiline, base_indent), out.ended, out.truncated, out)


def complete(
    lm: LoadedModel,
    prompt: str,
    *,
    max_new_tokens: int = 48,
    multiline: bool = False,
    base_indent: int = 0,
    cancel: threading.Event | None = None,
) -> str:
    """The greedy completion an editor would show after `prompt` (no healing, no kept cache)."""
    return complete_prompt(decoder(lm), prompt, max_new_tokens=max_new_tokens, multiline=multiline,
                           base_indent=base_indent, cancel=cancel).text


def first_line_ids(lm: LoadedModel, prompt_ids, max_new_tokens: int) -> list[int]:
    """Greedy tokens up to and including the one that ends the first line."""
    dec = decoder(lm)
    return dec.run(prompt_ids, max_new_tokens=max_new_tokens, one_line=True,
                   stop=lambda new: dec.ends_line(new[-1])).ids


def writes_fix(lm: LoadedModel, enc: EncodedCase) -> tuple[bool, str]:
    """Does greedy decoding after the case's prompt write its fix now? Returns (yes, what it wrote: as many
    whole lines as the fix has, or the token budget's worth). The one check of the repair driver, the
    patch stack and the bench."""
    budget = max(len(enc.target_ids) + DECODE_SLACK, SHOWN_TOKENS)
    lines = enc.target_text.count("\n")
    tokenizer = lm.tokenizer

    def text_of(new: list[int]) -> str:
        return tokenizer.decode(new, skip_special_tokens=True)

    out = decoder(lm).run(enc.prompt_ids, max_new_tokens=budget,
                          stop=lambda new: text_of(new).count("\n") >= lines)
    text = text_of(out.ids)
    return text.startswith(enc.target_text), text
