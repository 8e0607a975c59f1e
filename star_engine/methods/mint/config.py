from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class MintConfig:
    layers: Literal["half", "all", "quarter"] = field(
        default="half",
        metadata={"help": "layers searched for candidate neurons: half (the upper half, as MINT), all, "
                          "quarter (the last quarter: layers from floor(3L/4) on, as the reference's 'forth')"},
    )
    candidates: int = field(default=10, metadata={"help": "top grad x activation neurons tried by simulated editing"})
    max_patches: int = field(
        default=10,
        metadata={"help": "patches per failure at most; beyond that the failure's patches are rolled back (skipped)"},
    )
    blend: float = field(
        default=0.3,
        metadata={"help": "f in w <- (w + f * tau) / (1 + f); the reference code's planning factor is 0.01, its "
                          "benchmark path 0.1, an earlier version averaged (1); 0.3 was best on CoNaLa dev"},
    )
    signed: bool = field(
        default=True,
        metadata={"help": "blend a neuron whose activation at the failure is negative toward -tau, so every patch "
                          "moves the layer's output along +tau; false blends every candidate toward +tau (the "
                          "reference code)"},
    )
    gap: Literal["argmax", "target"] = field(
        default="target",
        metadata={"help": "what a simulated patch is scored by: argmax = p(argmax before the trial) - p(target) "
                          "(the reference code); target = -p(target), the trial that raises the target most"},
    )
    keep_earlier: bool = field(
        default=True,
        metadata={"help": "a simulated patch also pays, for each earlier target token of the case, how far it "
                          "leaves that token from being the argmax (zero while all stay right), so MINT prefers "
                          "neurons that fix this token without breaking the ones before it; read from the same "
                          "batched forward pass. false scores the failing token alone (the reference code)"},
    )
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
