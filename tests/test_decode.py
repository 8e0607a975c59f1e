"""The engine's one greedy decoder: exactly what plain greedy decoding writes, however it gets there
(prompt-lookup drafts, a kept KV cache, a fed tail re-used, token healing, a deadline, cancellation).

The reference everywhere is `model.generate(do_sample=False)`, transformers' own greedy loop."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import make_tiny
from star_engine.capture import encode
from star_engine.case import RepairCase
from star_engine.decode import Decoder, GenerationCancelled, lookup_draft
from star_engine.generate import complete, complete_prompt, shown_part, worth_showing
from star_engine.repair import repair, undo

# Code that repeats itself, so prompt lookup finds drafts, right and wrong ones.
REPEATING = (
    "def area(width, height):\n    return width * height\n\n\n"
    "def perimeter(width, height):\n    return 2 * (width + height)\n\n\n"
    "def volume(width, height, depth):\n    return width * height"
)


def plain_greedy(lm, ids: list[int], n: int) -> list[int]:
    """At most `n` greedy tokens, up to the first end token (which the decoder does not return)."""
    x = torch.tensor([ids])
    out = lm.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                            pad_token_id=0)[0, len(ids):].tolist()
    ends = Decoder(lm).stop_ids
    return next((out[:i] for i, t in enumerate(out) if t in ends), out)


def test_lookup_draft_takes_what_followed_the_latest_occurrence_of_the_longest_tail():
    seq = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert lookup_draft(seq, 2) == [7, 8]          # the 2-token tail [2, 3], latest earlier occurrence
    assert lookup_draft(seq, 2, max_ngram=3) == [7, 8]
    assert lookup_draft([4, 5, 6], 3) == []        # nothing repeats
    assert lookup_draft([4, 5, 4], 3) == [5, 4]    # a 1-token tail


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "codegen"])
def test_drafted_decoding_writes_exactly_what_plain_greedy_writes(family, tokenizer):
    lm = make_tiny(family, tokenizer)
    dec = Decoder(lm)
    drafted = accepted = 0
    for cut in (40, 90, 140, len(REPEATING)):
        ids = encode(lm, REPEATING[:cut])
        reference = plain_greedy(lm, ids, 24)
        fast = dec.run(ids, max_new_tokens=24)
        assert fast.ids == reference
        assert dec.run(ids, max_new_tokens=24, speculate=False).ids == reference
        drafted, accepted = drafted + fast.drafted, accepted + fast.accepted
    assert 0 < accepted <= drafted   # the drafts were really used


class WrongDrafts(Decoder):
    """Drafts the right next token, then tokens that are mostly wrong: the rejection path every step."""

    def _draft(self, seq, one_line):
        right = plain_greedy(self.lm, seq, 1)
        return right + [(seq[-1] + k) % 500 + 3 for k in (1, 2)] if right else []


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_rejected_drafts_leave_the_output_and_the_cache_exact(family, tokenizer):
    lm = make_tiny(family, tokenizer)
    dec = WrongDrafts(lm)
    for cut in (40, len(REPEATING)):
        ids = encode(lm, REPEATING[:cut])
        out = dec.run(ids, max_new_tokens=12, key="doc")
        assert out.ids == plain_greedy(lm, ids, 12)
        assert out.accepted < out.drafted and out.accepted >= out.forward_passes - 2
        # what stays in the cache after rejections is consistent: a continuation from it is still exact
        more = dec.run(ids + out.ids, max_new_tokens=6, key="doc")
        assert more.ids == plain_greedy(lm, ids + out.ids, 6)


def test_after_a_repair_the_drafted_decoder_writes_the_fix_exactly_as_plain_greedy(tiny_llama):
    case = RepairCase(prompt=REPEATING[:120], fix=" width")
    dec = Decoder(tiny_llama)
    before = dec.run(encode(tiny_llama, REPEATING), max_new_tokens=16, key="doc")
    result = repair(tiny_llama, [case], "star", {"lr": "0.1"}, guard=None)
    try:
        assert result.fixed
        dec.reset()   # the weights changed (the server does this at its weight switch)
        for text in (case.prompt, REPEATING, REPEATING[:60]):
            ids = encode(tiny_llama, text)
            assert dec.run(ids, max_new_tokens=16, key="doc").ids == plain_greedy(tiny_llama, ids, 16)
        assert complete(tiny_llama, case.prompt).startswith(case.fix)
    finally:
        undo(tiny_llama, result)
    dec.reset()
    assert dec.run(encode(tiny_llama, REPEATING), max_new_tokens=16, key="doc").ids == before.ids


def test_token_healing_constrains_decoding_until_the_heal_is_spelled(tokenizer):
    """Against a brute-force reference: full forward passes, and at each healing step the argmax over
    the tokens that start with what is left of `heal` or are a prefix of it."""
    lm = make_tiny("llama", tokenizer)
    dec = Decoder(lm)
    three = tokenizer("\n   ", add_special_tokens=False)["input_ids"]
    assert len(three) == 1 and three[0] in set(dec.vocab.allowed("\n    ").tolist())   # a prefix of the heal
    special = set(tokenizer.all_special_ids)
    texts = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    for prompt, heal in [("def f(x):", "\n    "), ("import os\nos", ".wa"), ("x =", " ")]:
        ids = encode(lm, prompt)
        new, rest = [], heal
        with torch.no_grad():
            while rest:
                logits = lm.model(torch.tensor([ids + new])).logits[0, -1]
                ok = [i for i, t in enumerate(texts) if t and i not in special
                      and (t.startswith(rest) or rest.startswith(t))]
                token = max(ok, key=lambda i: float(logits[i]))
                new.append(token)
                rest = rest[len(texts[token]):] if rest.startswith(texts[token]) else ""
        out = dec.run(ids, max_new_tokens=6, heal=heal, key=prompt)
        assert out.ids[: len(new)] == new and len(out.ids) > len(new)
        # after the heal: plain greedy from there on
        assert out.ids[len(new):] == plain_greedy(lm, ids + new, len(out.ids) - len(new))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "codegen"])
def test_kv_reuse_across_keystrokes_matches_a_fresh_decode(family, tokenizer):
    lm = make_tiny(family, tokenizer)
    dec = Decoder(lm)
    text = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fib"
    for prompt in [text, text + "onacci(n - 1)", text + "onacci(n", text[:-10], text]:
        got = complete_prompt(dec, prompt, max_new_tokens=12, key="doc")
        assert got.text == complete(lm, prompt, max_new_tokens=12)
    assert got.decoded.reused_tokens > 0   # the last prompt reused the cache of the one before
    # the user typed what the model had generated: that prompt was fed entirely and its next-token logits
    # are kept, so decoding starts without a forward pass
    complete_prompt(dec, text, max_new_tokens=2, key="again")
    fed = list(dec._kv["again"].fed)
    longer = tokenizer.decode(fed)
    assert len(longer) > len(text)                                          # the first generated token was fed
    assert tokenizer(longer, add_special_tokens=False)["input_ids"] == fed   # and ends at a clean token boundary
    again = complete_prompt(dec, longer, max_new_tokens=12, key="again")
    assert again.decoded.prompt_tokens == again.decoded.reused_tokens == len(fed)
    assert again.text == complete(lm, longer, max_new_tokens=12)


def test_a_fed_tail_is_taken_without_forward_passes_while_it_is_what_greedy_writes(tiny_llama):
    dec = Decoder(tiny_llama)
    ids = encode(tiny_llama, REPEATING)
    first = dec.run(ids, max_new_tokens=20, key="doc", speculate=False)
    assert len(first.ids) == 20
    # the user accepted the first 12 tokens: the next prompt is a prefix of what the cache holds, and the
    # next 8 tokens were fed with their successors known
    again = dec.run(ids + first.ids[:12], max_new_tokens=8, key="doc", speculate=False)
    assert again.ids == first.ids[12:20]
    assert again.forward_passes == 0 and again.reused_tokens == len(ids) + 12
    further = dec.run(ids + first.ids[:12], max_new_tokens=9, key="doc", speculate=False)   # one token beyond what was fed
    assert further.forward_passes == 1 and further.ids[:8] == again.ids
    assert dec.run(ids + first.ids[:12], max_new_tokens=9).ids == further.ids   # a fresh cache agrees


def test_healing_on_a_long_fed_tail_needs_no_logits_when_the_argmax_spells_the_heal(tiny_llama):
    from star_engine.decode import KEPT_LOGITS

    dec = Decoder(tiny_llama)
    ids = encode(tiny_llama, REPEATING)
    first = dec.run(ids, max_new_tokens=3 * KEPT_LOGITS, key="doc", speculate=False).ids
    assert len(first) == 3 * KEPT_LOGITS
    cut = 10   # far from the end: only the argmax of that position is still kept
    assert len(ids) + cut - 1 not in dec._kv["doc"].logits
    heal = tiny_llama.tokenizer.decode([first[cut - 1]])
    again = dec.run(ids + first[: cut - 1], max_new_tokens=8, heal=heal, key="doc", speculate=False)
    assert again.ids == first[cut - 1 : cut + 8] and again.forward_passes == 0
    # a heal the argmax does not spell: the logits are computed again, and the choice is still exact
    other = next(t for t in range(3, 500) if tiny_llama.tokenizer.decode([t]).strip()
                 and not tiny_llama.tokenizer.decode([t]).startswith(heal))
    heal2 = tiny_llama.tokenizer.decode([other])
    kept = dec.run(ids + first[: cut - 1], max_new_tokens=4, heal=heal2, key="doc", speculate=False)
    fresh = Decoder(tiny_llama).run(ids + first[: cut - 1], max_new_tokens=4, heal=heal2, speculate=False)
    assert kept.ids == fresh.ids and kept.forward_passes >= 1


def test_deadline_returns_what_is_ready_and_the_next_request_continues_from_the_kept_cache(tiny_llama):
    dec = Decoder(tiny_llama)
    ids = encode(tiny_llama, REPEATING)
    full = dec.run(ids, max_new_tokens=10).ids
    assert len(full) == 10
    shown: list[int] = []
    while len(shown) < 10:   # each request past its deadline: one token, then the next request goes on
        part = dec.run(ids + shown, max_new_tokens=10 - len(shown), deadline=0.0, key="doc")
        assert part.truncated == (len(shown) + len(part.ids) < 10) and len(part.ids) == 1
        if shown:
            # only the token shown last is fed (it was chosen, then the deadline returned it)
            assert part.reused_tokens == len(ids) + len(shown) - 1 and part.forward_passes == 1
        shown += part.ids
    assert shown == full
    # `ready` holds the cut back until there is something worth showing
    waited = dec.run(ids, max_new_tokens=10, deadline=0.0, ready=lambda new: len(new) >= 3)
    assert waited.truncated and waited.ids == full[:3]


def test_what_a_cut_completion_shows():
    block = "    x = 1\n    y = 2\n    return x +"
    assert shown_part(block, ended=False, multiline=True, base_indent=4) == "    x = 1\n    y = 2"
    assert shown_part("    return x +", ended=False, multiline=True, base_indent=4) == "    return x +"
    assert shown_part(block, ended=True, multiline=True, base_indent=4) == block
    assert shown_part("    x = 1\n\nz = 3", ended=True, multiline=True, base_indent=4) == "    x = 1"
    assert shown_part("compute(a)\nmore", ended=True, multiline=False) == "compute(a)"
    assert not worth_showing("") and not worth_showing("   ") and not worth_showing("\n    ")
    assert worth_showing("    ret") and worth_showing("\n    x = 1\n") and not worth_showing("\n    x = 1")


def test_decoding_cancels_cooperatively_and_keeps_its_cache(tokenizer):
    lm = make_tiny("llama", tokenizer)
    dec = Decoder(lm)
    cancel = threading.Event()
    cancel.set()
    complete_prompt(dec, "import os\nx = ", max_new_tokens=3, key="doc")
    with pytest.raises(GenerationCancelled):
        complete_prompt(dec, "import os\nx = 1", max_new_tokens=50, cancel=cancel, key="doc")
    again = complete_prompt(dec, "import os\nx = 1", max_new_tokens=5, key="doc")
    assert again.decoded.reused_tokens > 0   # the cache survived the cancellation
    assert again.text == complete(lm, "import os\nx = 1", max_new_tokens=5)


# -- the real default model -------------------------------------------------------------------------------

REAL_PROMPTS = [
    "import os\n\n\ndef list_python_files(root):\n    out = []\n    for dirpath, _, names in os.walk(root):\n"
    "        for name in names:\n            if name.endswith('.py'):\n                out.append(os.path.join(",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
    "        self.items.append(item)\n\n    def pop(self):\n        return self.items.",
    "# Reverse the list `a`\n",
    "def mean(xs):\n    return sum(xs) / len(xs)\n\n\ndef variance(xs):\n    m = mean(xs)\n    return sum(",
]


@pytest.mark.slow
def test_real_model_drafted_decoding_is_plain_greedy_before_and_after_a_repair(default_lm):
    dec = Decoder(default_lm)
    case = RepairCase(prompt="# Reverse the list `a`\n", fix="a.reverse()")

    def check(prompts):
        drafted = 0
        for text in prompts:
            ids = encode(default_lm, text)
            out = dec.run(ids, max_new_tokens=32, key="doc")
            assert out.ids == plain_greedy(default_lm, ids, 32), text
            drafted += out.drafted
        assert drafted > 0

    check(REAL_PROMPTS)
    result = repair(default_lm, [case], "star", guard=None)
    try:
        assert result.fixed
        dec.reset()
        check(REAL_PROMPTS)
        assert complete(default_lm, case.prompt) == case.fix
    finally:
        undo(default_lm, result)
