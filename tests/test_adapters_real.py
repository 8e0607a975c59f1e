"""Adapters on the real default model (SmolLM2-135M): a dense STAR patch saved by the stack reloads in vanilla
PEFT with the same logits and completion, survives a restart bit for bit, and undoes bit for bit."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import as_loaded, snapshot
from star_engine.adapters import PatchStack
from star_engine.adapters.format import WEIGHTS_NAME
from star_engine.capture import encode
from star_engine.case import RepairCase
from star_engine.generate import complete
from star_engine.repair import repair

pytestmark = pytest.mark.slow

DEMO = RepairCase(prompt="# Reverse the list `a`\n", fix="a.reverse()")


@pytest.fixture(scope="module")
def dense(default_lm, tmp_path_factory):
    """One default (dense) STAR repair of the demo case, added to a stack; removed again afterwards."""
    lm = default_lm
    before = snapshot(lm)
    folder = tmp_path_factory.mktemp("real") / "adapters"
    stack = PatchStack(lm, folder)
    assert stack.load() == []
    result = repair(lm, [DEMO])
    assert result.fixed, result.reason
    info = stack.add(result)
    yield SimpleNamespace(lm=lm, stack=stack, info=info, result=result, folder=folder)
    stack.remove(info.id)
    after = snapshot(lm)
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "undo on the real model is not bit-exact"


def test_vanilla_peft_reproduces_a_dense_star_patch_on_the_real_model(dense):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lm, path = dense.lm, Path(dense.info.path)
    size = (path / WEIGHTS_NAME).stat().st_size
    d, d_ff, n = lm.arch.d_model, lm.arch.d_ff, len(dense.result.layers)
    if dense.result.neurons == n * d_ff:                       # dense: identity encoding, r = d per layer
        assert size < n * d * (d + d_ff) * 4 + 2**20
    ids = torch.tensor([encode(lm, DEMO.prompt + DEMO.fix + "\n")])
    base = AutoModelForCausalLM.from_pretrained(lm.path, dtype=torch.float32)
    pm = PeftModel.from_pretrained(base, str(path)).eval()
    with torch.no_grad():
        with dense.stack.lock:
            patched = lm.model(input_ids=ids).logits
        reloaded = pm(input_ids=ids).logits
    diff = (reloaded - patched).abs().max().item()
    print(f"\ndense STAR patch: {dense.result.neurons} neurons in {n} layers; adapter {size / 2**20:.1f} MB; "
          f"peft max |logit diff| {diff:.2e}")
    assert diff <= 1e-4
    assert complete(as_loaded(pm, lm.tokenizer), DEMO.prompt) == DEMO.fix


def test_the_repair_survives_a_restart_bit_for_bit(dense):
    from star_engine.model import load_model

    fresh = load_model()                                         # a new session: the base model again
    assert complete(fresh, DEMO.prompt) != DEMO.fix
    started = time.perf_counter()
    stack = PatchStack(fresh, dense.folder)
    assert stack.load() == []
    print(f"\nstack of 1 dense patch loaded in {time.perf_counter() - started:.2f} s")
    with dense.stack.lock:
        assert all(torch.equal(fresh.arch.columns(l), dense.lm.arch.columns(l)) for l in range(fresh.arch.n_layers))
    assert complete(fresh, DEMO.prompt) == DEMO.fix
    [row] = stack.verify()
    assert row.fixed and row.fix == DEMO.fix
