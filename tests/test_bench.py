"""`star bench` end to end: on a tiny random model (fast, every output and mode) and, slow, 3 cases on
the real default model with all four methods."""

import json
from pathlib import Path

import pytest

from helpers import same_weights, snapshot
from star_engine.bench import data as bench_data
from star_engine.bench.cli import parse_method_settings
from star_engine.adapters import PatchStack
from star_engine.bench.runner import ABLATION, Variant, run_sequential, variants
from star_engine.cli import main

SHARED = Path(__file__).resolve().parents[1].parent / "shared"   # ../shared beside the checkout

RECORDS = [
    {"id": "r1", "intent": "add a and b", "target": "a + b", "intent_alt": "sum of a and b"},
    {"id": "r2", "intent": "reverse list x", "target": "x.reverse()"},
    {"id": "r3", "intent": "reverse the list x in place", "target": "x.reverse()"},
    {"id": "r4", "intent": "length of s", "target": "len(s)"},
    {"id": "r5", "intent": "print hello", "target": "print('hello')"},
    {"id": "r6", "intent": "sort y", "target": "y.sort()"},
]
TINY_SETTINGS = ["--set", "star.lr=0.1", "--set", "star.steps=40", "--set", "sgd.lr=1.0", "--set", "lora.lr=0.05",
                 "--set", "mint.blend=10", "--set", "mint.layers=all"]


@pytest.fixture
def records_file(tmp_path):
    path = tmp_path / "conala-mini.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def test_templates_and_kinds():
    assert bench_data.guess_kind("../shared/data/conala/dev.jsonl") == "python"
    assert bench_data.guess_kind("../shared/data/nl2bash/dev.jsonl") == "bash"
    assert bench_data.guess_kind("shellcode_ia32/dev.jsonl") == "asm"
    assert bench_data.prompt_for("python", "sort y") == "# sort y\n"
    assert bench_data.prompt_for("bash", "list files") == "#!/bin/bash\n# list files\n"


def test_settings_and_variants():
    assert parse_method_settings(["star.layer_ratio=0.25", "mint.max_patches=3"]) == {
        "star": {"layer_ratio": "0.25"}, "mint": {"max_patches": "3"}}
    rows = variants(["star", "sgd"], {"star": {"bisections": "3"}}, ablation=True)
    assert [r.label for r in rows[:2]] == ["star", "sgd"] and len(rows) == 2 + len(ABLATION)
    assert all(r.overrides["bisections"] == "3" for r in rows if r.method == "star")
    with pytest.raises(ValueError):
        variants(["star"], {"star": {"nope": "1"}}, ablation=False)
    picked = variants([], {}, ablation="token,layer 1/16")
    assert [r.label for r in picked] == ["star[all layers, dense, token]", "star[layer 1/16]"]


def test_cases_alternates_and_controls(tiny_llama, records_file):
    records = bench_data.load_records(records_file)
    data = bench_data.build(tiny_llama, records, kind="python", limit=3, seed=0, n_controls=2)
    assert len(data.cases) == 3 and len(data.controls) == 2
    again = bench_data.build(tiny_llama, records, kind="python", limit=3, seed=0, n_controls=2)
    assert [c.record["id"] for c in again.cases] == [c.record["id"] for c in data.cases]
    by_id = {c.record["id"]: c for c in data.cases}
    for rid, n_alt in {"r1": 1, "r2": 1, "r3": 1, "r4": 0, "r5": 0, "r6": 0}.items():
        if rid in by_id:
            assert len(by_id[rid].alternates) == n_alt
    case_targets = {c.record["target"] for c in data.cases}
    control_prompts = {c.prompt_ids for c in data.controls}
    for r in records:
        if r["target"] in case_targets:
            assert tuple(tiny_llama.tokenizer(bench_data.prompt_for("python", r["intent"]),
                                              add_special_tokens=False)["input_ids"]) not in control_prompts


def _run(monkeypatch, lm, records_file, out, *extra):
    import star_engine.model

    monkeypatch.setattr(star_engine.model, "load_model", lambda spec=None: lm)
    before = snapshot(lm)
    # The locality guard is off: any change moves a random model's predictions.
    rc = main(["bench", "--data", str(records_file), "--limit", "3", "--controls", "2", "--out", str(out),
               "--no-guard", *TINY_SETTINGS, *extra])
    assert rc == 0
    assert same_weights(lm, before)      # the bench leaves the model as it found it
    return json.loads((out / "results.json").read_text())


