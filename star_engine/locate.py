"""Locating: which layers (FFN-skip loss ranking) and which neurons (grad x activation) to patch."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .hooks import record_activations, skip_mlp
from .model import LoadedModel


@torch.no_grad()
def ffn_skip_losses(lm: LoadedModel, context_ids: Sequence[int], target: int) -> torch.Tensor:
    """L_l = CE(target) with layer l's MLP bypassed, for every layer: high loss = the layer matters."""
    ids = torch.tensor([list(context_ids)])
    losses = []
    for layer in range(lm.arch.n_layers):
        with skip_mlp(lm.arch, layer):
            logits = lm.model(input_ids=ids).logits[0, -1]
        losses.append(F.cross_entropy(logits, torch.tensor(target)))
    return torch.stack(losses)


def top_layers(losses: torch.Tensor, ratio: float) -> list[int]:
    """The ceil(ratio * L) layers whose bypass hurts the target most, in layer order."""
    k = max(1, min(len(losses), math.ceil(ratio * len(losses))))
    return sorted(losses.topk(k).indices.tolist())


def neuron_scores(lm: LoadedModel, context_ids: Sequence[int], target: int, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """score[l][j] = || a_lj(p) * d p(target) / d a_lj(p) ||_2 over positions p."""
    ids = torch.tensor([list(context_ids)])
    with torch.enable_grad(), record_activations(lm.arch, layers, grads=True) as acts:
        prob = lm.model(input_ids=ids).logits[0, -1].softmax(-1)[target]
        prob.backward()
    return {l: (acts[l][0] * acts[l].grad[0]).norm(dim=0).detach() for l in layers}


def neuron_masks(scores: dict[int, torch.Tensor], pattern: str, ratio: float, best_layer: int | None = None) -> dict[int, torch.Tensor]:
    """Boolean masks over each layer's neurons.

    global: pool all layers' scores and keep those >= the (1 - ratio/L) quantile (about ratio * d_ff in all);
    layer:  keep only `best_layer`, its neurons >= the (1 - ratio) quantile.
    """
    if pattern == "global":
        pooled = torch.cat(list(scores.values()))
        threshold = torch.quantile(pooled, 1 - ratio / len(scores))
        return {l: s >= threshold for l, s in scores.items()}
    if pattern == "layer":
        s = scores[best_layer]
        return {best_layer: s >= torch.quantile(s, 1 - ratio)}
    raise ValueError(f"unknown sparsity pattern {pattern!r}")


def top_neurons(scores: dict[int, torch.Tensor], k: int) -> dict[int, torch.Tensor]:
    """The k highest-scoring neurons over all layers (scores comparable across layers): {layer: ascending
    neuron indices}, layers with none left out."""
    layers = sorted(scores)
    pooled = torch.cat([scores[l] for l in layers])
    k = max(1, min(k, len(pooled)))
    chosen = torch.zeros(len(pooled), dtype=torch.bool)
    chosen[pooled.topk(k).indices] = True
    out, start = {}, 0
    for l in layers:
        idx = chosen[start : start + len(scores[l])].nonzero().flatten()
        start += len(scores[l])
        if len(idx):
            out[l] = idx
    return out


def contrast_neurons(active: dict[int, torch.Tensor], corpus_power: dict[int, torch.Tensor], k: int) -> dict[int, torch.Tensor]:
    """The k neurons, over all layers, most active at the failure relative to how active they are on normal
    code: score_lj = rms_i(z_lj at the failing positions) / rms(z_lj on the corpus). Those give the fix the
    most leverage per unit of change on everything else. Returns {layer: ascending neuron indices}.

    active[l] (n, d_ff): activations at the failing positions; corpus_power[l] (d_ff,): E[z_lj²] on the corpus."""
    scores = {}
    for l in active:
        power = corpus_power[l].clamp_min(1e-6 * float(corpus_power[l].mean()) + 1e-12)
        scores[l] = (active[l].pow(2).mean(0) / power).sqrt()
    return top_neurons(scores, k)


def fisher_neurons(grads: dict[int, torch.Tensor], corpus_power: dict[int, torch.Tensor], k: int,
                   output_inverse: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """The k neurons whose column gives the most first-order loss drop per unit of change on normal code:
    score_lj = G_l[:, j]ᵀ R_l⁻¹ G_l[:, j] / Q_l[j, j] (G the loss gradient in the (d, d_ff) layout, Q the
    metric's diagonal, R the output metric, the identity when not given), i.e. the diagonal of the
    natural-gradient drop."""
    def power(l: int) -> torch.Tensor:
        if output_inverse is None:
            return grads[l].pow(2).sum(0)
        return (grads[l] * (output_inverse[l] @ grads[l])).sum(0)

    return top_neurons({l: power(l) / corpus_power[l] for l in grads}, k)


@torch.no_grad()
def greedy_neurons(grads: dict[int, torch.Tensor], metric_column, metric_diag: dict[int, torch.Tensor],
                   k: int) -> dict[int, torch.Tensor]:
    """The k neurons, over all layers, picked one at a time: each the one whose column adds the most
    natural-gradient loss drop given those already picked. Unlike `fisher_neurons` it counts the corpus
    correlations, so two neurons that fire together on normal code but not at the failure can be picked
    as a pair whose changes cancel there.

    With S picked in layer l, adding j gains ||r_j||² / s_j, where s_j = Q_jj - Q_jS Q_SS⁻¹ Q_Sj is what
    of neuron j the picked ones do not explain on the corpus (the Schur complement) and
    r_j = G_j - G_S Q_SS⁻¹ Q_Sj the gradient they do not already carry; tr(G_S Q_SS⁻¹ G_Sᵀ), the first-order
    drop of the natural step on S, is the sum of the gains (a pivoted Cholesky factorisation of Q).

    grads[l] (d, d_ff): the loss gradient; metric_column(l, j) -> Q_l[:, j] (d_ff,); metric_diag[l]: diag Q_l.
    """
    residual = {l: grads[l].double().clone() for l in grads}
    schur = {l: metric_diag[l].double().clone() for l in grads}
    factor = {l: [] for l in grads}                                   # the Cholesky rows picked so far
    gains = {l: residual[l].pow(2).sum(0) / schur[l] for l in grads}
    chosen = {l: [] for l in grads}
    total = sum(len(s) for s in schur.values())
    for _ in range(max(1, min(k, total))):
        l = max(gains, key=lambda m: float(gains[m].max()))
        j = int(gains[l].argmax())
        column = metric_column(l, j).double()
        if factor[l]:
            V = torch.stack(factor[l])
            column = column - V.T @ V[:, j]
        pivot = float(column[j])
        row = column / pivot ** 0.5
        factor[l].append(row)
        residual[l] -= torch.outer(residual[l][:, j], column / pivot)
        schur[l] = (schur[l] - row.pow(2)).clamp_min(1e-30 * float(metric_diag[l].max()))
        chosen[l].append(j)
        gains[l] = residual[l].pow(2).sum(0) / schur[l]
        gains[l][chosen[l]] = float("-inf")
    return {l: torch.tensor(sorted(idx)) for l, idx in chosen.items() if idx}
