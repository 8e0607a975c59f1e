"""The `star` command line, run as a real subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_tiny

STAR = str(Path(sys.executable).with_name("star"))


def run_star(*args, timeout=300):
    return subprocess.run([STAR, *args], capture_output=True, text=True, timeout=timeout,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    lm = make_tiny("llama", tokenizer)
    lm.model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def assert_one_line_error(proc, fragment):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("star: error:"), proc.stderr
    assert fragment in lines[0]


def test_repair_json_on_a_tiny_model(tiny_dir):
    proc = run_star("repair", "--model", str(tiny_dir), "--locality-budget", "1", "--prompt", "def add(a, b):\n    return a +",
                    "--fix", " b", "--set", "lr=0.1", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["fixed"] is True and out["after"] == " b" and out["before"] != " b"
    assert {"seconds", "layers", "neurons", "before", "after"} <= set(out)
    assert out["neurons"] > 0 and out["layers"]


def test_prompt_and_fix_from_files(tiny_dir, tmp_path):
    (tmp_path / "p.py").write_text("def add(a, b):\n    return a +")
    (tmp_path / "f.txt").write_text(" b")
    proc = run_star("repair", "--model", str(tiny_dir), "--locality-budget", "1", "--prompt-file", str(tmp_path / "p.py"),
                    "--fix-file", str(tmp_path / "f.txt"), "--set", "lr=0.1")
    assert proc.returncode == 0, proc.stderr
    assert "fixed by star" in proc.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--prompt", "x = ", "--fix", ""], "fix is empty"),
        (["--prompt", "x " * 400, "--fix", "1"], "context window"),
        (["--prompt", "x = ", "--fix", "1", "--method", "nope"], "unknown repair method"),
        (["--prompt", "x = ", "--fix", "1", "--set", "mode=sideways"], "one of"),
        (["--prompt", "x = "], "--fix"),
        (["--prompt-file", "/nonexistent", "--fix", "1"], "cannot read"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(tiny_dir, args, fragment):
    assert_one_line_error(run_star("repair", "--model", str(tiny_dir), *args), fragment)


def test_unknown_model_names_what_to_give(tmp_path):
    assert_one_line_error(run_star("repair", "--model", "no-such-model", "--prompt", "x", "--fix", "y"),
                          "unknown model")
    assert_one_line_error(run_star("model", "path", "--model", str(tmp_path / "missing.gguf")), "no such GGUF")


def test_model_path_prints_the_cached_hf_directory():
    proc = run_star("model", "path")
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip())
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
