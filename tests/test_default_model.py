"""The behaviour that matters, on the real embedded default model (SmolLM2-135M-Instruct).

Each case is a real failure of the model: the prompt is a CoNaLa-style intent comment, the model's
greedy completion is wrong, and one `star repair` must make it write the fix while leaving the
completions of twenty unrelated prompts (tests/controls.py) unchanged.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from controls import CONTROLS
from star_engine.capture import encode
from star_engine.case import RepairCase
from star_engine.generate import complete
from star_engine.repair import repair, undo

pytestmark = pytest.mark.slow

REAL_FAILURES = [
    ("# Reverse the list `a`\n", "a.reverse()"),
    ("# convert string `s` to lowercase\n", "s.lower()"),
    ("# Remove the last item of `a`\n", "a.pop()"),
    ("# Number of items in `a`\n", "n = len(a)"),
    ("# split string `s` on commas\n", "s.split(',')"),
]


@pytest.fixture(scope="module")
def control_completions(default_lm):
    return {p: complete(default_lm, p, max_new_tokens=16) for p in CONTROLS}


@torch.no_grad()
def _greedy_line_margins(lm, prompt: str, max_new_tokens: int = 16) -> tuple[str, list[float]]:
    """The greedy single-line completion and, at each of its tokens and at the token ending the line, the
    top logit minus the runner-up."""
    ids, new, margins = encode(lm, prompt), [], []
    for _ in range(max_new_tokens):
        top = lm.model(input_ids=torch.tensor([ids + new])).logits[0, -1].topk(2)
        margins.append(float(top.values[0] - top.values[1]))
        new.append(int(top.indices[0]))
        if "\n" in lm.tokenizer.decode(new) or new[-1] == lm.tokenizer.eos_token_id:
            break
    return lm.tokenizer.decode(new, skip_special_tokens=True).split("\n")[0], margins


def test_the_controls_are_decisive_to_the_end_of_their_line(default_lm, control_completions):
    for prompt in CONTROLS:
        line, margins = _greedy_line_margins(default_lm, prompt)
        assert line == control_completions[prompt]
        assert min(margins) >= 0.5, (prompt, margins)


def test_the_cases_are_real_distinct_failures(default_lm):
    assert len({fix for _, fix in REAL_FAILURES}) == len(REAL_FAILURES) >= 5
    for prompt, fix in REAL_FAILURES:
        assert complete(default_lm, prompt) != fix


@pytest.mark.parametrize("prompt, fix", REAL_FAILURES, ids=[f for _, f in REAL_FAILURES])
def test_star_fixes_a_real_failure_and_leaves_unrelated_prompts_alone(default_lm, control_completions, prompt, fix):
    result = repair(default_lm, [RepairCase(prompt, fix)])
    try:
        assert result.fixed, result.reason
        assert complete(default_lm, prompt) == fix
        changed = {p: complete(default_lm, p, max_new_tokens=16) for p in CONTROLS}
        assert {p: c for p, c in changed.items() if c != control_completions[p]} == {}
    finally:
        undo(default_lm, result)
    assert complete(default_lm, prompt) != fix


def test_star_repair_command_fixes_a_real_failure():
    prompt, fix = REAL_FAILURES[0]
    star = str(Path(sys.executable).with_name("star"))
    proc = subprocess.run([star, "repair", "--prompt", prompt, "--fix", fix, "--json"], capture_output=True,
                          text=True, timeout=600, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["fixed"] and out["after"] == fix and out["before"] != fix
