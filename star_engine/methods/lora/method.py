"""LoRA fine-tuning wired into a model: adapters on every output projection, trained per failing token,
merged into the base weights at the end (a dense column delta, persisted like any other patch)."""

from __future__ import annotations

import torch

from ...session import RepairSession
from ..base import RepairMethod, step_until_right
from .config import LoraConfig
from .lora import lora_adapters


class LoraMethod(RepairMethod):
    name = "lora"
    Config = LoraConfig

    def repair(self, session: RepairSession) -> None:
        cfg, arch, model = self.config, session.arch, session.lm.model
        targets = [arch.out_proj_name(l) for l in range(arch.n_layers)]
        with lora_adapters(model, targets, cfg.rank, cfg.alpha, arch.spec.conv1d, cfg.seed) as params:
            opt = torch.optim.Adam(params, lr=cfg.lr)
            with torch.enable_grad():
                for point in session.failing_points():
                    ids = torch.tensor([list(point.context_ids)])
                    step_until_right(lambda: model(input_ids=ids).logits[0, -1], opt, point.target, cfg.steps,
                                session.check_cancel)
