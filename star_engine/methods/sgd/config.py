from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SgdConfig:
    steps: int = field(default=10, metadata={"help": "optimiser steps per failure at most (stops early when fixed), as STAR"})
    lr: float = field(default=1e-2, metadata={"help": "learning rate of plain SGD (no momentum, no weight decay)"})
