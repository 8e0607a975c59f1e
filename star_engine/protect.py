"""What a patch must not move: the second moment of the neuron activations on normal code.

    C_l = E[z zᵀ]   (d_ff x d_ff), z = the input of layer l's FFN output projection, over every token of
                    the "stat" half of the code corpus (star_engine.corpus)

A change ΔW_l of the output projection moves the layer's output on a corpus token by ΔW_l z, so its mean
squared effect on normal code is tr(ΔW_l C_l ΔW_lᵀ): the quantity the protected solve keeps small.

Computed once per model (a progress bar; a few minutes on 2 CPU cores for the default model), cached as
one safetensors file in the star cache keyed by the model's fingerprint and the corpus digest, loaded
lazily on first use. A cache file that is truncated, corrupt, or made for another model or corpus is
recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .corpus import CorpusSpec, corpus_windows, windows_digest
from .hooks import record_activations
from .model import LoadedModel, cache_root

STAT_VERSION = 1
STAT_CORPUS = CorpusSpec(split="stat", n_tokens=100_352)   # 392 windows of 256 tokens
SMALL_MODEL_TOKENS = 8_192   # a model with d_ff under 1024 (the tests' tiny ones) needs far fewer samples
_BATCH = 4


@dataclass
class CorpusStatistic:
    """C_l per layer, held in bfloat16 as it is cached (half of float32: 1.1 GB instead of 2.3 GB for
    Qwen2.5-Coder-0.5B), read out in float32 only where a solve needs it: its diagonal, a column, the block
    of the chosen neurons."""

    second_moment: dict[int, torch.Tensor]   # layer -> C_l (d_ff, d_ff), bfloat16
    n_tokens: int

    def diag(self, layer: int) -> torch.Tensor:
        return self.second_moment[layer].diagonal().to(torch.float32, copy=True)

    def column(self, layer: int, j: int) -> torch.Tensor:
        return self.second_moment[layer][:, j].to(torch.float32, copy=True)

    def block(self, layer: int, idx: torch.Tensor) -> torch.Tensor:
        return self.second_moment[layer][idx][:, idx].to(torch.float32)

    def dense(self, layer: int) -> torch.Tensor:
        return self.second_moment[layer].to(torch.float32, copy=True)


def model_fingerprint(lm: LoadedModel) -> str:
    """sha256 of the model's config and every weight except the output projections (which patches change):
    the same base model gives the same fingerprint with or without patches applied."""
    if "fingerprint" not in lm.cache:
        patched = {id(lm.arch.weight(l)) for l in range(lm.arch.n_layers)}
        h = hashlib.sha256(json.dumps(lm.model.config.to_dict(), sort_keys=True, default=str).encode())
        for name, p in sorted(lm.model.state_dict(keep_vars=True).items()):
            if id(p) in patched:
                continue
            h.update(name.encode())
            h.update(p.detach().contiguous().view(torch.uint8).numpy())   # hashed in place, no copy
        lm.cache["fingerprint"] = h.hexdigest()
    return lm.cache["fingerprint"]


def _cache_file(lm: LoadedModel, corpus_digest: str) -> Path:
    key = hashlib.sha256(f"{model_fingerprint(lm)}:{corpus_digest}:{STAT_VERSION}".encode()).hexdigest()[:24]
    return cache_root() / "stats" / f"{lm.name.replace('/', '_')[:40]}-{key}.safetensors"


def _expected_meta(lm: LoadedModel, corpus_digest: str, n_tokens: int) -> dict[str, str]:
    return {
        "version": str(STAT_VERSION),
        "model_fingerprint": model_fingerprint(lm),
        "corpus_digest": corpus_digest,
        "n_tokens": str(n_tokens),
        "n_layers": str(lm.arch.n_layers),
        "d_ff": str(lm.arch.d_ff),
    }


def _read_cache(path: Path, expected: dict[str, str], n_layers: int, d_ff: int) -> dict[int, torch.Tensor] | None:
    """The cached moments, or None when the file is missing, corrupt or made for something else."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if f.metadata() != expected:
                return None
        tensors = load_file(str(path))
    except (OSError, SafetensorError, ValueError, RuntimeError):
        return None
    out = {}
    for layer in range(n_layers):
        t = tensors.get(f"layer.{layer}")
        if t is None or tuple(t.shape) != (d_ff, d_ff):
            return None
        t = t.to(torch.bfloat16)
        if not bool(torch.isfinite(t).all()):
            return None
        out[layer] = t
    return out


