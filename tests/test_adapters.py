"""Patches as PEFT adapter files and the patch stack, on tiny random models (fast): exact PEFT encoding,
persistence across a restart, bit-exact undo, the regression policy, sharing, validation of bad files,
atomicity under kill -9, hot reload with real watchdog events, and the `star adapters` CLI."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny
from helpers import as_loaded, forked, kill_9, run_cli, same_weights, snapshot
from star_engine.adapters import (
    AdapterError,
    PatchStack,
    RegressionError,
    load_adapter,
    save_adapter,
)
from star_engine.adapters.format import CONFIG_NAME, META_NAME, WEIGHTS_NAME
from star_engine.case import RepairCase
from star_engine.generate import complete
from star_engine.patch import LayerDelta, Patch, apply_patch
from star_engine.repair import CaseReport, RepairResult, repair

# The paper's dense token-mode configuration: these three tiny-model patches do not interfere with it.
TINY_STEP = {"lr": "0.1", "mode": "token", "sparsity": "none", "protect": "none", "direction": "seme",
             "step_rule": "fixed", "steps": "10"}
CASES = [
    RepairCase(prompt="def add(a, b):\n    return a +", fix=" b"),
    RepairCase(prompt="def sub(a, b):\n    return a -", fix=" b"),
    RepairCase(prompt="def mul(x, y):\n    return x *", fix=" y"),
]


# -- helpers ----------------------------------------------------------------------------------------------


def hand_patch(lm, seed: int = 0, scale: float = 0.3) -> Patch:
    """Layer 1: three neurons (one-hot encoding); layer 2: every neuron (k = d_ff > d: identity encoding)."""
    g = torch.Generator().manual_seed(seed)
    d, d_ff = lm.arch.d_model, lm.arch.d_ff
    p = Patch()
    p.layers[1] = LayerDelta(torch.tensor([3, 17, 40]), torch.randn(d, 3, generator=g) * scale)
    p.layers[2] = LayerDelta(torch.arange(d_ff), torch.randn(d, d_ff, generator=g) * scale / 3)
    return p


def fake_result(lm, patch: Patch, case: RepairCase = CASES[0]) -> RepairResult:
    """A kept RepairResult for a hand-made patch (applied to the model, as repair() leaves it)."""
    saved = apply_patch(lm.arch, patch)
    report = CaseReport(prompt=case.prompt, fix=case.fix, before="?", after=case.fix, fixed=True,
                        em_before=0.0, em_after=1.0)
    return RepairResult(True, "hand-made", "hand", {}, 0.0, [report], patch, saved)


def star_repair(lm, case: RepairCase) -> RepairResult:
    result = repair(lm, [case], "star", TINY_STEP, guard=None)
    assert result.fixed, result.reason
    return result


def folder_listing(path: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*") if p.name != ".lock")


def peft_model(family_or_lm, tokenizer, adapter_dir, seed: int = 0):
    from peft import PeftModel

    base = make_tiny(family_or_lm, tokenizer, seed).model
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def rewrite_weights(adapter_dir: Path, tensors: dict) -> None:
    """Replace the safetensors file and keep star.json's checksum in step (to reach the later checks)."""
    import hashlib

    save_file(tensors, adapter_dir / WEIGHTS_NAME)
    meta = json.loads((adapter_dir / META_NAME).read_text())
    meta["adapter_sha256"] = hashlib.sha256((adapter_dir / WEIGHTS_NAME).read_bytes()).hexdigest()
    (adapter_dir / META_NAME).write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def star_adapters(tokenizer, tmp_path_factory) -> dict[int, Path]:
    """Adapters made by real STAR repairs of CASES[0] and CASES[2], each on the base tiny Llama (seed 0)."""
    root = tmp_path_factory.mktemp("made")
    out = {}
    for i in (0, 2):
        lm = make_tiny("llama", tokenizer)
        out[i] = save_adapter(lm, star_repair(lm, CASES[i]), root / f"fix{i}")
    return out


