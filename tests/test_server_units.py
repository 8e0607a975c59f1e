"""Unit tests of the language server's plain-data modules: settings, prompting, the completion cache,
the readers-writer lock and documents (decoding: tests/test_decode.py)."""

from __future__ import annotations

import threading
import time

import pytest
from lsprotocol import types

from helpers import FimTokenizer
from star_server.cache import CompletionCache
from star_server.documents import BadPosition, offset_at, position_arg
from star_server.prompting import Context, build_prompt, decide_mode, postprocess
from star_server.rwlock import RWLock
from star_server.settings import Settings, section

# -- settings -------------------------------------------------------------------------------------------


def test_settings_from_options_and_problems():
    s, problems = Settings().updated({"maxTokens": 12, "multiline": "never", "debounceMs": 100, "unknown": 1})
    assert (s.max_tokens, s.multiline, s.debounce_ms) == (12, "never", 100)
    assert problems == []
    s2, problems = s.updated({"maxTokens": "lots", "multiline": "sometimes", "contextTokens": 3, "debounceMs": True})
    assert s2 == s
    assert len(problems) == 4 and all(p.startswith("setting ") and "\n" not in p for p in problems)
    s3, _ = s.updated({"maxTokens": None, "model": "x"})
    assert s3.max_tokens == Settings().max_tokens and s3.model == "x"
    assert Settings().updated("nope")[1] == ["settings must be an object, got str"]
    assert section({"star": {"maxTokens": 3}}) == {"maxTokens": 3}
    assert section({"maxTokens": 3}) == {"maxTokens": 3}
    assert Settings().to_json()["maxLineTokens"] == 24
    s4, problems = Settings().updated({"speculate": False, "multilineBudgetMs": 0})
    assert (s4.speculate, s4.multiline_budget_ms, problems) == (False, 0, [])
    assert Settings().updated({"speculate": "no"})[1] == ["setting speculate: expected true or false, got 'no'"]


# -- prompting --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix, after, mode, expected",
    [
        ("x = 1\n", "", "auto", (False, 0)),
        ("def f(x):", "", "auto", (True, 1)),
        ("def f(x):\n", "", "auto", (True, 1)),
        ("def f(x):\n    ", "", "auto", (True, 4)),
        ("    if x:\n        ", "", "auto", (True, 8)),
        ("def f(x):", ")", "auto", (False, 0)),          # code after the cursor: single line
        ("# note:", "", "auto", (False, 0)),              # a comment does not open a block
        ("def f(x):", "", "never", (False, 0)),
        ("    x = 1", "", "always", (True, 4)),
        ("items = [", "", "auto", (True, 1)),
    ],
)
def test_decide_mode(prefix, after, mode, expected):
    assert decide_mode(prefix, after, mode) == expected


def test_context_bounds_and_typing_forward():
    source = "a" * 5000 + "\nprint(x)\n" + "tail"
    offset = source.index("print(") + 6
    ctx = Context.at(source, offset, budget=64)
    assert len(ctx.prefix) == 64 * 8 and ctx.prefix_truncated and ctx.prefix.endswith("print(")
    assert ctx.suffix.startswith("x)\ntail") and ctx.line_after == "x)" and ctx.line_before == "print("
    typed = ctx.extended("x")
    assert typed == Context.at(source[:offset] + "x" + source[offset:], offset + 1, 64)
    short = Context.at("ab", 1, 64)
    assert (short.prefix, short.prefix_truncated, short.suffix) == ("a", False, "b")


def test_prompt_budget_starts_at_a_line(tokenizer):
    lines = [f"value_{i} = compute({i}, {i * 7})" for i in range(200)]
    source = "\n".join(lines) + "\nresult = "
    ctx = Context.at(source, len(source), budget=64)
    prompt = build_prompt(ctx, tokenizer)
    assert prompt.n_tokens <= 64
    n = len(tokenizer(prompt.text, add_special_tokens=False)["input_ids"])
    assert n <= 64
    assert prompt.text.endswith("\nresult =") and prompt.heal == " "
    first = prompt.text.split("\n", 1)[0]
    assert first in lines   # whole lines only
    # one huge line: its end is kept
    huge = Context.at("x" * 3000 + " = ", 3003, budget=32)
    assert len(tokenizer(build_prompt(huge, tokenizer).text, add_special_tokens=False)["input_ids"]) <= 32