def _write_cache(path: Path, moments: dict[int, torch.Tensor], meta: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        # bf16 halves the file (fp32 range, 3 significant digits: plenty for a metric).
        save_file({f"layer.{l}": m.to(torch.bfloat16).contiguous() for l, m in moments.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@torch.no_grad()
def accumulate_second_moments(lm: LoadedModel, windows: list[tuple[int, ...]], *, progress: bool = True) -> dict[int, torch.Tensor]:
    """C_l = (1/N) Σ z zᵀ over every position of every window, for every layer."""
    layers = list(range(lm.arch.n_layers))
    d_ff = lm.arch.d_ff
    sums = {l: torch.zeros(d_ff, d_ff) for l in layers}
    n = 0
    backbone = getattr(lm.model, "base_model", lm.model)   # the LM head is not needed for the activations
    bar = tqdm(total=len(windows) * (len(windows[0]) if windows else 0), unit="tok", disable=not progress,
               desc="corpus statistic (once per model)")
    for b in range(0, len(windows), _BATCH):
        ids = torch.tensor(windows[b : b + _BATCH])
        with record_activations(lm.arch, layers) as acts:
            backbone(input_ids=ids)
        for l in layers:
            z = acts[l].reshape(-1, d_ff).float()
            sums[l].addmm_(z.T, z)
        n += ids.numel()
        bar.update(ids.numel())
    bar.close()
    return {l: s / max(n, 1) for l, s in sums.items()}


def corpus_statistic(lm: LoadedModel, *, progress: bool = True, spec: CorpusSpec | None = None) -> CorpusStatistic:
    """The model's protected statistic: from memory, else from the cache, else computed (and cached)."""
    spec = spec or _default_spec(lm)
    key = ("corpus_statistic", spec)
    if key in lm.cache:
        return lm.cache[key]
    windows = corpus_windows(lm, spec)
    if not windows:
        raise RuntimeError("the code corpus is empty: no Python standard library found")
    digest = windows_digest(windows)
    n_tokens = sum(map(len, windows))
    meta = _expected_meta(lm, digest, n_tokens)
    path = _cache_file(lm, digest)
    moments = _read_cache(path, meta, lm.arch.n_layers, lm.arch.d_ff)
    if moments is None:
        moments = accumulate_second_moments(lm, windows, progress=progress)
        try:
            _write_cache(path, moments, meta)
        except OSError:
            pass   # a read-only or full cache: the statistic is still used, just recomputed next time
        moments = {l: moments.pop(l).to(torch.bfloat16) for l in sorted(moments)}   # as a reload has them
    stat = CorpusStatistic(moments, n_tokens)
    lm.cache[key] = stat
    return stat


def _default_spec(lm: LoadedModel) -> CorpusSpec:
    """100k tokens for the default model; fewer for a tiny one, and for a wide one (the cost of C grows with
    d_ff², e.g. about 10k tokens for Qwen2.5-Coder-0.5B's 4864) so the one-off stays minutes, not hours."""
    d_ff = lm.arch.d_ff
    if d_ff < 1024:
        n = SMALL_MODEL_TOKENS
    else:
        n = max(SMALL_MODEL_TOKENS, min(STAT_CORPUS.n_tokens, int(STAT_CORPUS.n_tokens * (1536 / d_ff) ** 2)))
    return replace(STAT_CORPUS, n_tokens=n)


def statistic_path(lm: LoadedModel, spec: CorpusSpec | None = None) -> Path:
    """Where the statistic of this model is (or would be) cached."""
    return _cache_file(lm, windows_digest(corpus_windows(lm, spec or _default_spec(lm))))
