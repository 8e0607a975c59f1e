"""STAR wired into a model: per failure, locate layers (and neurons), then take prior-guided sign steps."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...case import FailurePoint
from ...hooks import record_activations
from ...locate import ffn_skip_losses, neuron_masks, neuron_scores, top_layers
from ...semantic import semantic_steer
from ...session import RepairSession
from ..base import RepairMethod
from .config import StarConfig
from .solver import min_norm_prior, seme_step


class StarMethod(RepairMethod):
    name = "star"
    Config = StarConfig

    def repair(self, session: RepairSession) -> None:
        if self.config.mode == "batch":
            self._repair_batch(session)
        else:
            for point in session.failing_points():
                if not self._fix_point(session, point) and self.config.give_up:
                    return

    # -- locating ---------------------------------------------------------------------------------

    def _locate(self, session: RepairSession, point: FailurePoint) -> tuple[list[int], dict[int, torch.Tensor]]:
        cfg, lm = self.config, session.lm
        all_layers = list(range(lm.arch.n_layers))
        ranked = cfg.layer_ratio < 1.0 or cfg.sparsity == "layer"
        losses = ffn_skip_losses(lm, point.context_ids, point.target) if ranked else None
        layers = top_layers(losses, cfg.layer_ratio) if cfg.layer_ratio < 1.0 else all_layers
        if cfg.sparsity == "none":
            return layers, {}
        best = int(losses.argmax()) if losses is not None else None
        scored = [best] if cfg.sparsity == "layer" else layers
        masks = neuron_masks(neuron_scores(lm, point.context_ids, point.target, scored), cfg.sparsity, cfg.sparsity_ratio, best)
        return sorted(masks), masks

    # -- token mode -------------------------------------------------------------------------------

    def _fix_point(self, session: RepairSession, point: FailurePoint) -> bool:
        """Up to `steps` sign steps on this failure; whether its argmax is the target at the end."""
        cfg, arch = self.config, session.arch
        s = semantic_steer(session.lm, point.target, point.predicted, cfg.steer)   # fixed for this failure
        layers, masks = self._locate(session, point)
        ids = torch.tensor([list(point.context_ids)])
        target = torch.tensor(point.target)
        for step in range(cfg.steps + 1):
            session.check_cancel()
            with session.trainable(layers) as params, record_activations(arch, layers) as acts:
                logits = session.lm.model(input_ids=ids).logits[0, -1]
                if int(logits.argmax()) == point.target:
                    return True
                if step == cfg.steps:
                    return False
                F.cross_entropy(logits, target).backward()
                for layer, W in zip(layers, params):
                    z = acts[layer][0, -1:].detach()                                # (1, d_ff)
                    P = min_norm_prior(z, s[None], masks.get(layer))
                    seme_step(arch.columns(layer), P, arch.as_columns(layer, W.grad), cfg.lr)

    # -- batch mode -------------------------------------------------------------------------------

    def _repair_batch(self, session: RepairSession) -> None:
        cfg, lm, arch = self.config, session.lm, session.arch
        first = next(session.failing_points(), None)
        if first is None:
            return
        layers, masks = self._locate(session, first)
        inputs = [torch.tensor([list(enc.ids)]) for enc in session.cases]
        spans = [slice(len(enc.prompt_ids) - 1, len(enc.ids) - 1) for enc in session.cases]   # predicting positions
        targets = [torch.tensor(enc.target_ids) for enc in session.cases]
        S = None
        for _ in range(cfg.steps):
            session.check_cancel()
            with session.trainable(layers) as params, record_activations(arch, layers) as acts:
                rows: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
                logits = []
                for ids, span in zip(inputs, spans):
                    logits.append(lm.model(input_ids=ids).logits[0, span])
                    for l in layers:
                        rows[l].append(acts[l][0, span].detach())
                predicted = torch.cat([lg.argmax(-1) for lg in logits])
                target = torch.cat(targets)
                if torch.equal(predicted, target):
                    return
                if S is None:   # the steers come from the predictions before any edit
                    S = torch.stack([semantic_steer(lm, int(t), int(a), cfg.steer) for t, a in zip(target, predicted)])
                F.cross_entropy(torch.cat(logits), target).backward()
                for layer, W in zip(layers, params):
                    P = min_norm_prior(torch.cat(rows[layer]), S, masks.get(layer))
                    seme_step(arch.columns(layer), P, arch.as_columns(layer, W.grad), cfg.lr)
