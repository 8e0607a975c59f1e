"""The semantic basis: which latent direction raises one token's logit and lowers another's.

With the final norm's gain g folded into the unembedding, U = W_U diag(g) (V x d), the basis vector of
token k is b_k = row k of pinv(U^T), the minimum-norm latent h whose logits U h are closest to the
one-hot e_k. For a full-column-rank U that is b_k = (U^T U)^-1 u_k, so one d x d Gram pseudo-inverse,
computed once per model, serves every token.
"""

from __future__ import annotations

import torch

from .model import LoadedModel


class SemanticBasis:
    def __init__(self, lm: LoadedModel):
        unembed = lm.arch.unembedding().detach().float()
        gain = getattr(lm.arch.final_norm(), "weight", None)
        self.U = unembed * gain.detach().float() if gain is not None else unembed
        self.gram_pinv = torch.linalg.pinv(self.U.T @ self.U, hermitian=True)

    def basis(self, token: int) -> torch.Tensor:
        """b_k: (d,)"""
        return self.gram_pinv @ self.U[token]

    def delta(self, target: int, wrong: int) -> torch.Tensor:
        """b_t - b_a: the least-squares latent change for logits +1 on the target, -1 on the wrong token."""
        return self.gram_pinv @ (self.U[target] - self.U[wrong])


def semantic_basis(lm: LoadedModel) -> SemanticBasis:
    if "semantic_basis" not in lm.cache:
        lm.cache["semantic_basis"] = SemanticBasis(lm)
    return lm.cache["semantic_basis"]


def iqr_scaled(v: torch.Tensor) -> torch.Tensor:
    """Divide by the inter-quartile range of the vector's own entries: direction kept, magnitude normalised."""
    q = torch.quantile(v, torch.tensor([0.25, 0.75], dtype=v.dtype))
    return v / (q[1] - q[0] + 1e-8)


def semantic_steer(lm: LoadedModel, target: int, wrong: int, variant: str = "delta") -> torch.Tensor:
    """The scaled semantic steer s for one failure (zero when the prediction is already right)."""
    basis = semantic_basis(lm)
    if target == wrong:
        return torch.zeros(basis.U.shape[1])
    v = basis.delta(target, wrong) if variant == "delta" else basis.basis(target)
    return iqr_scaled(v)
