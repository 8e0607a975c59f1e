"""MINT wired into a model: per failing token, attribute, then patch neurons chosen by simulated editing."""

from __future__ import annotations

import torch

from ...case import FailurePoint
from ...locate import neuron_scores
from ...semantic import semantic_basis
from ...session import RepairSession
from ..base import RepairMethod
from .config import MintConfig
from .mint import blend_column, orthogonalise, simulate, top_candidates, traction


class MintMethod(RepairMethod):
    name = "mint"
    Config = MintConfig

    def repair(self, session: RepairSession) -> None:
        self.history: list[torch.Tensor] = []     # unit tractions of this repair's fixes
        self.skipped = 0                          # failures rolled back (over the patch budget)
        self.patches = 0
        for point in session.failing_points():
            if not self._fix_point(session, point) and self.config.give_up:
                return

    def _layers(self, n: int) -> list[int]:
        start = {"all": 0, "half": n // 2, "quarter": n - max(1, n // 4)}[self.config.layers]
        return list(range(start, n))

    @torch.no_grad()
    def _last_logits(self, session: RepairSession, ids: torch.Tensor) -> torch.Tensor:
        return session.lm.model(input_ids=ids).logits[0, -1]

    def _fix_point(self, session: RepairSession, point: FailurePoint) -> bool:
        cfg, lm, arch = self.config, session.lm, session.arch
        scores = neuron_scores(lm, point.context_ids, point.target, self._layers(arch.n_layers))
        candidates = top_candidates(scores, cfg.candidates)
        tau = traction(semantic_basis(lm).delta(point.target, point.predicted))
        if cfg.orthogonal:
            tau = orthogonalise(tau, self.history)
        ids = torch.tensor([list(point.context_ids)])
        applied: list[tuple[int, int, torch.Tensor]] = []
        wrong = point.predicted
        for _ in range(cfg.max_patches):
            session.check_cancel()
            gaps = simulate(session.lm, ids, candidates, tau, cfg.blend, wrong, point.target)
            layer, j = candidates[min(range(len(gaps)), key=gaps.__getitem__)]
            applied.append((layer, j, blend_column(arch.columns(layer), j, tau, cfg.blend)))
            wrong = int(self._last_logits(session, ids).argmax())
            if wrong == point.target:
                self.patches += len(applied)
                if cfg.orthogonal:
                    self.history.append(tau / (tau.norm() + 1e-12))
                return True
        with torch.no_grad():                         # over budget: roll back this failure's patches
            for layer, j, old in reversed(applied):
                arch.columns(layer)[:, j] = old
        self.skipped += 1
        return False