def test_prompt_modes_and_token_limits(tokenizer):
    single = build_prompt(Context.at("x = f(a", 7, 128), tokenizer, max_tokens=48, max_line_tokens=10)
    assert not single.multiline and single.max_new_tokens == 10
    multi = build_prompt(Context.at("def f(x):\n    ", 14, 128), tokenizer, max_tokens=48, max_line_tokens=10)
    assert multi.multiline and multi.max_new_tokens == 48 and multi.base_indent == 4


@pytest.mark.parametrize("source", ["x = f(a", "def f(x):\n    ", "people = ", "import os\nos.", "# note\n"])
def test_token_healing_leaves_out_the_last_token(tokenizer, source):
    prompt = build_prompt(Context.at(source, len(source), 128), tokenizer)
    ids = tokenizer(source, add_special_tokens=False)["input_ids"]
    assert prompt.heal == tokenizer.decode(ids[-1:]) and prompt.heal
    assert prompt.text + prompt.heal == source
    assert prompt.repair_fix("y") == prompt.heal + "y"


def test_fim_prompt_when_the_model_has_fim_tokens():
    source = "def average(xs):\n    total = \n    return total / len(xs)\n"
    offset = source.index("total = ") + len("total = ")
    prompt = build_prompt(Context.at(source, offset, 200), FimTokenizer())
    assert prompt.fim and prompt.heal == " "   # the prefix is healed too: the middle starts with " "
    assert prompt.text == (
        "<|fim_prefix|>def average(xs):\n    total =<|fim_suffix|>\n    return total / len(xs)\n<|fim_middle|>"
    )
    # no suffix: a plain prompt
    assert not build_prompt(Context.at("x = ", 4, 200), FimTokenizer()).fim


def _prompt(tokenizer, source, offset=None, **kw):
    return build_prompt(Context.at(source, len(source) if offset is None else offset, 256), tokenizer, **kw)


def test_postprocess_drops_duplicates_and_empties(tokenizer):
    source = "print(x)\n"
    p = _prompt(tokenizer, source, offset=source.index("x"))   # cursor before "x)"
    assert postprocess("x)", p) == ""                          # exactly what follows the cursor
    assert postprocess("y + x)", p) == "y +"                    # the auto-closed tail is not repeated
    p = _prompt(tokenizer, "a = 1\n\nreturn a\n", offset=6)
    assert postprocess("return a", p) == ""                    # the next line already says it
    p = _prompt(tokenizer, "def f(x):\n    \n    return y\n", offset=14)
    assert p.multiline
    assert postprocess("y = x + 1\n    return y\n", p) == "y = x + 1"   # FIM-style rewrite of the suffix cut
    assert postprocess("   \n", _prompt(tokenizer, "x = 1\n")) == ""
    assert postprocess("return x\nmore", _prompt(tokenizer, "x = 1\n")) == "return x"   # single line


# -- cache ---------------------------------------------------------------------------------------------------


def test_cache_exact_and_typing_forward():
    cache = CompletionCache()
    ctx = Context.at("import os\nfor root, dirs, files in os.", 36, 128)
    key = Settings().generation_key() + (1, "m")
    assert cache.get(ctx, key) is None
    cache.put(ctx, key, "walk(path):")
    assert cache.get(ctx, key) == "walk(path):"
    assert cache.get(ctx.extended("w"), key) == "alk(path):"
    assert cache.get(ctx.extended("walk(pa"), key) == "th):"
    assert cache.get(ctx.extended("x"), key) is None           # typed something else
    assert cache.get(ctx, key[:-2] + (2, "m")) is None          # other weights
    stats = cache.stats()
    assert stats["hits"] == 3 and stats["forwardHits"] == 2 and stats["misses"] == 3
    cache.put(ctx.extended("w"), key, "ait()")                   # a real completion beats a forward entry
    cache.put(ctx, key, "walk(path):")
    assert cache.get(ctx.extended("w"), key) == "ait()"
    cache.clear()
    assert len(cache) == 0


