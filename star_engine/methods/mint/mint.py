"""MINT's math (star_method.md §4.2), in the paper's symbols.

    delta   = b_t - b_a                              semantic basis difference (star_engine.semantic)
    tau     = delta / (max delta - min delta)        the traction, the same for every layer
    w_lj   <- (w_lj + f * tau) / (1 + f)             blend neuron (l, j)'s write vector toward tau
    gap_lj  = p(a) - p(t) with neuron (l, j) patched  simulated editing: the smallest gap is applied

A failure is fixed by repeating "simulate every candidate, apply the best" until the argmax is the target,
at most `max_patches` times; a failure that needs more is rolled back and counted as skipped.

Choices the reference code leaves implicit are settings here (MintConfig): the sign of the traction for
a neuron whose activation at the failure is negative (a gated MLP has many; blending toward +tau then
moves the layer's output along -tau), what a trial is scored by, and whether a trial that breaks an
earlier target token of the case pays for it.
"""

from __future__ import annotations

import torch


def traction(delta: torch.Tensor) -> torch.Tensor:
    """tau = delta / range(delta)."""
    return delta / (delta.max() - delta.min() + 1e-12)


def orthogonalise(tau: torch.Tensor, history: list[torch.Tensor]) -> torch.Tensor:
    """tau projected onto the orthogonal complement of earlier unit tractions, its norm kept."""
    if not history:
        return tau
    Q, _ = torch.linalg.qr(torch.stack(history, dim=1))      # (d, k) orthonormal
    projected = tau - Q @ (Q.T @ tau)
    n = projected.norm()
    return projected * (tau.norm() / n) if n > 1e-12 else tau


def top_candidates(scores: dict[int, torch.Tensor], k: int) -> list[tuple[int, int]]:
    """The k highest-scoring neurons (layer, index) pooled over layers, best first (ties: lower layer/index)."""
    layers = sorted(scores)
    pooled = torch.cat([scores[l] for l in layers])
    d_ff = scores[layers[0]].shape[0]
    order = torch.argsort(pooled, descending=True, stable=True)[:k]
    return [(layers[int(i) // d_ff], int(i) % d_ff) for i in order]


def blended(w: torch.Tensor, tau: torch.Tensor, f: float) -> torch.Tensor:
    """(w + f * tau) / (1 + f): the write vector moved the share f / (1 + f) of the way to tau."""
    return (w + f * tau.to(w.dtype)) / (1 + f)


@torch.no_grad()
def blend_column(W: torch.Tensor, j: int, tau: torch.Tensor, f: float) -> torch.Tensor:
    """Patch column j of W (d, d_ff) in place; returns the old column for the undo."""
    old = W[:, j].clone()
    W[:, j] = blended(old, tau, f)
    return old


def gap(logits: torch.Tensor, wrong: int | None, target: int) -> float:
    """p(wrong) - p(target); wrong=None: against the most probable other token (negative = target on top)."""
    p = logits.softmax(-1)
    if wrong is None:
        others = p.clone()
        others[target] = -1.0
        return float(others.max() - p[target])
    return float(p[wrong] - p[target])


def earlier_cost(logits: torch.Tensor, targets: list[int]) -> float:
    """For logits (n, V) at the positions that predict `targets` (n tokens the walk has already passed): the sum
    of max(0, gap) over them, i.e. zero while every one of them is still the argmax."""
    return sum(max(0.0, gap(row, None, t)) for row, t in zip(logits, targets))


@torch.no_grad()
def simulate(lm, ids: torch.Tensor, candidates: list[tuple[int, int]], tractions: list[torch.Tensor], f: float,
             positions: int = 1) -> torch.Tensor:
    """The logits at the last `positions` positions (len(candidates), positions, V) with each candidate patched
    (with its own traction), in one batched forward pass.

    Patching column j of layer l changes that FFN's output by a_lj * (w_new - w_old) at every position;
    batch row b adds exactly that change for its own candidate (a hook on the output projection), which
    is the same as patching the weight for that row alone. Equivalent to len(candidates) separate
    patch / forward / undo rounds, up to float rounding."""
    arch = lm.arch
    by_layer: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
    for b, ((l, j), tau) in enumerate(zip(candidates, tractions)):
        w = arch.columns(l)[:, j]
        by_layer.setdefault(l, []).append((b, j, blended(w, tau, f) - w))
    acts: dict[int, torch.Tensor] = {}
    handles = []
    for l, edits in by_layer.items():
        proj = arch.out_proj(l)
        handles.append(proj.register_forward_pre_hook(lambda m, inp, l=l: acts.__setitem__(l, inp[0])))

        def add(module, inp, out, l=l, edits=edits):
            out = out.clone()
            for b, j, dw in edits:
                out[b] += acts[l][b, :, j : j + 1] * dw
            return out

        handles.append(proj.register_forward_hook(add))
    try:
        return lm.model(input_ids=ids.expand(len(candidates), -1)).logits[:, -positions:]
    finally:
        for h in handles:
            h.remove()
