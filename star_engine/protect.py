"""What a patch must not move: second moments on both sides of each FFN output projection, on normal code.

    C_l = E[z zᵀ]   (d_ff x d_ff), z = the input of layer l's FFN output projection, over every token of
                    the "stat" half of the code corpus (star_engine.corpus)

A change ΔW_l of the output projection moves the layer's output on a corpus token by ΔW_l z, so its mean
squared effect on normal code is tr(ΔW_l C_l ΔW_lᵀ). The output side says which of those moves the
predictions notice:

    R_l = E[g gᵀ]   (d x d), g = the gradient of the next-token loss at a label drawn from the model itself,
                    with respect to layer l's FFN output, over 16k tokens of the same half

and tr(R_l ΔW_l C_l ΔW_lᵀ) is, to second order, twice the KL divergence the change adds on normal code
(K-FAC's two factors): the quantity the protected solve keeps small.

Each is computed once per model (a progress bar; a few minutes on 2 CPU cores for the default model), cached as
one safetensors file in the star cache keyed by the model's fingerprint and the corpus digest, loaded
lazily on first use. A cache file that is truncated, corrupt, or made for another model or corpus is
recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .corpus import CorpusSpec, corpus_windows, windows_digest
from .hooks import graph_from_the_embeddings, record_activations
from .locality import logits_batch
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


def _cache_file(lm: LoadedModel, corpus_digest: str, kind: str = "") -> Path:
    """`kind`: "" for C (the name it always had), "output-fisher" for R."""
    key = hashlib.sha256(f"{model_fingerprint(lm)}:{corpus_digest}:{STAT_VERSION}{kind}".encode()).hexdigest()[:24]
    suffix = f"-{kind}" if kind else ""
    return cache_root() / "stats" / f"{lm.name.replace('/', '_')[:40]}-{key}{suffix}.safetensors"


def _expected_meta(lm: LoadedModel, corpus_digest: str, n_tokens: int, width: int) -> dict[str, str]:
    return {
        "version": str(STAT_VERSION),
        "model_fingerprint": model_fingerprint(lm),
        "corpus_digest": corpus_digest,
        "n_tokens": str(n_tokens),
        "n_layers": str(lm.arch.n_layers),
        "d_ff": str(width),
    }


def _read_cache(path: Path, expected: dict[str, str], n_layers: int, d_ff: int) -> dict[int, torch.Tensor] | None:
    """The cached moments (d_ff x d_ff each, or whatever square size is asked), or None when the file is
    missing, corrupt or made for something else."""
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
    if key not in lm.cache:
        moments, n_tokens = _cached_moments(lm, spec, "", lm.arch.d_ff, accumulate_second_moments, progress)
        lm.cache[key] = CorpusStatistic(moments, n_tokens)
    return lm.cache[key]


def _cached_moments(lm: LoadedModel, spec: CorpusSpec, kind: str, width: int, accumulate, progress: bool):
    """({layer: (width, width) bfloat16}, n_tokens): read from the cache file of this model, corpus and kind,
    else accumulated over the corpus windows and written there."""
    windows = corpus_windows(lm, spec)
    if not windows:
        raise RuntimeError("the code corpus is empty: no Python standard library found")
    digest = windows_digest(windows)
    n_tokens = sum(map(len, windows))
    meta = _expected_meta(lm, digest, n_tokens, width=width)
    path = _cache_file(lm, digest, kind)
    moments = _read_cache(path, meta, lm.arch.n_layers, width)
    if moments is None:
        moments = accumulate(lm, windows, progress=progress)
        try:
            _write_cache(path, moments, meta)
        except OSError:
            pass   # a read-only or full cache: the statistic is still used, just recomputed next time
        moments = {l: moments.pop(l).to(torch.bfloat16) for l in sorted(moments)}   # as a reload has them
    return moments, n_tokens


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


# -- the output side: how much a change of each layer's output moves the predictions --------------------

FISHER_CORPUS = CorpusSpec(split="stat", n_tokens=16_384)   # 64 windows: R_l is only d x d
FISHER_SEED = 0
_FISHER_REFERENCE_PARAMS = 135e6   # the default model; a larger one gets fewer windows (a backward pass each)


def _fisher_spec(lm: LoadedModel) -> CorpusSpec:
    """16k tokens for the default model (2.4 min on 2 cores), fewer for a larger one, in proportion to its
    parameters, down to 4k for one 4x its size or more; 2k for a tiny one (the tests')."""
    if lm.arch.d_ff < 1024:
        return replace(FISHER_CORPUS, n_tokens=SMALL_MODEL_TOKENS // 4)
    n_params = sum(p.numel() for p in lm.model.parameters())
    scale = min(1.0, _FISHER_REFERENCE_PARAMS / max(n_params, 1))
    n = max(FISHER_CORPUS.n_tokens // 4, int(FISHER_CORPUS.n_tokens * scale))
    return replace(FISHER_CORPUS, n_tokens=n)


@dataclass
class OutputFisher:
    """R_l = E[g gᵀ] per layer (d x d, float32), g = the gradient of the next-token loss, at a label sampled
    from the model itself, with respect to layer l's FFN output, over the corpus's "stat" half: K-FAC's output
    factor. A change ΔW_l of the output projection then costs about ½ tr(R_l ΔW_l C_l ΔW_lᵀ) of expected KL
    divergence on normal code, where C alone counts every direction of the residual stream the same."""

    moments: dict[int, torch.Tensor]
    n_tokens: int
    _inverses: dict[tuple[int, float], torch.Tensor] = field(default_factory=dict, repr=False)

    def inverse(self, layer: int, ridge: float) -> torch.Tensor:
        """(R_l + ridge * mean(diag R_l) * I)⁻¹ (computed once per layer and ridge)."""
        if (layer, ridge) not in self._inverses:
            R = self.moments[layer].double()
            scale = float(R.diagonal().mean()) or 1.0
            eye = torch.eye(len(R), dtype=R.dtype)
            self._inverses[layer, ridge] = torch.linalg.inv(R + ridge * scale * eye).float()
        return self._inverses[layer, ridge]


def accumulate_output_fisher(lm: LoadedModel, windows: list[tuple[int, ...]], *, progress: bool = True) -> dict[int, torch.Tensor]:
    """R_l = (1/N) Σ g gᵀ over every position of every window: one backward pass per batch of windows, the
    labels drawn from the model's own next-token distribution (seeded: the same model gives the same R)."""
    arch, layers = lm.arch, list(range(lm.arch.n_layers))
    sums = {l: torch.zeros(arch.d_model, arch.d_model, dtype=torch.float64) for l in layers}
    generator = torch.Generator().manual_seed(FISHER_SEED)
    n = 0

    def reader(layer):
        def accumulate(g: torch.Tensor) -> None:   # returns None: the gradient itself flows on unchanged
            g = g.reshape(-1, g.shape[-1]).double()
            sums[layer].addmm_(g.T, g)

        def hook(module, inputs, output):
            output.register_hook(accumulate)
        return hook

    handles = [arch.out_proj(l).register_forward_hook(reader(l)) for l in layers]
    handles.append(graph_from_the_embeddings(lm.model))
    bar = tqdm(total=len(windows) * (len(windows[0]) if windows else 0), unit="tok", disable=not progress,
               desc="output statistic (once per model)")
    trainable = [p for p in lm.model.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        batch = logits_batch(lm, len(windows[0])) if windows else 1
        for b in range(0, len(windows), batch):
            ids = torch.tensor(windows[b : b + batch])
            logits = lm.model(input_ids=ids).logits.float()
            with torch.no_grad():
                labels = torch.multinomial(logits.reshape(-1, logits.shape[-1]).softmax(-1), 1, generator=generator)
            torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.flatten(),
                                              reduction="sum").backward()
            n += ids.numel()
            bar.update(ids.numel())
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
        bar.close()
    return {l: (s / max(n, 1)).float() for l, s in sums.items()}


def output_fisher(lm: LoadedModel, *, progress: bool = True) -> OutputFisher:
    """The model's output statistic: from memory, else from the cache, else computed (and cached), like C."""
    spec = _fisher_spec(lm)
    key = ("output_fisher", spec)
    if key not in lm.cache:
        moments, n_tokens = _cached_moments(lm, spec, "output-fisher", lm.arch.d_model, accumulate_output_fisher,
                                            progress)
        lm.cache[key] = OutputFisher({l: m.float() for l, m in moments.items()}, n_tokens)
    return lm.cache[key]
