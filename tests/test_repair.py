"""The repair driver on tiny random models: fixes, verification, exact restore, determinism, bad input."""

import threading

import pytest
import torch

from helpers import same_weights, snapshot
from star_engine.case import RepairCase, RepairInputError
from star_engine.generate import complete
from star_engine.repair import RepairCancelled, repair, undo

PLANTED = RepairCase(prompt="def add(a, b):\n    return a +", fix=" b")
TINY_STEP = {"lr": "0.1", "neurons": "460"}   # random tiny models need a bigger step than the real model's 1e-2, and more neurons


@pytest.mark.parametrize("mode", ["token", "batch"])
def test_star_fixes_a_planted_failure_in_every_family(tiny_lm, mode):
    assert complete(tiny_lm, PLANTED.prompt) != PLANTED.fix
    result = repair(tiny_lm, [PLANTED], "star", TINY_STEP | {"mode": mode}, guard=None)
    assert result.fixed, result.reason
    assert complete(tiny_lm, PLANTED.prompt) == PLANTED.fix
    assert result.after == PLANTED.fix and result.before != PLANTED.fix
    assert result.neurons > 0 and result.layers and result.seconds > 0
    assert result.cases[0].em_after == 1.0 > result.cases[0].em_before


def test_undo_restores_the_weights_bit_exactly(tiny_llama):
    before = snapshot(tiny_llama)
    result = repair(tiny_llama, [PLANTED], "star", TINY_STEP, guard=None)
    assert result.fixed
    undo(tiny_llama, result)
    assert same_weights(tiny_llama, before)


def test_a_repair_that_cannot_fix_restores_the_weights_bit_exactly(tiny_llama):
    before = snapshot(tiny_llama)
    result = repair(tiny_llama, [PLANTED], "star", {"step_rule": "fixed", "lr": "1e-9", "steps": "1"}, guard=None)
    assert not result.fixed
    assert "still writes" in result.reason and result.patch is None
    assert same_weights(tiny_llama, before)


def test_token_mode_gives_up_at_the_first_failure_it_cannot_fix(tiny_llama):
    case = RepairCase(prompt=PLANTED.prompt, fix=" b * 3 - a")
    visited = {}
    for give_up in ("true", "false"):
        messages = []
        settings = {"mode": "token", "step_rule": "fixed", "lr": "1e-9", "steps": "1", "give_up": give_up}
        result = repair(tiny_llama, [case], "star", settings, progress=lambda m, f: messages.append(m), guard=None)
        assert not result.fixed
        visited[give_up] = sum(m.startswith("case ") for m in messages)   # one per failing token visited
    assert visited["true"] == 1 < visited["false"]


def test_same_input_gives_the_same_patch(tokenizer):
    from conftest import make_tiny

    patches = []
    for _ in range(2):
        result = repair(make_tiny("llama", tokenizer), [PLANTED], "star", TINY_STEP, guard=None)
        patches.append(result.patch)
    a, b = patches
    assert a.layer_ids == b.layer_ids
    for l in a.layer_ids:
        assert torch.equal(a.layers[l].columns, b.layers[l].columns)
        assert torch.equal(a.layers[l].delta, b.layers[l].delta)


def test_neurons_outside_the_mask_stay_bit_identical(tiny_llama):
    before = snapshot(tiny_llama)
    result = repair(tiny_llama, [PLANTED], "star", TINY_STEP | {"sparsity": "layer", "sparsity_ratio": "0.125"}, guard=None)
    assert result.fixed, result.reason
    [layer] = result.layers                    # layer-wise sparsity: one layer only
    assert result.neurons < tiny_llama.arch.d_ff // 2     # one mask of d_ff/8 per failing token
    changed = (tiny_llama.arch.columns(layer) != before[layer]).any(dim=0)
    assert torch.equal(changed.nonzero().flatten(), result.patch.layers[layer].columns)
    for l in range(tiny_llama.arch.n_layers):
        if l != layer:
            assert torch.equal(tiny_llama.arch.columns(l), before[l])


def test_top_layers_by_ffn_skip_limit_the_patch(tiny_llama):
    result = repair(tiny_llama, [PLANTED], "star", TINY_STEP | {"layer_ratio": "0.25"}, guard=None)
    assert result.fixed, result.reason
    assert len(result.layers) == 1


def test_several_cases_in_one_repair(tiny_llama):
    cases = [PLANTED, RepairCase(prompt="def sub(a, b):\n    return a -", fix=" b")]
    result = repair(tiny_llama, cases, "star", TINY_STEP | {"mode": "batch"}, guard=None)
    assert result.fixed, result.reason
    assert [complete(tiny_llama, c.prompt) for c in cases] == [" b", " b"]
    assert len(result.cases) == 2


def test_cancelled_repair_restores_and_raises(tiny_llama):
    before = snapshot(tiny_llama)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(RepairCancelled):
        repair(tiny_llama, [PLANTED], "star", TINY_STEP, cancel=cancel, guard=None)
    assert same_weights(tiny_llama, before)


@pytest.mark.parametrize(
    "case, message",
    [
        (RepairCase(prompt="x = ", fix="   "), "fix is empty"),
        (RepairCase(prompt="", fix="1"), "prompt is empty"),
        (RepairCase(prompt="x " * 400, fix="1"), "context window"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(tiny_llama, case, message):
    with pytest.raises(RepairInputError, match=message):
        repair(tiny_llama, [case], guard=None)


def test_a_fix_the_model_already_writes_is_refused(tiny_llama):
    assert repair(tiny_llama, [PLANTED], "star", TINY_STEP, guard=None).fixed
    with pytest.raises(RepairInputError, match="already writes"):
        repair(tiny_llama, [PLANTED], guard=None)


def test_unknown_method_and_settings_are_refused(tiny_llama):
    with pytest.raises(ValueError, match="unknown repair method"):
        repair(tiny_llama, [PLANTED], "nope", guard=None)
    with pytest.raises(ValueError, match="unknown setting"):
        repair(tiny_llama, [PLANTED], "star", {"nope": "1"}, guard=None)
    with pytest.raises(ValueError, match="one of"):
        repair(tiny_llama, [PLANTED], "star", {"mode": "sideways"}, guard=None)


def test_batch_mode_reports_how_many_failing_tokens_it_fixed(tiny_llama):
    result = repair(tiny_llama, [PLANTED], "star", TINY_STEP | {"mode": "batch"}, guard=None)
    assert result.fixed
    n = int(result.reason.split()[1])
    assert result.reason == f"fixed {n} failing token(s)" and n >= 1
