"""STAR's math, in the paper's symbols.

    Z_l  (N x d_ff)  neuron activations at the N predicting positions of layer l
    S    (N x d)     semantic steers, one row per position (zero where the prediction is right)
    P_l  (d x d_ff)  the prior: the minimum-norm dW with Z_l dW = S, in the weight's column layout
    G_l  (d x d_ff)  the loss gradient of W_l

    W_l <- W_l + eta * |P_l| * (-sign G_l)          (the prior sets the size, the gradient the sign)
"""

from __future__ import annotations

import torch


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


@torch.no_grad()
def seme_step(W: torch.Tensor, P: torch.Tensor, G: torch.Tensor, lr: float) -> None:
    """In place: W += lr * |P| * (-sign G), fused (one pass over W, no lr * |P| temporary)."""
    W.addcmul_(P.abs(), torch.sign(G), value=-lr)
