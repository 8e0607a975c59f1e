"""MINT wired into a model: per failing token, attribute, then patch neurons chosen by simulated editing."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...case import FailurePoint
from ...hooks import record_activations
from ...locate import neuron_scores
from ...semantic import semantic_basis
from ...session import RepairSession
from ..base import RepairMethod
from .config import MintConfig
from .mint import blend_column, earlier_cost, gap, orthogonalise, simulate, top_candidates, traction


@dataclass
class FailureTrace:
    """What MINT did at one failing token: its candidates and, per round, the neuron it patched, p(target)
    and the argmax after that patch."""

    position: int
    target: int
    wrong: int
    candidates: list[tuple[int, int]]
    rounds: list[tuple[int, int, float, int]] = field(default_factory=list)
    fixed: bool = False


class MintMethod(RepairMethod):
    name = "mint"
    Config = MintConfig

    def repair(self, session: RepairSession) -> None:
        self.history: list[torch.Tensor] = []     # unit tractions of this repair's fixes
        self.trace: list[FailureTrace] = []
        self.skipped = 0                          # failures rolled back (over the patch budget)
        self.patches = 0
        for point in session.failing_points():
            if not self._fix_point(session, point) and self.config.give_up:
                return

    def _layers(self, n: int) -> list[int]:
        start = {"all": 0, "half": n // 2, "quarter": (3 * n) // 4}[self.config.layers]
        return list(range(start, n))

    def _tractions(self, session: RepairSession, ids: torch.Tensor, candidates: list[tuple[int, int]],
                   tau: torch.Tensor) -> list[torch.Tensor]:
        """Each candidate's traction: tau, or with `signed` tau times the sign of the neuron's activation at
        the failing position, so that the patch moves the layer's output along +tau either way."""
        if not self.config.signed:
            return [tau] * len(candidates)
        with torch.no_grad(), record_activations(session.arch, {l for l, _ in candidates}) as acts:
            session.lm.model(input_ids=ids)
        return [tau if float(acts[l][0, -1, j]) >= 0 else -tau for l, j in candidates]

    def _cost(self, logits: torch.Tensor, wrong: int, target: int) -> float:
        """How far one trial leaves the failing token from its target (lower is better)."""
        if self.config.gap == "argmax":
            return gap(logits, wrong, target)
        return -float(logits.softmax(-1)[target])

    def _fix_point(self, session: RepairSession, point: FailurePoint) -> bool:
        cfg, lm, arch = self.config, session.lm, session.arch
        scores = neuron_scores(lm, point.context_ids, point.target, self._layers(arch.n_layers))
        candidates = top_candidates(scores, cfg.candidates)
        tau = traction(semantic_basis(lm).delta(point.target, point.predicted))
        if cfg.orthogonal:
            tau = orthogonalise(tau, self.history)
        ids = torch.tensor([list(point.context_ids)])
        tractions = self._tractions(session, ids, candidates, tau)
        trace = FailureTrace(point.position, point.target, point.predicted, candidates)
        self.trace.append(trace)
        applied: list[tuple[int, int, torch.Tensor]] = []
        wrong = point.predicted
        earlier = list(session.cases[point.case_index].target_ids[: point.position]) if cfg.keep_earlier else []
        for _ in range(cfg.max_patches):
            session.check_cancel()
            trials = simulate(lm, ids, candidates, tractions, cfg.blend, positions=len(earlier) + 1)
            costs = [self._cost(row[-1], wrong, point.target) + earlier_cost(row[:-1], earlier) for row in trials]
            b = min(range(len(costs)), key=costs.__getitem__)
            layer, j = candidates[b]
            applied.append((layer, j, blend_column(arch.columns(layer), j, tractions[b], cfg.blend)))
            with torch.no_grad():
                logits = lm.model(input_ids=ids).logits[0, -1]
            wrong = int(logits.argmax())
            trace.rounds.append((layer, j, float(logits.softmax(-1)[point.target]), wrong))
            if wrong == point.target:
                trace.fixed = True
                self.patches += len(applied)
                if cfg.orthogonal:
                    self.history.append(tau / (tau.norm() + 1e-12))
                return True
        with torch.no_grad():                         # over budget: roll back this failure's patches
            for layer, j, old in reversed(applied):
                arch.columns(layer)[:, j] = old
        self.skipped += 1
        return False
