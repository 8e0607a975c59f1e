from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoraConfig:
    steps: int = field(default=10, metadata={"help": "optimiser steps per failing token at most (stops early when fixed), as STAR"})
    lr: float = field(default=5e-3, metadata={"help": "Adam learning rate of the LoRA factors"})
    rank: int = field(default=8, metadata={"help": "LoRA rank r of each output projection's adapter"})
    alpha: float = field(default=16.0, metadata={"help": "lora_alpha: the update is scaled by alpha / r"})
    seed: int = field(default=0, metadata={"help": "seed of the LoRA A-factor initialisation (B starts at zero)"})
