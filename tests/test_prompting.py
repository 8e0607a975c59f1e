"""Prompting rules for a FIM instruct checkpoint (Qwen2.5-Coder) and a slower model: FIM with token
healing, a capped suffix, a prompt start that stays put over several new lines (KV reuse), and the cut
rules for an instruct model that rewrites the suffix or closes a markdown fence. Fast: the tests'
tiny tokenizer and a character-level stand-in with Qwen's FIM tokens; test_qwen.py drives the real
model."""

from __future__ import annotations

from helpers import FimTokenizer
from star_server import prompting
from star_server.prompting import Context, build_prompt, postprocess


def test_fim_prompt_heals_the_prefix_and_the_repair_target_follows():
    source = "def push(self, item):\n\n    def pop(self):\n        return self.items.pop()\n"
    offset = source.index("\n") + 1
    prompt = build_prompt(Context.at(source, offset, 256), FimTokenizer())
    assert prompt.fim and prompt.heal == "\n"
    assert prompt.text == ("<|fim_prefix|>def push(self, item):<|fim_suffix|>\n    def pop(self):\n"
                           "        return self.items.pop()\n<|fim_middle|>")
    assert prompt.repair_fix("    self.items.append(item)") == "\n    self.items.append(item)"


def test_without_fim_tokens_or_without_a_suffix_the_prompt_is_the_healed_prefix(tokenizer):
    source = "names = ['b', 'a']\nnames_sorted = "
    plain = build_prompt(Context.at(source + "\nprint(names_sorted)\n", len(source), 256), tokenizer)
    assert not plain.fim and plain.text + plain.heal == source     # the tiny tokenizer has no FIM tokens
    no_suffix = build_prompt(Context.at(source, len(source), 256), FimTokenizer())
    assert not no_suffix.fim and no_suffix.text + no_suffix.heal == source


def test_fim_suffix_is_capped_in_whole_lines():
    suffix = "\n" + "".join(f"line_{i} = {i}\n" for i in range(100))   # the cursor on an empty line
    source = "x = 1\n" + suffix
    for multiline, cap in [("always", prompting.FIM_SUFFIX_TOKENS), ("never", prompting.FIM_LINE_SUFFIX_TOKENS)]:
        prompt = build_prompt(Context.at(source, len("x = 1\n"), 2048), FimTokenizer(), multiline=multiline)
        assert prompt.multiline == (multiline == "always")
        kept = prompt.text.split("<|fim_suffix|>")[1].split("<|fim_middle|>")[0]
        assert cap - 12 < len(kept) <= cap and suffix.startswith(kept) and kept.endswith("\n")


def _start(tokenizer, source: str, budget: int) -> str:
    prompt = build_prompt(Context.at(source, len(source), budget), tokenizer)
    assert len(tokenizer(prompt.text, add_special_tokens=False)["input_ids"]) <= budget
    return prompt.text.split("\n", 1)[0]


def test_the_prompt_start_stays_put_while_the_user_types_new_lines(tokenizer):
    lines = [f"value_{i} = compute({i}, {i * 7})" for i in range(300)]
    sources = ["\n".join(lines[:n]) + "\n" for n in range(150, 230)]
    starts = [_start(tokenizer, s, 384) for s in sources]
    assert all(s in lines for s in starts)                      # whole lines only
    changes = sum(a != b for a, b in zip(starts, starts[1:]))
    # the longest tail that fits would start one line later at every new line: 79 full prefills
    assert changes <= 79 // 3, changes
    kept = [len(tokenizer(build_prompt(Context.at(s, len(s), 384), tokenizer).text)["input_ids"]) for s in sources]
    assert min(kept) >= 384 // 3, min(kept)                     # ... and most of the budget is still used


def test_postprocess_cuts_a_rewrite_of_any_nearby_suffix_line(tokenizer):
    source = "class Stack:\n    def push(self, item):\n\n    def pop(self):\n        return self.items.pop()\n"
    offset = source.index("item):\n") + len("item):\n")
    prompt = build_prompt(Context.at(source, offset, 256), tokenizer, multiline="always")
    # the second suffix line, not only the first, counts as a rewrite
    assert postprocess("        self.items.append(item)\n        return self.items.pop()", prompt) == \
        "        self.items.append(item)"
    assert postprocess("        return self.items.pop()", prompt) == ""
    # short lines may well be new code
    src = "if x:\n    y = 1\n\nelse:\n    y = 2\n"
    p = build_prompt(Context.at(src, src.index("y = 1\n") + 6, 256), tokenizer, multiline="always")
    assert postprocess("    z = 3\n    pass", p) == "    z = 3\n    pass"


def test_postprocess_cuts_a_markdown_fence_unless_the_file_has_fences(tokenizer):
    code = build_prompt(Context.at("def f(x):\n", 10, 256), tokenizer, multiline="always")
    assert postprocess("    return x\n```\n\nThis function", code) == "    return x"
    assert postprocess("```python", code) == ""
    doc = "Example:\n\n```\nls -l\n"
    md = build_prompt(Context.at(doc, len(doc), 256), tokenizer, multiline="always")
    assert postprocess("```", md) == "```"
