"""Benchmark metrics. Definitions (also in docs/benchmark.md):

* token ExactMatch (EM) of a prompt and reference: the share of reference tokens that are the model's argmax
  under teacher forcing (prompt + reference prefix).
* fixed / exact: every reference token is the argmax, i.e. greedy decoding writes the reference tokens.
* log-likelihood of a continuation: the mean per-token log-probability of its tokens under teacher forcing.
* specificity of one repair over control prompts, each with its own greedy first line as the reference
  (taken on the original weights): `unchanged` = share of controls whose teacher-forced argmax over that
  line is the same as before the repair (so greedy decoding still writes the same line);
  `abs_dloglik` = mean |loglik_after - loglik_before| of those lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..capture import token_exact_match
from ..model import LoadedModel
from .data import Scored


@dataclass(frozen=True)
class Score:
    em: float          # token ExactMatch
    exact: bool        # every token is the argmax
    loglik: float      # mean log-probability of the continuation's tokens
    predicted: tuple[int, ...] = ()   # the argmax at each continuation position


@torch.no_grad()
def score(lm: LoadedModel, items: Sequence[Scored], batch: int = 16) -> list[Score]:
    """Teacher-forced scores of each (prompt, continuation), in right-padded batches (padding after the
    real tokens never changes a causal model's outputs at the real positions)."""
    out: list[Score] = []
    for b in range(0, len(items), batch):
        chunk = items[b : b + batch]
        seqs = [list(s.prompt_ids) + list(s.cont_ids) for s in chunk]
        width = max(map(len, seqs))
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        logprobs = lm.model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        for i, s in enumerate(chunk):
            start, n = len(s.prompt_ids) - 1, len(s.cont_ids)
            lp = logprobs[i, start : start + n]
            cont = torch.tensor(s.cont_ids)
            predicted = lp.argmax(-1).tolist()
            out.append(Score(
                em=token_exact_match(predicted, s.cont_ids),
                exact=predicted == list(s.cont_ids),
                loglik=float(lp.gather(1, cont[:, None]).mean()),
                predicted=tuple(predicted),
            ))
    return out


def specificity(before: Sequence[Score], after: Sequence[Score]) -> tuple[float, float]:
    """(share of controls whose greedy line is unchanged, mean |delta loglik|), `before` scored on the
    original weights. Unchanged = the same argmax at every position of the line as before."""
    if not before:
        return 1.0, 0.0
    unchanged = sum(a.predicted == b.predicted for a, b in zip(after, before)) / len(after)
    dll = sum(abs(a.loglik - b.loglik) for a, b in zip(after, before)) / len(before)
    return unchanged, dll


def mean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def median(xs: Sequence[float]) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


@dataclass
class CaseOutcome:
    """What one method did to one case."""

    fixed: bool
    em_before: float
    em_after: float
    seconds: float
    neurons: int
    layers: int
    alt_before: list[Score]
    alt_after: list[Score]
    spec_unchanged: float | None = None    # only for kept repairs
    spec_dloglik: float | None = None
    method_seconds: float | None = None    # the method's own share of `seconds`
    locality_unchanged: float | None = None   # kept repairs: held-out corpus argmax unchanged
    locality_dnll: float | None = None        # ... and mean |delta NLL| there
    adapter_bytes: int | None = None          # ... and the size of its adapter weights file


def summarise(outcomes: Sequence[CaseOutcome]) -> dict:
    """Per-method aggregate. Rates over all cases; neurons/layers and specificity over the fixed cases
    (the patches a user keeps); generalization over all alternate phrasings of all cases."""
    fixed = [o for o in outcomes if o.fixed]
    alt_b = [s for o in outcomes for s in o.alt_before]
    alt_a = [s for o in outcomes for s in o.alt_after]
    gen = {
        "n_cases": sum(1 for o in outcomes if o.alt_before),
        "n_prompts": len(alt_a),
        "em_before": mean([s.em for s in alt_b]),
        "em_after": mean([s.em for s in alt_a]),
        "fix_rate_before": mean([float(s.exact) for s in alt_b]),
        "fix_rate_after": mean([float(s.exact) for s in alt_a]),
    }
    spec = {
        "n_cases": len(fixed),
        "unchanged": mean([o.spec_unchanged for o in fixed]),
        "mean_abs_dloglik": mean([o.spec_dloglik for o in fixed]),
    }
    return {
        "n_cases": len(outcomes),
        "n_fixed": len(fixed),
        "fix_rate": mean([float(o.fixed) for o in outcomes]),
        "em_before": mean([o.em_before for o in outcomes]),
        "em_after": mean([o.em_after for o in outcomes]),
        "generalization": gen["em_after"],
        "specificity": spec["unchanged"],
        "generalization_detail": gen,
        "specificity_detail": spec,
        "seconds_per_case": mean([o.seconds for o in outcomes]),
        "method_seconds_per_case": mean([o.method_seconds for o in outcomes]),
        "neurons_per_case": mean([o.neurons for o in fixed]),
        "neurons_median": median([o.neurons for o in fixed]),
        "locality": mean([o.locality_unchanged for o in fixed]),
        "locality_worst": min([o.locality_unchanged for o in fixed if o.locality_unchanged is not None], default=None),
        "locality_dnll": mean([o.locality_dnll for o in fixed]),
        "adapter_bytes_median": median([o.adapter_bytes for o in fixed]),
        "layers_per_case": mean([o.layers for o in fixed]),
    }
