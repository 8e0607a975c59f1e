"""The guard's remembered behaviour: the same figures as a fresh pass, recomputed the moment any output
projection changes, reused when the weights come back to a state it measured."""

from __future__ import annotations

import pytest
import torch

from star_engine.locality import behaviour, behaviour_now
from star_engine.patch import WeightSnapshot


@pytest.fixture
def calls(tiny_llama):
    """One entry per forward pass of the (session-wide) tiny model while the test runs."""
    seen = []
    with tiny_llama.model.register_forward_hook(lambda *_: seen.append(1)):
        yield seen


def _same(a, b) -> bool:
    return torch.equal(a.argmax, b.argmax) and torch.equal(a.nll, b.nll)


def test_behaviour_now_is_remembered_per_exact_weight_state(tiny_llama, calls):
    windows = [tuple(range(3, 35)), tuple(range(40, 72))]
    first = behaviour_now(tiny_llama, windows)
    assert calls and _same(first, behaviour(tiny_llama, windows))
    calls.clear()
    assert _same(behaviour_now(tiny_llama, windows), first) and not calls      # nothing moved: no pass

    snapshot = WeightSnapshot(tiny_llama.arch)
    try:
        with torch.no_grad():
            tiny_llama.arch.weight(1)[0, 0] += 0.5                               # one weight of one layer
        moved = behaviour_now(tiny_llama, windows)
        assert calls and _same(moved, behaviour(tiny_llama, windows))
    finally:
        snapshot.restore()
    calls.clear()
    assert _same(behaviour_now(tiny_llama, windows), first) and not calls      # back where it was measured
    assert behaviour_now(tiny_llama, windows[:1]).argmax.shape[0] == 31 and calls   # other windows, own entry
