from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class StarConfig:
    mode: Literal["token", "batch"] = field(
        default="batch",
        metadata={"help": "token: one optimisation per failing token, in order; batch: one joint "
                          "optimisation over every target token of every case (rows stacked)"},
    )
    steps: int = field(default=20, metadata={"help": "accepted optimiser steps per repair at most (stops early when fixed)"})
    lr: float = field(default=1e-2, metadata={"help": "eta, the first step scale: the step is eta * D"})
    step_rule: Literal["fixed", "minimal", "backtrack", "least_change"] = field(
        default="least_change",
        metadata={"help": "least_change: Gauss-Newton on the margins, no direction: each step re-solves the whole "
                          "patch as the least change on normal code that gives every target the margin to first "
                          "order (one gradient per target token; stalled, it goes on with natural minimal steps); "
                          "minimal: along each step, the smallest scale that fixes every target (doubling from "
                          "lr/16, then bisection), else the scale with the lowest loss; backtrack: a step is kept "
                          "only if it lowers the loss, else its scale is halved and retried; fixed: the paper's "
                          "constant eta (can overshoot). No rule but fixed ever accepts a higher loss"},
    )
    direction: Literal["seme", "gradient", "prior", "natural"] = field(
        default="seme",
        metadata={"help": "seme: the paper's |P| * -sign(G); gradient: -G; prior: the protected prior itself; "
                          "natural: -G Q⁻¹, scaled so that eta = 1 would remove the loss to first order (use "
                          "with step_rule=minimal, lr=1). "
                          "With a protected metric, seme and gradient are realised again: the least change on "
                          "normal code with the same effect at the failing positions (none at the right ones)"},
    )
    polish: int = field(
        default=5,
        metadata={"help": "least_change: steps after the fix that re-solve the whole patch as the least change "
                          "keeping every margin (each kept only if the fix still holds)"},
    )
    backtracks: int = field(default=6, metadata={"help": "backtrack: halvings tried before the repair gives up"})
    bisections: int = field(default=5, metadata={"help": "minimal: bisection steps between the last failing and first fixing scale"})
    margin: float = field(
        default=0.5,
        metadata={"help": "minimal / least_change: a target counts as fixed when its logit beats every other by this much "
                          "(headroom, so that later patches do not undo it)"},
    )
    layer_ratio: float = field(
        default=1.0,
        metadata={"help": "fraction of layers to patch, ranked by FFN-skip loss (1.0 = all layers, no ranking)"},
    )
    sparsity: Literal["none", "contrast", "fisher", "greedy", "global", "layer"] = field(
        default="fisher",
        metadata={"help": "which neurons may change: none (all), contrast (the `neurons` most active at the "
                          "failure relative to the corpus, over all layers), fisher (the `neurons` with the most "
                          "loss gradient per unit of corpus change, over all layers), greedy (the `neurons` picked "
                          "one at a time, each adding the most natural-gradient loss drop given those already "
                          "picked, so corpus correlations count), global / layer (grad x activation masks of the "
                          "paper, `sparsity_ratio` of them)"},
    )
    neurons: int = field(default=368, metadata={"help": "contrast / fisher / greedy: neurons per patch over all "
                                                        "layers (368 = 0.8 % of the default model's FFN neurons: "
                                                        "its adapter just under 1 MB)"})
    sparsity_ratio: float = field(default=0.25, metadata={"help": "global / layer: rho, share of d_ff neurons kept by the mask"})
    protect: Literal["covariance", "nullspace", "none"] = field(
        default="covariance",
        metadata={"help": "the prior's metric: covariance (least change of the layer's output on the code "
                          "corpus, MEMIT-style), nullspace (only corpus-unused directions, AlphaEdit-style), "
                          "none (the paper's plain minimum norm)"},
    )
    output_metric: Literal["none", "fisher"] = field(
        default="fisher",
        metadata={"help": "least_change / natural steps and the fisher selection: how a change of a layer's output "
                          "counts. none: every direction of the residual stream the same (the least change of the "
                          "layer's output on the corpus); fisher: weighted by how much it moves the model's "
                          "predictions there, R_l = E[g gᵀ] with g the gradient of a sampled next-token loss w.r.t. "
                          "the layer's FFN output (K-FAC's output factor: the least expected KL on normal code)"},
    )
    output_ridge: float = field(default=1e-1, metadata={"help": "output_metric=fisher: mu of R + mu mean(diag R) I"})
    ridge: float = field(default=1e-2, metadata={"help": "covariance: lambda of C + lambda mean(diag C) I; nullspace: the weight left to used directions"})
    nullspace_threshold: float = field(default=2e-2, metadata={"help": "nullspace: eigenvalues below this share of the largest count as unused"})
    keep_weight: float = field(
        default=1.0,
        metadata={"help": "weight of the earlier fixes' activations in the protected statistic, relative to the "
                          "whole corpus (0 = earlier fixes are not protected)"},
    )
    keep_rows: int = field(
        default=256,
        metadata={"help": "batch mode: most target tokens of earlier fixes that may join the problem as keep rows. "
                          "They join as an active set: after a solve, every earlier fix it moved past its allowance "
                          "joins and the solve goes on (up to 3 times), so a repair pays only for the fixes it "
                          "touches; the others are protected through the statistic (keep_weight). least_change "
                          "holds a keep row the argmax, its soft margin dropping by at most 0.25 or half its lead; "
                          "the other step rules hold it at zero change. 0: earlier fixes never join"},
    )
    give_up: bool = field(
        default=True,
        metadata={"help": "token mode: end the repair at the first failing token still wrong after its steps (the "
                          "repair then fails verification anyway, so it fails fast); false walks on through the "
                          "later tokens and passes, as the reference code does"},
    )
    steer: Literal["delta", "basis"] = field(
        default="delta", metadata={"help": "semantic steer b_t - b_a (delta) or b_t alone (basis)"}
    )
