"""From a document and a cursor to the model's prompt, and from the model's text to what the editor shows.

Two steps, so that the event loop never touches the tokenizer:

* `Context.at(source, offset, budget)` (cheap string slicing, on the event loop) keeps a bounded tail of
  the text before the cursor and a bounded head of the text after it. The context alone determines the
  prompt, so it is also the completion cache's key (and typing into a shown completion is
  `context.extended(typed)`).
* `build_prompt(context, tokenizer, ...)` (in the model worker) cuts the prefix to the token budget at a
  line start, decides single- vs multi-line, applies token healing and, for models that have
  fill-in-the-middle tokens, adds the suffix.

Token healing: the prompt's last token is left out and its text recorded as `heal`; the generator
spells it again under a constraint and strips it (see generation.py), so a prompt ending in a space, a
newline before an indented line or half a word completes naturally. A repair uses the same prompt with
`heal + fix` as its target, so the repaired model writes the fix through the same path. With FIM the
prefix is healed the same way and the middle starts by spelling `heal` (FIM training splits documents at
arbitrary characters, so a middle that starts inside a token is what the model has seen).

Two rules keep the KV cache useful on a slower model (Qwen2.5-Coder-0.5B: ~110 prompt tokens/s on
2 cores). The prefix is cut at an *anchor* line (the strongest, by content hash, of the non-blank lines
that keep at least half of the budget), so the start of the prompt stays put for several lines as the
user types down the file instead of moving, and forcing a full prefill, at every new line. With FIM the
suffix (re-fed on every keystroke, since it follows the prefix) is capped at FIM_SUFFIX_TOKENS, or
FIM_LINE_SUFFIX_TOKENS for a single-line completion.

An instruct checkpoint in FIM mode tends to go on past the middle and rewrite the suffix, and in plain
mode to close a markdown fence; `postprocess` cuts both.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

from star_engine.text import indent_width

# Characters of context kept per token of budget: generous, so the token budget is what binds.
CHARS_PER_TOKEN = 8
SUFFIX_SHARE = 4          # with FIM, the suffix gets 1/SUFFIX_SHARE of the budget
BLOCK_OPENERS = (":", "{", "(", "[")
ANCHOR_LEVELS = (32, 8, 2)   # anchor strengths: one line in 32, in 8, in 2 (by content hash)
FIM_SUFFIX_TOKENS = 64    # at most this much suffix (whole lines) in a FIM prompt ...
FIM_LINE_SUFFIX_TOKENS = 32   # ... and for a single-line completion, which needs little more than the next lines
SUFFIX_ECHO_LINES = 8     # suffix lines a completion must not rewrite
ECHO_MIN_CHARS = 8        # ... when they are this long (short ones like `else:` may well be new code)
FENCE = "```"

# (prefix, suffix, middle) special tokens, PSM order; used when all three are single tokens of the model.
FIM_TEMPLATES = [
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),          # Qwen2.5-Coder
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),                # StarCoder, SantaCoder
    ("<\uff5cfim\u2581begin\uff5c>", "<\uff5cfim\u2581hole\uff5c>", "<\uff5cfim\u2581end\uff5c>"),  # DeepSeek-Coder
]


@dataclass(frozen=True)
class Context:
    """The text around the cursor, bounded: everything a completion depends on (with the settings)."""

    prefix: str               # up to `budget * CHARS_PER_TOKEN` characters before the cursor
    prefix_truncated: bool    # the document goes on before `prefix`
    suffix: str               # up to `budget * CHARS_PER_TOKEN // SUFFIX_SHARE` characters after it
    budget: int               # prompt budget in tokens

    @classmethod
    def at(cls, source: str, offset: int, budget: int) -> "Context":
        n_prefix = budget * CHARS_PER_TOKEN
        n_suffix = max(256, n_prefix // SUFFIX_SHARE)
        start = max(0, offset - n_prefix)
        return cls(source[start:offset], start > 0, source[offset : offset + n_suffix], budget)

    def extended(self, typed: str) -> "Context":
        """The context after the user typed `typed` at the cursor (the suffix stays)."""
        text = self.prefix + typed
        n_prefix = self.budget * CHARS_PER_TOKEN
        return replace(self, prefix=text[-n_prefix:], prefix_truncated=self.prefix_truncated or len(text) > n_prefix)

    @property
    def line_before(self) -> str:
        return self.prefix.rsplit("\n", 1)[-1]

    @property
    def line_after(self) -> str:
        return self.suffix.split("\n", 1)[0].rstrip("\r")


@dataclass(frozen=True)
class Prompt:
    text: str                 # what the model reads
    heal: str                 # the text of the prompt's last token, left out (token healing)
    multiline: bool
    base_indent: int          # multi-line: stop at a line indented less than this
    max_new_tokens: int
    line_after: str           # rest of the cursor line
    next_line: str            # the first non-blank line after the cursor line (duplication filter)
    fim: bool = False
    n_tokens: int = 0
    suffix_lines: tuple[str, ...] = ()   # the first non-blank lines after the cursor line, stripped
    fenced: bool = False                 # the prefix has a markdown fence: one in the completion is real

    def repair_fix(self, fix: str) -> str:
        """The repair target for a user's fix at this cursor: what the model must write after `text`."""
        return self.heal + fix


