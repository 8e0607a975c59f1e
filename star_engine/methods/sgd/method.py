"""SGD wired into a model: per failing token, plain SGD on every layer's FFN output-projection weight."""

from __future__ import annotations

import torch

from ...session import RepairSession
from ..base import RepairMethod
from .config import SgdConfig
from .sgd import descend


class SgdMethod(RepairMethod):
    name = "sgd"
    Config = SgdConfig

    def repair(self, session: RepairSession) -> None:
        layers = list(range(session.arch.n_layers))
        model = session.lm.model
        for point in session.failing_points():
            ids = torch.tensor([list(point.context_ids)])
            with session.trainable(layers) as params:
                descend(lambda: model(input_ids=ids).logits[0, -1], params, point.target,
                        self.config.steps, self.config.lr, session.check_cancel)