def test_bench_on_a_tiny_model_writes_every_output(monkeypatch, tiny_llama, records_file, tmp_path):
    res = _run(monkeypatch, tiny_llama, records_file, tmp_path / "a", "--sequential", "--compose")
    assert set(res) == {"star", "mint", "sgd", "lora", "meta"}
    for m in ("star", "mint", "sgd", "lora"):
        r = res[m]
        for key in ("em_before", "em_after", "fix_rate", "generalization", "specificity", "seconds_per_case",
                    "neurons_per_case", "layers_per_case", "n_cases", "sequential", "compose", "locality",
                    "locality_worst", "locality_dnll", "adapter_bytes_median", "neurons_median"):
            assert key in r, (m, key)
        seq = r["sequential"]
        assert seq["kept"] + seq["refused"] + seq["unfixed"] + seq["already_written"] == 3
        assert 0 <= seq["final_locality_unchanged"] <= 1
        assert r["n_cases"] == 3 and 0 <= r["fix_rate"] <= 1
        assert r["em_after"] >= r["em_before"] or r["fix_rate"] < 1
        assert r["generalization_detail"]["n_prompts"] >= 1
    assert res["star"]["fix_rate"] == 1.0
    assert 0 <= res["star"]["locality_worst"] <= res["star"]["locality"] <= 1
    assert res["star"]["adapter_bytes_median"] > 0 and res["star"]["compose"]["pairs"] == 1
    compose = res["star"]["compose"]
    assert (compose["both_hold"] == 1) == (compose["fixes_broken"] == 0)
    assert isinstance(compose["lead_drop_median"], float)
    assert set(res["meta"]["time_ratios"]) == {"star/mint", "star/sgd", "star/lora"}
    assert set(res["meta"]["method_time_ratios"]) == {"star/mint", "star/sgd", "star/lora"}
    for m in ("star", "mint", "sgd", "lora"):
        assert 0 < res[m]["method_seconds_per_case"] < res[m]["seconds_per_case"]
    report = (tmp_path / "a" / "report.md").read_text()
    assert "| star |" in report and "| mint |" in report and "Sequential" in report and "## Locality" in report
    assert "Ranked by the selection rule" in report and "Method-time ratios" in report
    for png in ("em_before_after.png", "seconds_per_case.png", "generalization_vs_specificity.png"):
        assert (tmp_path / "a" / png).read_bytes()[:4] == b"\x89PNG"


def test_sequential_only_runs_the_cases_in_a_row_and_reports_that_table_first(monkeypatch, tiny_llama, records_file,
                                                                              tmp_path, capsys):
    res = _run(monkeypatch, tiny_llama, records_file, tmp_path / "s", "--sequential-only", "--methods", "star")
    assert set(res) == {"star", "meta"} and set(res["star"]) == {"sequential"}
    seq = res["star"]["sequential"]
    assert seq["kept"] + seq["refused"] + seq["unfixed"] + seq["already_written"] == 3
    report = (tmp_path / "s" / "report.md").read_text()
    assert "## Locality" not in report and not list((tmp_path / "s").glob("*.png"))
    assert "| star | 3 |" in capsys.readouterr().out      # the printed table is the sequential one


def test_sequential_run_can_leave_its_stack_in_a_folder(tiny_llama, records_file, tmp_path):
    data = bench_data.build(tiny_llama, bench_data.load_records(records_file), kind="python", limit=3, seed=0,
                            n_controls=0)
    # The paper's dense sign steps: on a tiny random model the sparse least-change patches can move a column
    # past the 100x its norm that the stack accepts on reload (real models: ~0.1x), and this is about the folder.
    star = Variant("star", "star", {"lr": "0.1", "mode": "token", "sparsity": "none", "protect": "none",
                                    "direction": "seme", "step_rule": "fixed", "steps": "10"})
    before = snapshot(tiny_llama)
    folder = tmp_path / "stack"
    seq = run_sequential(tiny_llama, data, star, guard=None, keep_in=folder)
    assert same_weights(tiny_llama, before) and seq["kept"] >= 1
    with pytest.raises(ValueError, match="not empty"):
        run_sequential(tiny_llama, data, star, guard=None, keep_in=folder)
    stack = PatchStack(tiny_llama, folder)
    try:
        assert stack.load() == [] and len(stack.applied) == seq["kept"]     # the kept patches, loadable as left
        assert not same_weights(tiny_llama, before)
    finally:
        for _ in stack.applied:
            stack.undo_last()
    assert same_weights(tiny_llama, before)


def test_bench_is_deterministic_for_a_seed(monkeypatch, tiny_llama, records_file, tmp_path):
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds_per_case", "method_seconds_per_case", "cases")}
    a = _run(monkeypatch, tiny_llama, records_file, tmp_path / "a", "--methods", "star,lora", "--seed", "3")
    b = _run(monkeypatch, tiny_llama, records_file, tmp_path / "b", "--methods", "star,lora", "--seed", "3")
    for m in ("star", "lora"):
        assert strip(a[m]) == strip(b[m])
        assert [c["fixed"] for c in a[m]["cases"]] == [c["fixed"] for c in b[m]["cases"]]


@pytest.mark.slow
def test_three_case_bench_on_the_default_model(default_lm, monkeypatch, tmp_path):
    import star_engine.model

    monkeypatch.setattr(star_engine.model, "load_model", lambda spec=None: default_lm)
    before = snapshot(default_lm)
    out = tmp_path / "bench"
    # short targets keep the CI run small; MINT gets the same cases as everyone else
    rc = main(["bench", "--data", str(SHARED / "data" / "conala" / "dev.jsonl"), "--limit", "3", "--max-target-tokens", "8",
               "--controls", "5", "--out", str(out)])
    assert rc == 0
    assert same_weights(default_lm, before)
    res = json.loads((out / "results.json").read_text())
    assert {"star", "mint", "sgd", "lora"} <= set(res)
    assert all(res[m]["n_cases"] == 3 for m in ("star", "mint", "sgd", "lora"))
    assert res["star"]["fix_rate"] > 0
    assert (out / "report.md").exists() and len(list(out.glob("*.png"))) == 3