def _last_nonblank(lines: list[str]) -> str | None:
    for line in reversed(lines):
        if line.strip():
            return line
    return None


def decide_mode(prefix: str, line_after: str, multiline: str) -> tuple[bool, int]:
    """(multi-line?, base indent). "auto": multi-line when the cursor opens a block, i.e. it is at the
    end of a line ending with a block opener, or on a blank line right after one. Never with code after
    the cursor on its line. In multi-line mode generation stops at a line indented less than the base."""
    if multiline == "never" or line_after.strip():
        return False, 0
    lines = prefix.split("\n")
    before = lines[-1]
    if before.strip():
        anchor, base = before, indent_width(before) + 1
    else:
        anchor = _last_nonblank(lines[:-1]) or ""
        base = max(len(before), indent_width(anchor) + 1)
    if anchor.rstrip().endswith(BLOCK_OPENERS) and not anchor.lstrip().startswith("#"):
        return True, base
    if multiline == "always":
        return True, indent_width(before) if before.strip() else len(before)
    return False, 0


def fim_tokens(tokenizer) -> tuple[str, str, str] | None:
    """The model's FIM template, if its vocabulary has one (cached on the tokenizer object)."""
    cached = getattr(tokenizer, "_star_fim", False)
    if cached is not False:
        return cached
    vocab = tokenizer.get_vocab()
    found = next((t for t in FIM_TEMPLATES if all(x in vocab for x in t)), None)
    try:
        tokenizer._star_fim = found
    except AttributeError:
        pass
    return found


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _anchor_level(line: str) -> int:
    """How strong an anchor the line is: the largest of ANCHOR_LEVELS dividing its content hash (0: none)."""
    text = line.strip()
    if not text:
        return 0
    value = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=4).digest())
    return next((level for level in ANCHOR_LEVELS if value % level == 0), 0)


def _fit_prefix(tokenizer, prefix: str, truncated: bool, budget: int) -> tuple[str, int]:
    """The longest tail of `prefix` that starts at an anchor line, fits in `budget` tokens and fills at
    least half of it (else the longest tail that starts at any line). Starting at a line start keeps the
    prompt (and the KV cache) stable while the user types on a line; starting at an anchor keeps it stable
    over several new lines."""
    if truncated and "\n" in prefix:
        prefix = prefix.split("\n", 1)[1]
    n = _count(tokenizer, prefix)
    if n <= budget and not truncated:   # the whole document before the cursor: its start never moves
        return prefix, n
    lines = prefix.split("\n")
    pieces = [line + "\n" for line in lines[:-1]] + [lines[-1]]
    counts = [len(ids) for ids in tokenizer(pieces, add_special_tokens=False)["input_ids"]]
    start, total = len(pieces), 0
    while start > 0 and total + counts[start - 1] <= budget:
        start -= 1
        total += counts[start]
    # The candidates: line starts from `start` on that keep at least half of the budget.
    end, kept = start, total
    while end < len(pieces) - 1 and kept - counts[end] >= budget // 2:
        kept -= counts[end]
        end += 1
    levels = [_anchor_level(pieces[i]) for i in range(start, min(end + 1, len(pieces) - 1))]
    best = max(levels, default=0)
    if best:   # the first line of the strongest anchor level present
        start += levels.index(best)
    while start < len(pieces) - 1:
        prefix = "".join(pieces[start:])
        n = _count(tokenizer, prefix)
        if n <= budget:
            return prefix, n
        start += 1
    ids = tokenizer(pieces[-1], add_special_tokens=False)["input_ids"][-budget:]   # one huge line: keep its end
    return tokenizer.decode(ids), len(ids)


