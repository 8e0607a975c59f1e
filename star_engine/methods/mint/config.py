from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class MintConfig:
    layers: Literal["half", "all", "quarter"] = field(
        default="half",
        metadata={"help": "layers searched for candidate neurons: half (the upper half, as MINT), all, "
                          "quarter (the last quarter)"},
    )
    candidates: int = field(default=10, metadata={"help": "top grad x activation neurons tried by simulated editing"})
    max_patches: int = field(
        default=10,
        metadata={"help": "patches per failure at most; beyond that the failure's patches are rolled back (skipped)"},
    )
    blend: float = field(default=0.01, metadata={"help": "f in w <- (w + f * tau) / (1 + f)"})
    give_up: bool = field(
        default=True,
        metadata={"help": "end the repair at the first skipped failure (that case cannot pass verification any "
                          "more); false keeps walking the later tokens, as the reference code does"},
    )
    orthogonal: bool = field(
        default=False,
        metadata={"help": "project each traction onto the complement of the tractions of earlier fixes "
                          "in the same repair (the reference code's later addition)"},
    )
