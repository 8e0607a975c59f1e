"""STAR's math, in the paper's symbols, with the protected prior.

    Z_l  (N x k)     neuron activations at the N predicting positions of layer l, over its k patchable neurons
    S    (N x d)     semantic steers, one row per position (zero where the prediction is right: keep rows)
    C_l  (k x k)     second moment of those neurons' activations on normal code (star_engine.protect)
    Q_l  (k x k)     the metric a change is measured in: I (the paper), C_l + λI (covariance), or the
                     projector onto the directions the corpus does not use (null space)
    P_l  (d x k)     the prior: argmin tr(ΔW Q ΔWᵀ) subject to Z ΔWᵀ = S, i.e. ΔWᵀ = Q⁻¹Zᵀ(Z Q⁻¹ Zᵀ)⁺ S
                     (Q = I gives the paper's minimum-norm Zᵀ(ZZᵀ)⁺S)
    G_l  (d x k)     the loss gradient of W_l

    D_l = |P_l| * (-sign G_l)                      (the prior sets the size, the gradient the sign)

The elementwise sign scrambles the prior's protection, so with a protected metric the step is realised
again: the change with the smallest Q-norm that has the same effect as D_l at the steered positions and
none at the keep rows. W_l <- W_l + eta * that.

    N_l = -R_l⁻¹ G_l Q_l⁻¹                          (direction=natural: the steepest loss descent per unit
                                                    of change on normal code, no semantic steer; R_l the
                                                    output metric, I unless output_metric=fisher)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Protect = Literal["none", "covariance", "nullspace"]


def min_norm_prior(Z: torch.Tensor, S: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """P = (Z^T (Z Z^T)^+ S)^T, solved over the masked neurons only; other columns stay exactly zero."""
    d_ff = Z.shape[1]
    Zm = Z if mask is None else Z[:, mask]
    dW = Zm.T @ torch.linalg.pinv(Zm @ Zm.T, hermitian=True) @ S      # (k, d)
    if mask is None:
        return dW.T
    P = torch.zeros(S.shape[1], d_ff, dtype=S.dtype)
    P[:, mask] = dW.T
    return P


@dataclass
class Metric:
    """Q⁻¹ over one layer's patchable neurons and R⁻¹ over its output (None: the identity; Q = R = I is the
    paper's plain minimum norm). A change ΔW (d x k) costs tr(R ΔW Q ΔWᵀ)."""

    inverse: torch.Tensor | None
    output_inverse: torch.Tensor | None = None

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        """Q⁻¹ X for X (k, n)."""
        return X if self.inverse is None else self.inverse @ X

    def apply_output(self, X: torch.Tensor) -> torch.Tensor:
        """R⁻¹ X for X (..., d, k)."""
        return X if self.output_inverse is None else self.output_inverse @ X

    def natural(self, X: torch.Tensor) -> torch.Tensor:
        """R⁻¹ X Q⁻¹ for X (..., d, k): a gradient turned into the change it asks for in this metric."""
        k = X.shape[-1]
        right = self.apply(X.reshape(-1, k).T).T.reshape(X.shape)   # Q⁻¹ is symmetric
        return self.apply_output(right)


def protected_metric(C: torch.Tensor | None, kind: Protect, *, ridge: float, threshold: float,
                     keep: torch.Tensor | None = None, keep_weight: float = 1.0) -> Metric:
    """The metric Q⁻¹ for one layer. C (k, k): the corpus second moment over the patchable neurons; keep
    (n, k): activations of earlier fixes, protected like the corpus with `keep_weight` times its weight.

    covariance: Q = C + keep_weight * KᵀK/n + ridge * mean(diag C) * I  (MEMIT's weighting)
    nullspace:  Q⁻¹ = Π + ridge * I, Π the projector onto the eigenvectors of C + keep_weight * KᵀK/n whose
                eigenvalue is below threshold * the largest (AlphaEdit's null space; ridge keeps a step
                possible when a few neurons have no null space)
    """
    if kind == "none" or C is None:
        return Metric(None)
    M = C.double()
    if keep is not None and len(keep):
        K = keep.double()
        M = M + keep_weight * (K.T @ K) / len(K)
    eye = torch.eye(M.shape[0], dtype=M.dtype)
    if kind == "covariance":
        scale = float(M.diagonal().mean()) or 1.0
        return Metric(torch.linalg.inv(M + ridge * scale * eye).float())
    if kind == "nullspace":
        values, vectors = torch.linalg.eigh(M)
        null = vectors[:, values < threshold * values.max().clamp_min(1e-30)]
        return Metric((null @ null.T + ridge * eye).float())
    raise ValueError(f"unknown protection {kind!r}")