def _fit_suffix(tokenizer, suffix: str, budget: int) -> str:
    """The longest head of `suffix` that ends at a line end and fits in `budget` tokens."""
    while suffix and _count(tokenizer, suffix) > budget:
        cut = suffix.rfind("\n", 0, max(0, len(suffix) - 1))
        suffix = suffix[: cut + 1] if cut > 0 else ""
    return suffix


def build_prompt(
    context: Context,
    tokenizer,
    *,
    multiline: str = "auto",
    max_tokens: int = 48,
    max_line_tokens: int = 24,
) -> Prompt:
    line_after = context.line_after
    is_multi, base_indent = decide_mode(context.prefix, line_after, multiline)
    prefix = context.prefix

    after_lines = context.suffix.split("\n")[1:]
    suffix_lines = tuple(l.strip() for l in after_lines if l.strip())[:SUFFIX_ECHO_LINES]
    next_line = next((l for l in after_lines if l.strip()), "")
    fim = fim_tokens(tokenizer) if context.suffix.strip() else None
    budget = context.budget
    suffix = ""
    if fim:
        cap = FIM_SUFFIX_TOKENS if is_multi else FIM_LINE_SUFFIX_TOKENS
        suffix = _fit_suffix(tokenizer, context.suffix, min(budget // SUFFIX_SHARE, cap))
        budget -= _count(tokenizer, suffix) + 3
    prefix, n = _fit_prefix(tokenizer, prefix, context.prefix_truncated, max(1, budget))
    healed, heal = _heal(tokenizer, prefix)
    text = f"{fim[0]}{healed}{fim[1]}{suffix}{fim[2]}" if fim else healed
    return Prompt(
        text=text,
        heal=heal,
        multiline=is_multi,
        base_indent=base_indent,
        max_new_tokens=max_tokens if is_multi else min(max_tokens, max_line_tokens),
        line_after=line_after,
        next_line=next_line,
        fim=bool(fim),
        n_tokens=n,
        suffix_lines=suffix_lines,
        fenced=FENCE in context.prefix,
    )


def _heal(tokenizer, text: str) -> tuple[str, str]:
    """(the text without its last token, that token's text), when the token is plain text."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < 2 or ids[-1] in set(getattr(tokenizer, "all_special_ids", ())):
        return text, ""
    last = tokenizer.decode(ids[-1:])
    if not last or not text.endswith(last):
        return text, ""
    return text[: -len(last)], last


def postprocess(text: str, prompt: Prompt) -> str:
    """What the editor shows for the model's (already cut, healed) text: "" means nothing to show."""
    if not prompt.multiline:
        text = text.split("\n", 1)[0]
    if not prompt.fenced:   # an instruct model closing a markdown code block it imagines
        lines = text.split("\n")
        fence = next((i for i, line in enumerate(lines) if line.lstrip().startswith(FENCE)), None)
        if fence is not None:
            text = "\n".join(lines[:fence])
    text = text.rstrip()
    if not text.strip():
        return ""
    after = prompt.line_after
    if after.strip() and not prompt.multiline:
        # e.g. the editor auto-closed a bracket: don't write it twice
        for k in range(min(len(text), len(after)), 0, -1):
            if text.endswith(after[:k]):
                text = text[:-k].rstrip()
                break
        if not text.strip() or after.lstrip().startswith(text.strip()):
            return ""
    nxt = prompt.next_line.strip()
    echoes = {nxt} | {line for line in prompt.suffix_lines if len(line) >= ECHO_MIN_CHARS}
    echoes.discard("")
    if echoes:
        lines = text.split("\n")
        if lines[0].strip() in echoes and not after.strip():
            return ""
        for i, line in enumerate(lines[1:], start=1):
            if line.strip() in echoes:   # the model is rewriting what follows the cursor (typical of FIM)
                text = "\n".join(lines[:i]).rstrip()
                break
    return text if text.strip() else ""
