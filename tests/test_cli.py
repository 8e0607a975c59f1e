"""The `star` command line: its commands run in this process (helpers.run_cli: main(argv), its exit code,
stdout and stderr), and the real `star` executable for what only a process shows (the console script, the
exit code through sys.exit, stdout and stderr as the shell sees them)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_cli
from star_engine.model import DEFAULT_MODEL, converted_dir

STAR = str(Path(sys.executable).with_name("star"))


def run_star(*args, timeout=300):
    return subprocess.run([STAR, *args], capture_output=True, text=True, timeout=timeout,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"})


def assert_one_line_error(code: int, stderr: str, fragment: str) -> None:
    assert code != 0
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("star: error:"), stderr
    assert fragment in lines[0]


def test_repair_json_on_a_tiny_model(tiny_model_dir):
    code, out, err = run_cli("repair", "--model", str(tiny_model_dir), "--locality-budget", "1", "--prompt",
                             "def add(a, b):\n    return a +", "--fix", " b", "--set", "lr=0.1", "--json")
    assert code == 0, err
    out = json.loads(out)
    assert out["fixed"] is True and out["after"] == " b" and out["before"] != " b"
    assert {"seconds", "layers", "neurons", "before", "after"} <= set(out)
    assert out["neurons"] > 0 and out["layers"]


def test_prompt_and_fix_from_files(tiny_model_dir, tmp_path):
    (tmp_path / "p.py").write_text("def add(a, b):\n    return a +")
    (tmp_path / "f.txt").write_text(" b")
    code, out, err = run_cli("repair", "--model", str(tiny_model_dir), "--locality-budget", "1", "--prompt-file",
                             str(tmp_path / "p.py"), "--fix-file", str(tmp_path / "f.txt"), "--set", "lr=0.1")
    assert code == 0, err
    assert "fixed by star" in out


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
def test_bad_input_gives_one_line_and_nonzero_exit(tiny_model_dir, args, fragment):
    code, _, err = run_cli("repair", "--model", str(tiny_model_dir), *args)
    assert_one_line_error(code, err, fragment)


def test_unknown_model_names_what_to_give(tmp_path):
    code, _, err = run_cli("repair", "--model", "no-such-model", "--prompt", "x", "--fix", "y")
    assert_one_line_error(code, err, "unknown model")
    proc = run_star("model", "path", "--model", str(tmp_path / "missing.gguf"))     # the real executable
    assert_one_line_error(proc.returncode, proc.stderr, "no such GGUF")


def test_model_path_prints_the_cached_hf_directory(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("STAR_CACHE_DIR", str(tmp_path))
    shutil.copytree(tiny_model_dir, converted_dir(DEFAULT_MODEL))     # as `star model install` leaves it
    proc = run_star("model", "path")                                   # the real executable
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == converted_dir(DEFAULT_MODEL)