def protected_prior(Z: torch.Tensor, S: torch.Tensor, metric: Metric) -> torch.Tensor:
    """P (d, k) = (Q⁻¹Zᵀ (Z Q⁻¹ Zᵀ)⁺ S)ᵀ: meets Z ΔWᵀ = S (least squares when it cannot) with the least
    change on what Q protects."""
    QZt = metric.apply(Z.T)                                           # (k, N)
    return (QZt @ torch.linalg.pinv(Z @ QZt, hermitian=True) @ S).T


def realise(D: torch.Tensor, Z: torch.Tensor, steered: torch.Tensor, metric: Metric) -> torch.Tensor:
    """The change with the least Q-norm whose effect at the steered rows of Z is D's and at the other
    (keep) rows is zero."""
    effect = Z @ D.T                                                  # (N, d)
    effect[~steered] = 0
    return protected_prior(Z, effect, metric)


def natural_direction(G: dict[int, torch.Tensor], metrics: dict[int, Metric], loss: float) -> dict[int, torch.Tensor]:
    """-G_l Q_l⁻¹ for every layer: the steepest descent of the loss per unit of change on normal code, scaled
    so that its first-order loss drop at step 1 is the whole loss (eta = 1 would fix it if it were linear)."""
    D = {l: -metrics[l].natural(G[l]) for l in G}
    drop = -sum(float((G[l] * D[l]).sum()) for l in G)
    return {l: d * (loss / drop) for l, d in D.items()} if drop > 0 else D


def seme_direction(P: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """|P| * (-sign G)."""
    return P.abs().mul_(torch.sign(G)).neg_()


@torch.no_grad()
def seme_step(W: torch.Tensor, P: torch.Tensor, G: torch.Tensor, lr: float) -> None:
    """In place: W += lr * |P| * (-sign G), fused (one pass over W, no lr * |P| temporary)."""
    W.addcmul_(P.abs(), torch.sign(G), value=-lr)


def least_change_patch(J: dict[int, torch.Tensor], metrics: dict[int, Metric], shortfall: torch.Tensor,
                       current: dict[int, torch.Tensor], damping: float = 1e-6) -> dict[int, torch.Tensor]:
    """One Gauss-Newton step on the margins, towards the patch with the least change on normal code.

        ΔW = argmin Σ_l tr(R_l ΔW_l Q_l ΔW_lᵀ)  subject to  J (ΔW - ΔW_k) = shortfall
           = Σ_p λ_p R_l⁻¹ J_p,l Q_l⁻¹,        λ = (⟨J, R⁻¹ J Q⁻¹⟩)⁻¹ (shortfall + J ΔW_k)

    J[l] (n, d, k): the gradient of each constrained position's soft margin (target logit minus the
    log-sum-exp of the others) with respect to layer l's patchable columns; shortfall (n,): what each margin lacks; current[l] (d, k):
    ΔW_k, the patch so far. Solving for the whole patch, not an increment, lets each step also undo the
    parts of earlier steps the margins no longer need."""
    JQ = {l: metrics[l].natural(J[l]) for l in J}
    gram = sum(J[l].flatten(1).double() @ JQ[l].flatten(1).double().T for l in J)
    moved = sum(J[l].flatten(1).double() @ current[l].flatten().double() for l in J)
    gram += damping * float(gram.diagonal().mean()) * torch.eye(len(gram), dtype=gram.dtype)
    lam = torch.linalg.solve(gram, shortfall.double() + moved).float()
    return {l: torch.einsum("n,ndk->dk", lam, JQ[l]) for l in J}