def test_cache_is_bounded():
    cache = CompletionCache(capacity=100)
    key = ()
    for i in range(50):
        cache.put(Context.at(f"x{i} = ", 5, 64), key, "y" * 30)
    assert len(cache) == 100


# -- rwlock ----------------------------------------------------------------------------------------------------


def test_rwlock_writer_excludes_readers_and_is_not_starved():
    lock = RWLock()
    events, release = [], threading.Event()

    def hold(kind):
        with getattr(lock, kind)():
            events.append(kind)
            release.wait(5)

    with lock.read():
        with lock.read():   # readers share
            pass
        writer = threading.Thread(target=hold, args=("write",))
        writer.start()
        time.sleep(0.05)
        assert events == []   # waits for the reader
        reader = threading.Thread(target=hold, args=("read",))
        reader.start()
        time.sleep(0.05)
        assert events == []   # a new reader queues behind the waiting writer
    time.sleep(0.05)
    assert events == ["write"]   # the writer goes first and excludes the reader
    release.set()
    writer.join(5)
    reader.join(5)
    assert events == ["write", "read"]


# -- documents ---------------------------------------------------------------------------------------------------


class _Doc:
    def __init__(self, source):
        from pygls.workspace.position_codec import PositionCodec

        self.source = source
        self.lines = tuple(source.splitlines(True))
        self.position_codec = PositionCodec()


def test_offsets_use_utf16_and_reject_outside_positions():
    doc = _Doc('x = "😋"\nok\n')
    assert offset_at(doc, types.Position(0, 7)) == 6        # the emoji is 2 UTF-16 units, 1 code point
    assert offset_at(doc, types.Position(1, 2)) == 10
    assert offset_at(doc, types.Position(2, 0)) == len(doc.source)
    for line, character in [(1, 3), (3, 0), (2, 1), (0, 9)]:
        with pytest.raises(BadPosition):
            offset_at(doc, types.Position(line, character))
    assert position_arg({"line": 1, "character": 2}) == types.Position(1, 2)
    for bad in [None, {"line": "1", "character": 0}, {"line": True, "character": 0}, [1, 2]]:
        with pytest.raises(BadPosition):
            position_arg(bad)


def test_cache_keeps_only_forward_entries_of_a_partial_line():
    cache = CompletionCache()
    ctx = Context.at("x = ", 4, 64)
    cache.put(ctx, (), "compute(", exact=False)
    assert cache.get(ctx, ()) is None
    assert cache.get(ctx.extended("com"), ()) == "pute("




# -- the workbench ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "codegen"])
def test_the_workbench_shares_all_but_the_output_projections_with_the_serving_model(family, tokenizer):
    import torch

    from conftest import make_tiny
    from star_engine.case import RepairCase
    from star_engine.model import workbench_copy
    from star_engine.repair import repair

    serving = make_tiny(family, tokenizer)
    bench = workbench_copy(serving)
    own = {serving.arch.weight(layer).data_ptr() for layer in range(serving.arch.n_layers)}
    for (name, a), (_, b) in zip(serving.model.state_dict().items(), bench.model.state_dict().items()):
        assert (a.data_ptr() == b.data_ptr()) == (a.data_ptr() not in own), name
        assert torch.equal(a, b), name
    ids = torch.tensor([tokenizer("def add(a, b):\n    return a +", add_special_tokens=False)["input_ids"]])
    before = serving.model(input_ids=ids).logits
    result = repair(bench, [RepairCase(prompt="def add(a, b):\n    return a +", fix=" b")], "star",
                    {"lr": "0.1"}, guard=None)
    assert result.fixed
    assert torch.equal(serving.model(input_ids=ids).logits, before)   # the serving model did not move
    assert not torch.equal(bench.model(input_ids=ids).logits, before)