# -- format: exact and loadable by vanilla peft -----------------------------------------------------------


def test_vanilla_peft_reproduces_the_patched_logits_in_every_family(tiny_lm, tokenizer, tmp_path):
    family = tiny_lm.name.removeprefix("tiny-")
    patch = hand_patch(tiny_lm)
    result = fake_result(tiny_lm, patch)
    out = save_adapter(tiny_lm, result, tmp_path / "fix")
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME, META_NAME]

    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        patched = tiny_lm.model(input_ids=ids).logits
        reloaded = peft_model(family, tokenizer, out)(input_ids=ids).logits
    assert (reloaded - patched).abs().max().item() <= 1e-4

    config = json.loads((out / CONFIG_NAME).read_text())
    meta = json.loads((out / META_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] is False and config["use_dora"] is False
    assert config["fan_in_fan_out"] is (family == "gpt2")
    assert config["rank_pattern"] == config["alpha_pattern"]           # scale alpha / r = 1
    assert meta["encoding"] == {"1": "one-hot", "2": "identity"}
    tensors = load_file(out / WEIGHTS_NAME)
    module = tiny_lm.arch.out_proj_name(1)
    a, b = tensors[f"base_model.model.{module}.lora_A.weight"], tensors[f"base_model.model.{module}.lora_B.weight"]
    assert a.shape == (3, tiny_lm.arch.d_ff) and b.shape == (tiny_lm.arch.d_model, 3)
    assert config["rank_pattern"][module] == 3


def test_a_star_repair_saved_as_adapter_makes_vanilla_peft_write_the_fix(star_adapters, tokenizer):
    case, out = CASES[0], star_adapters[0]
    meta = json.loads((out / META_NAME).read_text())
    assert meta["method"] == "star" and meta["config"]["lr"] == 0.1
    [stored] = meta["cases"]
    assert stored["prompt"] == case.prompt and stored["fix"] == case.fix and stored["wrong"] != case.fix
    assert meta["n_neurons"] == sum(meta["neurons"].values()) > 0
    assert meta["base_model"]["model_type"] == "llama"
    assert sorted(map(int, meta["base_model"]["weights_sha256"])) == meta["layers"]

    pm = peft_model("llama", tokenizer, out)
    assert complete(as_loaded(pm, tokenizer), case.prompt) == case.fix
    assert complete(make_tiny("llama", tokenizer), case.prompt) != case.fix


def test_own_reload_is_bit_exact(tiny_llama, tokenizer, tmp_path):
    result = fake_result(tiny_llama, hand_patch(tiny_llama))
    out = save_adapter(tiny_llama, result, tmp_path / "fix")
    fresh = make_tiny("llama", tokenizer)
    adapter = load_adapter(fresh, out)
    apply_patch(fresh.arch, adapter.patch)
    assert same_weights(fresh, snapshot(tiny_llama))


def test_a_repair_verifies_the_weights_its_adapter_reloads_in_one_byte_a_and_float16_b(tokenizer, tmp_path):
    """The repair rounds its deltas to the file's float16 before it checks the fix, so the repaired model and
    any reload of its adapter are the same bits; the one-hot A takes one byte per entry."""
    lm = make_tiny("llama", tokenizer)
    result = repair(lm, [CASES[0]], "star", {**TINY_STEP, "sparsity": "global", "sparsity_ratio": "0.25"}, guard=None)
    assert result.fixed, result.reason
    out = save_adapter(lm, result, tmp_path / "fix")
    with open(out / WEIGHTS_NAME, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    encoding = json.loads((out / META_NAME).read_text())["encoding"]
    assert "one-hot" in encoding.values()
    expected = {"one-hot": ("F8_E4M3", "F16"), "identity": ("F16", "F16")}
    for layer, kind in encoding.items():
        module = f"base_model.model.{lm.arch.out_proj_name(int(layer))}"
        got = header[f"{module}.lora_A.weight"]["dtype"], header[f"{module}.lora_B.weight"]["dtype"]
        assert got == expected[kind], (layer, kind)
    fresh = make_tiny("llama", tokenizer)
    apply_patch(fresh.arch, load_adapter(fresh, out).patch)
    assert same_weights(fresh, snapshot(lm))
    assert complete(fresh, CASES[0].prompt) == CASES[0].fix


def test_the_stack_does_not_keep_a_patch_it_would_refuse_to_reload(tiny_llama, tmp_path):
    stack = PatchStack(tiny_llama, tmp_path / "adapters")
    stack.load()
    before = snapshot(tiny_llama)
    result = fake_result(tiny_llama, hand_patch(tiny_llama, scale=1e4))   # applied, as a repair leaves it
    with pytest.raises(AdapterError, match=r"layer 1: the adapter moves neuron \d+ by .*x the norm of its column"):
        stack.add(result)
    assert same_weights(tiny_llama, before) and stack.applied == []
    assert [p.name for p in (tmp_path / "adapters").iterdir() if not p.name.startswith(".")] == []


def test_save_refuses_an_unfixed_result_and_an_existing_directory(tiny_llama, tmp_path):
    result = fake_result(tiny_llama, hand_patch(tiny_llama))
    save_adapter(tiny_llama, result, tmp_path / "fix")
    with pytest.raises(AdapterError, match="already exists"):
        save_adapter(tiny_llama, result, tmp_path / "fix")
    result.fixed = False
    with pytest.raises(AdapterError, match="fixed"):
        save_adapter(tiny_llama, result, tmp_path / "other")
    assert not (tmp_path / "other").exists()


# -- the stack: persist, accumulate, undo ----------------------------------------------------------------


def test_repairs_survive_a_restart(star_adapters, tiny_llama, tokenizer, tmp_path):
    stack = PatchStack(tiny_llama, tmp_path / "adapters")
    assert stack.load() == []
    infos = [stack.import_(star_adapters[0]), stack.add(star_repair(tiny_llama, CASES[1]))]
    assert [i.id for i in stack.list()] == [i.id for i in infos]
    after = snapshot(tiny_llama)

    restarted = make_tiny("llama", tokenizer)                     # a new process: the base model again
    assert complete(restarted, CASES[0].prompt) != CASES[0].fix
    again = PatchStack(restarted, tmp_path / "adapters")
    assert again.load() == []
    assert again.applied == [i.id for i in infos]
    assert same_weights(restarted, after)                         # the same bits as in the first session
    assert [complete(restarted, c.prompt) for c in CASES[:2]] == [c.fix for c in CASES[:2]]
    assert all(r.fixed for r in again.verify())


def test_disable_and_remove_restore_the_base_columns_bit_exactly(tiny_llama, tmp_path):
    base = snapshot(tiny_llama)
    stack = PatchStack(tiny_llama, tmp_path)
    stack.load()
    first = stack.add(fake_result(tiny_llama, hand_patch(tiny_llama, seed=1), CASES[0]))
    only_first = snapshot(tiny_llama)
    second = stack.add(fake_result(tiny_llama, hand_patch(tiny_llama, seed=2), CASES[1]))
    both = snapshot(tiny_llama)
    assert not same_weights(tiny_llama, base) and not same_weights(tiny_llama, only_first)

    stack.set_enabled(first.id, False)
    stack.set_enabled(second.id, False)
    assert same_weights(tiny_llama, base) and stack.applied == []
    stack.set_enabled(first.id, True)
    assert same_weights(tiny_llama, only_first)
    stack.set_enabled(second.id, True)
    assert same_weights(tiny_llama, both)
    assert json.loads((tmp_path / "stack.json").read_text())["enabled"] == {first.id: True, second.id: True}

    undone = stack.undo_last()
    assert undone.id == second.id and not (tmp_path / second.id).exists()
    assert same_weights(tiny_llama, only_first)
    stack.remove(first.id[:6])                                    # a unique prefix is enough
    assert same_weights(tiny_llama, base) and stack.list() == [] and stack.undo_last() is None


def test_a_patch_that_breaks_an_earlier_case_is_refused_unless_keep_going(star_adapters, tiny_llama, tmp_path):
    stack = PatchStack(tiny_llama, tmp_path)
    stack.load()
    first = stack.import_(star_adapters[0])
    before = snapshot(tiny_llama)
    listing = folder_listing(tmp_path)
    # A second "fix" that takes the first patch's deltas back out breaks the first case.
    patch = load_adapter(make_tiny("llama", tiny_llama.tokenizer), first.path).patch
    undo_first = Patch({l: LayerDelta(ld.columns, -ld.delta) for l, ld in patch.layers.items()})
    with pytest.raises(RegressionError, match="breaks 1 case") as err:
        stack.add(fake_result(tiny_llama, undo_first, CASES[2]))
    assert "\n" not in str(err.value) and err.value.rows[0].fix == CASES[0].fix
    assert same_weights(tiny_llama, before) and folder_listing(tmp_path) == listing   # nothing changed

    info = stack.add(fake_result(tiny_llama, undo_first, CASES[2]), keep_going=True)
    assert info.applied and "breaks" in info.messages[0]
    rows = {r.id: r for r in stack.verify()}
    assert not rows[stack.applied[0]].fixed


def test_three_patches_from_two_users_stack_and_verify(star_adapters, tokenizer, tmp_path):
    alice, bob = make_tiny("llama", tokenizer), make_tiny("llama", tokenizer)
    a = PatchStack(alice, tmp_path / "alice")
    b = PatchStack(bob, tmp_path / "bob")
    a.load(), b.load()
    a.import_(star_adapters[0])                                   # Alice's first repair
    a.add(star_repair(alice, CASES[1]))                           # ... and her second, on top of it
    shared = b.import_(star_adapters[2])                          # Bob's repair, made on the bare model
    (tmp_path / "share").mkdir()
    archive = b.export(shared.id, tmp_path / "share")
    assert archive.name == f"{shared.id}.star.zip" and zipfile.is_zipfile(archive)

    imported = a.import_(archive)
    assert imported.id == shared.id and len(a.applied) == 3
    rows = a.verify()
    assert [(r.fix, r.fixed) for r in rows] == [(c.fix, True) for c in CASES]
    with pytest.raises(AdapterError, match="already in the stack"):
        a.import_(archive)


def test_manifest_follows_the_folder(star_adapters, tiny_llama, tokenizer, tmp_path):
    dropped = SimpleNamespace(path=star_adapters[0])
    stack = PatchStack(tiny_llama, tmp_path / "mine")
    stack.load()
    shutil.copytree(dropped.path, tmp_path / "mine" / "by-hand")  # dropped in by hand
    assert stack.sync() == ["applied by-hand"]
    assert json.loads((tmp_path / "mine" / "stack.json").read_text())["order"] == ["by-hand"]
    assert complete(tiny_llama, CASES[0].prompt) == CASES[0].fix

    shutil.rmtree(tmp_path / "mine" / "by-hand")                   # deleted by hand
    messages = stack.sync()
    assert any("gone" in m for m in messages) and "removed by-hand" in messages
    assert stack.list() == []

    (tmp_path / "mine" / "stack.json").write_text("{not json")     # damaged manifest: rebuilt
    shutil.copytree(dropped.path, tmp_path / "mine" / "again")
    fresh = PatchStack(make_tiny("llama", tokenizer), tmp_path / "mine")
    messages = fresh.load()
    assert any("unreadable" in m for m in messages) and fresh.applied == ["again"]


def test_an_invalid_enabled_adapter_is_reported_and_skipped(tiny_llama, tmp_path):
    stack = PatchStack(tiny_llama, tmp_path)
    stack.load()
    info = stack.add(fake_result(tiny_llama, hand_patch(tiny_llama)))
    with open(info.path / WEIGHTS_NAME, "r+b") as f:
        f.truncate(100)
    base = make_tiny("llama", tiny_llama.tokenizer)
    again = PatchStack(base, tmp_path)
    [message] = again.load()
    assert info.id in message and "truncated" in message
    assert again.applied == [] and again.list()[0].problem


# -- validation: bad files change nothing -----------------------------------------------------------------


@pytest.fixture
def good_adapter(tokenizer, tmp_path) -> Path:
    lm = make_tiny("llama", tokenizer)
    return save_adapter(lm, fake_result(lm, hand_patch(lm)), tmp_path / "colleague" / "good")


def _corrupt(d: Path):
    data = bytearray((d / WEIGHTS_NAME).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / WEIGHTS_NAME).write_bytes(bytes(data))


def _bad_header(d: Path):
    data = (d / WEIGHTS_NAME).read_bytes()
    (d / WEIGHTS_NAME).write_bytes(data[:8] + b"#" * (len(data) - 8))


def _truncate(d: Path):
    data = (d / WEIGHTS_NAME).read_bytes()
    (d / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


def _pickle(d: Path):
    tensors = load_file(d / WEIGHTS_NAME)
    (d / WEIGHTS_NAME).unlink()
    torch.save(tensors, d / "adapter_model.bin")


def _wrong_shape(d: Path):
    tensors = load_file(d / WEIGHTS_NAME)
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    rewrite_weights(d, tensors)


def _not_finite(d: Path):
    tensors = load_file(d / WEIGHTS_NAME)
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    rewrite_weights(d, tensors)


def _int_dtype(d: Path):
    tensors = load_file(d / WEIGHTS_NAME)
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = tensors[key].to(torch.int32)
    rewrite_weights(d, tensors)


def _extra_key(d: Path):
    tensors = load_file(d / WEIGHTS_NAME)
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(1, 4)
    rewrite_weights(d, tensors)


def _alpha(d: Path):
    config = json.loads((d / CONFIG_NAME).read_text())
    config["alpha_pattern"] = {k: 2 * v for k, v in config["alpha_pattern"].items()}
    (d / CONFIG_NAME).write_text(json.dumps(config))


def _dora(d: Path):
    config = json.loads((d / CONFIG_NAME).read_text())
    config["use_dora"] = True
    (d / CONFIG_NAME).write_text(json.dumps(config))


def _no_sidecar(d: Path):
    (d / META_NAME).unlink()


def _wrong_weights(d: Path):
    meta = json.loads((d / META_NAME).read_text())   # as if made on another checkpoint of the same model
    meta["base_model"]["weights_sha256"]["1"] = "0" * 64
    (d / META_NAME).write_text(json.dumps(meta))


BAD = {
    "corrupted": (_corrupt, "corrupted"),
    "corrupted-header": (_bad_header, "corrupted"),
    "truncated": (_truncate, "truncated"),
    "pickle": (_pickle, "pickle"),
    "wrong-shape": (_wrong_shape, r"do not fit this model"),
    "not-finite": (_not_finite, "non-finite"),
    "int-dtype": (_int_dtype, "dtype I32"),
    "extra-key": (_extra_key, "unexpected tensor"),
    "alpha": (_alpha, "expected r"),
    "dora": (_dora, "use_dora"),
    "no-sidecar": (_no_sidecar, "star.json"),
    "wrong-weights": (_wrong_weights, "different base model"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_adapters_are_rejected_with_one_line_and_change_nothing(kind, good_adapter, tiny_llama, tmp_path, monkeypatch):
    spoil, message = BAD[kind]
    spoil(good_adapter)
    # Never unpickle, whatever the file says.
    def no_pickle(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)

    stack = PatchStack(tiny_llama, tmp_path / "mine")
    stack.load()
    stack.add(fake_result(tiny_llama, hand_patch(tiny_llama, seed=7), CASES[1]))
    before, listing = snapshot(tiny_llama), folder_listing(tmp_path / "mine")
    archive = tmp_path / "bad.star.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in good_adapter.iterdir():
            z.write(p, f"bad/{p.name}")
    for source in (good_adapter, archive):
        with pytest.raises(AdapterError, match=message) as err:
            stack.import_(source)
        assert "\n" not in str(err.value)
        assert same_weights(tiny_llama, before) and folder_listing(tmp_path / "mine") == listing


@pytest.mark.parametrize("selection, targeted", [
    ({"exclude_modules": ["model.layers.1.mlp.down_proj"]}, False),
    ({"layers_to_transform": [2]}, False),
    ({"layers_to_transform": [1, 2]}, True),
])
def test_the_modules_an_adapter_targets_are_those_peft_targets(selection, targeted, good_adapter, tokenizer):
    config = json.loads((good_adapter / CONFIG_NAME).read_text())
    config |= {"target_modules": ["down_proj"]} | selection            # peft's suffix match, then the selection
    (good_adapter / CONFIG_NAME).write_text(json.dumps(config))
    lm = make_tiny("llama", tokenizer)
    if targeted:
        assert sorted(load_adapter(lm, good_adapter).patch.layers) == [1, 2]
    else:
        with pytest.raises(AdapterError, match="does not target model.layers.1.mlp.down_proj"):
            load_adapter(lm, good_adapter)


def test_an_adapter_for_another_model_is_rejected(good_adapter, tokenizer, tmp_path):
    for lm, message in [
        (make_tiny("llama", tokenizer, seed=1), "different base model"),   # same shapes, other weights
        (make_tiny("gpt2", tokenizer), "different model"),
    ]:
        before = snapshot(lm)
        stack = PatchStack(lm, tmp_path / lm.name)
        stack.load()
        with pytest.raises(AdapterError, match=message):
            stack.import_(good_adapter)
        assert same_weights(lm, before) and stack.list() == []


def test_size_limit(good_adapter, tiny_llama, tmp_path):
    stack = PatchStack(tiny_llama, tmp_path / "mine", max_bytes=10_000)
    stack.load()
    with pytest.raises(AdapterError, match="over the"):
        stack.import_(good_adapter)


@pytest.mark.parametrize(
    "members, message",
    [
        ({"../evil/adapter_config.json": b"{}"}, "unsafe path"),
        ({"/abs/star.json": b"{}"}, "unsafe path"),
        ({"x/adapter_model.bin": b"\x80\x04"}, "pickle"),
        ({"x/run.sh": b"rm -rf /"}, "unexpected file"),
        ({"x/star.json": b"{}"}, "missing"),
    ],
)
def test_malicious_or_incomplete_archives_are_rejected(members, message, tiny_llama, tmp_path):
    archive = tmp_path / "x.star.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    stack = PatchStack(tiny_llama, tmp_path / "mine")
    stack.load()
    with pytest.raises(AdapterError, match=message):
        stack.import_(archive)
    assert not (tmp_path / "evil").exists() and stack.list() == []
    (tmp_path / "junk.star.zip").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(AdapterError, match="zip"):
        stack.import_(tmp_path / "junk.star.zip")


# -- atomicity: kill -9 while writing ---------------------------------------------------------------------

def _big_tiny(tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from star_engine.model import from_modules

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return from_modules(AutoModelForCausalLM.from_config(cfg), tokenizer, name="big-tiny")


def _write_forever(folder: Path, tokenizer, ready) -> None:
    """Add ~10 MB adapters to the stack in `folder` until killed; `ready` once the first one is in."""
    lm = _big_tiny(tokenizer)
    stack = PatchStack(lm, folder, check_regressions=False)
    stack.load()
    n = len(stack.list())
    while True:
        n += 1
        patch = Patch({l: LayerDelta(torch.arange(1024), torch.full((256, 1024), 1e-3 * n)) for l in range(8)})
        saved = apply_patch(lm.arch, patch)
        report = CaseReport(f"# case {n}\n", "pass", "?", "pass", True, 0.0, 1.0)
        stack.add(RepairResult(True, "", "hand", {}, 0.0, [report], patch, saved))
        ready.set()


def test_kill_9_while_saving_leaves_a_loadable_folder(tokenizer, tmp_path):
    """A writer process adds ~10 MB adapters in a loop; SIGKILL it at random moments; the folder must load
    with every listed adapter valid, none half-written, and the stack must only ever grow."""
    folder = tmp_path / "adapters"
    rng = torch.Generator().manual_seed(1234)
    seen = 0
    for round_ in range(3):
        proc, ready = forked(_write_forever, folder, tokenizer)
        assert ready.wait(60), f"the writer exited with {proc.exitcode}"   # one add completed: now in the loop
        # Round 0: kill while an adapter directory is half written; round 1: while the manifest's temp file
        # exists; round 2: at a random moment.
        prefix = {0: ".tmp-", 1: ".stack.json.tmp-"}.get(round_)
        deadline = time.monotonic() + (10 if prefix else float(torch.rand(1, generator=rng)) * 0.4)
        while time.monotonic() < deadline:
            if prefix and any(n.startswith(prefix) for n in os.listdir(folder)):
                break
        kill_9(proc)
        leftovers = sorted(n for n in os.listdir(folder) if n.startswith(".") and n != ".lock")
        print(f"round {round_}: killed with {leftovers or 'no'} temp file(s) present")

        lm = _big_tiny(tokenizer)
        stack = PatchStack(lm, folder, check_regressions=False)
        problems = stack.load()
        infos = stack.list()
        assert all(i.problem is None for i in infos), problems
        assert stack.applied == [i.id for i in infos]
        assert len(infos) >= seen + 1                          # previous state kept, plus what finished
        seen = len(infos)
        for i in infos:
            load_adapter(lm, i.path, base_digest=stack.base_digest)   # every listed adapter is whole
        assert all(problem.startswith("ignored") is False for problem in problems)


# -- hot reload -------------------------------------------------------------------------------------------


def test_hot_reload_applies_a_dropped_adapter_and_undoes_a_removed_one(star_adapters, tiny_llama, tmp_path):
    case = CASES[0]
    made = SimpleNamespace(path=star_adapters[0], id="fix-from-a-colleague")

    base = snapshot(tiny_llama)
    watched = tmp_path / "watched"
    stack = PatchStack(tiny_llama, watched)
    stack.load()
    changes, got = [], threading.Event()

    def on_change(messages):
        changes.append(messages)
        got.set()

    with stack.watch(on_change, debounce=0.2):
        assert complete(tiny_llama, case.prompt) != case.fix
        # A partial write under a temp name is ignored.
        (watched / ".tmp-partial").mkdir()
        (watched / ".tmp-partial" / WEIGHTS_NAME).write_bytes(b"\0" * 100)
        time.sleep(0.8)
        assert changes == []
        # Copy in under a temp name, then rename: the next completion is the fix.
        shutil.copytree(made.path, watched / ".incoming")
        started = time.perf_counter()
        os.rename(watched / ".incoming", watched / made.id)
        assert got.wait(10), "no hot reload"
        latency = time.perf_counter() - started
        with stack.lock:
            assert complete(tiny_llama, case.prompt) == case.fix
        assert changes[-1] == [f"applied {made.id}"]
        print(f"hot-reload latency {latency * 1000:.0f} ms")

        # A malformed drop is reported and changes nothing.
        got.clear()
        applied = snapshot(tiny_llama)
        (watched / "junk").mkdir()
        (watched / "junk" / WEIGHTS_NAME).write_bytes(b"not an adapter")
        assert got.wait(10)
        assert changes[-1][0].startswith("ignored junk:") and same_weights(tiny_llama, applied)
        shutil.rmtree(watched / "junk")

        # Removing the directory undoes the patch exactly.
        got.clear()
        shutil.move(str(watched / made.id), str(tmp_path / "taken-out"))
        assert got.wait(10)
        with stack.lock:
            assert same_weights(tiny_llama, base)
            assert complete(tiny_llama, case.prompt) != case.fix


# -- CLI --------------------------------------------------------------------------------------------------


def test_cli_round_trip(star_adapters, tiny_model_dir, tmp_path):
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    shutil.copytree(star_adapters[0], mine / "first")
    first = SimpleNamespace(id="first")
    shutil.copytree(star_adapters[2], theirs / "shared-fix")
    shared = SimpleNamespace(id="shared-fix")
    opts = ["--dir", str(mine), "--model", str(tiny_model_dir)]

    code, out, _ = run_cli("adapters", *opts, "list")
    [row] = [line.split() for line in out.splitlines() if line.split()[1:2] == [first.id]]
    assert code == 0 and row[2] == "yes"                     # dropped in by hand: listed and enabled
    assert not any(line.startswith("!") for line in out.splitlines())   # with no problem reported
    code, out, _ = run_cli("adapters", "--dir", str(theirs), "export", shared.id[:5], str(tmp_path))
    assert code == 0 and (tmp_path / f"{shared.id}.star.zip").is_file()
    code, out, err = run_cli("adapters", *opts, "import", str(tmp_path / f"{shared.id}.star.zip"))
    assert code == 0, err
    code, out, _ = run_cli("adapters", *opts, "verify")
    assert code == 0 and out.count(" yes") == 2 and "2 of 2" in out
    code, out, _ = run_cli("adapters", *opts, "show", first.id, "--json")
    assert json.loads(out)["star"]["cases"][0]["fix"] == CASES[0].fix
    code, out, _ = run_cli("adapters", "disable", first.id, *opts)      # options after the subcommand too
    assert code == 0 and json.loads((mine / "stack.json").read_text())["enabled"][first.id] is False
    code, out, _ = run_cli("adapters", *opts, "verify")
    assert code == 0 and "(disabled) no" in out
    code, out, _ = run_cli("adapters", *opts, "enable", first.id)
    assert code == 0
    code, out, _ = run_cli("adapters", *opts, "remove", first.id)
    assert code == 0 and not (mine / first.id).exists()
    code, out, err = run_cli("adapters", *opts, "show", "nope")
    assert code == 2 and err.startswith("star: error: no adapter 'nope'") and err.count("\n") == 1
    (tmp_path / "evil.bin").write_bytes(b"\x80\x04K\x01.")
    code, out, err = run_cli("adapters", *opts, "import", str(tmp_path / "evil.bin"))
    assert code == 2 and "star: error:" in err and err.strip().count("\n") <= 1


def test_cli_repair_save_writes_a_peft_adapter(tiny_model_dir, tmp_path):
    def repair_and_save():
        return run_cli("repair", "--model", str(tiny_model_dir), "--locality-budget", "1", "--prompt", CASES[0].prompt,
                       "--fix", CASES[0].fix, "--set", "lr=0.1", "--save", str(tmp_path / "fix"), "--json")

    code, out, err = repair_and_save()
    assert code == 0, err
    assert json.loads(out)["adapter"] == str(tmp_path / "fix")
    assert json.loads((tmp_path / "fix" / CONFIG_NAME).read_text())["base_model_name_or_path"] == str(
        tiny_model_dir.resolve()
    )
    # the server's keep-or-undo policy: a patch that cannot be saved is not kept, and the repair says why
    code, out, _ = repair_and_save()
    reply = json.loads(out)
    assert code == 1 and not reply["fixed"] and reply["adapter"] is None
    assert reply["reason"].startswith("the patch was not kept:") and "already exists" in reply["reason"]
