"""Run repair methods over benchmark cases: independent mode (every repair from the original weights) and,
optionally, sequential mode (all cases in a row, no reset)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..adapters import PatchStack
from ..adapters.format import WEIGHTS_NAME, encode_result
from ..capture import encode_case, teacher_forced_leads
from ..case import RepairInputError
from ..generate import writes_fix
from ..guard import GuardConfig
from ..locality import behaviour, compare, held_windows
from ..methods import get_method
from ..model import LoadedModel
from ..patch import WeightSnapshot, apply_patch, restore_columns
from ..repair import keep_or_undo, repair, undo
from .data import BenchData
from .metrics import CaseOutcome, score, specificity, summarise


@dataclass(frozen=True)
class Variant:
    """One row of the table: a method with settings, under a label."""

    label: str
    method: str
    overrides: dict = field(default_factory=dict)


# The STAR ablation grid (star_method.md §2): layer selection, neuron sparsity, token vs batch mode.
# Every entry spells out the settings it ablates, so the grid does not move when the defaults do.
_PAPER_STEP = {"protect": "none", "output_metric": "none", "direction": "seme", "step_rule": "fixed", "steps": "10",
               "keep_rows": "0"}
_DENSE = {"mode": "token", "layer_ratio": "1.0", "sparsity": "none"} | _PAPER_STEP
_LOCAL = {"mode": "batch", "layer_ratio": "1.0", "step_rule": "minimal", "steps": "10", "keep_rows": "0",
          "output_metric": "none", "neurons": "460"}
_SHIPPED = {"mode": "batch", "layer_ratio": "1.0", "sparsity": "fisher", "neurons": "368", "protect": "covariance",
            "output_metric": "fisher", "step_rule": "least_change", "steps": "20", "polish": "5", "keep_rows": "256",
            "margin": "0.5"}
ABLATION: list[tuple[str, dict]] = [
    ("star[all layers, dense, token]", _DENSE),
    ("star[top 1/4 layers]", _DENSE | {"layer_ratio": "0.25"}),
    ("star[top 1/2 layers]", _DENSE | {"layer_ratio": "0.5"}),
    ("star[global 1/4]", _DENSE | {"sparsity": "global", "sparsity_ratio": "0.25"}),
    ("star[global 1/16]", _DENSE | {"sparsity": "global", "sparsity_ratio": "0.0625"}),
    ("star[global 1/64]", _DENSE | {"sparsity": "global", "sparsity_ratio": "0.015625"}),
    ("star[global 1/256]", _DENSE | {"sparsity": "global", "sparsity_ratio": "0.00390625"}),
    ("star[layer 1/4]", _DENSE | {"sparsity": "layer", "sparsity_ratio": "0.25"}),
    ("star[layer 1/16]", _DENSE | {"sparsity": "layer", "sparsity_ratio": "0.0625"}),
    ("star[layer 1/64]", _DENSE | {"sparsity": "layer", "sparsity_ratio": "0.015625"}),
    ("star[layer 1/256]", _DENSE | {"sparsity": "layer", "sparsity_ratio": "0.00390625"}),
    ("star[batch]", _DENSE | {"mode": "batch"}),
    # The local-patch settings (issue 11): metric, neuron selection, step direction, under the minimal step.
    ("star[local: dense, plain prior]", _LOCAL | {"sparsity": "none", "protect": "none", "direction": "seme"}),
    ("star[local: dense, covariance, seme]", _LOCAL | {"sparsity": "none", "protect": "covariance", "direction": "seme"}),
    ("star[local: dense, covariance, gradient]", _LOCAL | {"sparsity": "none", "protect": "covariance", "direction": "gradient"}),
    ("star[local: dense, nullspace, gradient]", _LOCAL | {"sparsity": "none", "protect": "nullspace", "direction": "gradient"}),
    ("star[local: contrast 128, covariance, seme]", _LOCAL | {"sparsity": "contrast", "neurons": "128", "protect": "covariance", "direction": "seme"}),
    ("star[local: contrast 128, covariance, gradient]", _LOCAL | {"sparsity": "contrast", "neurons": "128", "protect": "covariance", "direction": "gradient"}),
    ("star[local: contrast 512, covariance, gradient]", _LOCAL | {"sparsity": "contrast", "neurons": "512", "protect": "covariance", "direction": "gradient"}),
    ("star[local: dense, covariance, natural]", _LOCAL | {"sparsity": "none", "protect": "covariance", "direction": "natural", "lr": "1.0"}),
    ("star[local: contrast 128, covariance, natural]", _LOCAL | {"sparsity": "contrast", "neurons": "128", "protect": "covariance", "direction": "natural", "lr": "1.0"}),
    ("star[local: fisher 128, covariance, natural]", _LOCAL | {"sparsity": "fisher", "neurons": "128", "protect": "covariance", "direction": "natural", "lr": "1.0"}),
    ("star[local: fisher 460, covariance, natural]", _LOCAL | {"sparsity": "fisher", "neurons": "460", "protect": "covariance", "direction": "natural", "lr": "1.0"}),
    ("star[local: greedy 128, covariance, natural]", _LOCAL | {"sparsity": "greedy", "neurons": "128", "protect": "covariance", "direction": "natural", "lr": "1.0"}),
    ("star[local: greedy 460, covariance, natural]", _LOCAL | {"sparsity": "greedy", "neurons": "460", "protect": "covariance", "direction": "natural", "lr": "1.0"}),
    ("star[local: fisher 460, covariance, least change]", _LOCAL | {"sparsity": "fisher", "neurons": "460", "protect": "covariance", "step_rule": "least_change", "steps": "20"}),
    ("star[local: fisher 460, covariance, least change, keep rows]", _LOCAL | {"sparsity": "fisher", "neurons": "460", "protect": "covariance", "step_rule": "least_change", "steps": "20", "keep_rows": "256"}),
    ("star[local: fisher 460, covariance, least change, output fisher]", _LOCAL | {"sparsity": "fisher", "neurons": "460", "protect": "covariance", "step_rule": "least_change", "steps": "20", "output_metric": "fisher"}),
    ("star[local: fisher 368, covariance, least change, output fisher]", _LOCAL | {"sparsity": "fisher", "neurons": "368", "protect": "covariance", "step_rule": "least_change", "steps": "20", "output_metric": "fisher"}),
    ("star[local: fisher 192, covariance, least change]", _LOCAL | {"sparsity": "fisher", "neurons": "192", "protect": "covariance", "step_rule": "least_change", "steps": "20"}),
    # The shipped setting, and the headroom a fix keeps (does a larger margin let patches made apart stack?).
    ("star[shipped: fisher 368, output fisher, least change, margin 0.5]", _SHIPPED),
    ("star[shipped, margin 1.0]", _SHIPPED | {"margin": "1.0"}),
    ("star[shipped, margin 2.0]", _SHIPPED | {"margin": "2.0"}),
    ("star[previous default: dense, covariance, seme]", _LOCAL | {"sparsity": "none", "protect": "covariance", "direction": "seme", "step_rule": "fixed"}),
]


def variants(methods: list[str], settings: dict[str, dict], ablation: bool | str) -> list[Variant]:
    """The table's rows: the methods, then (ablation true / "all", or a comma-separated pick of parts of
    the grid labels) the STAR grid."""
    out = [Variant(m, m, dict(settings.get(m, {}))) for m in methods]
    if ablation:
        picks = None if ablation in (True, "all") else [p.strip() for p in str(ablation).split(",") if p.strip()]
        grid = [(label, g) for label, g in ABLATION if picks is None or any(p in label for p in picks)]
        if not grid:
            raise ValueError(f"--ablation {ablation!r} matches no grid label: {[label for label, _ in ABLATION]}")
        out += [Variant(label, "star", dict(settings.get("star", {})) | g) for label, g in grid]
    for v in out:
        get_method(v.method, v.overrides)    # fail early on a bad method or setting
    return out


def _outcome(lm: LoadedModel, data: BenchData, bc, result, alt_before, ctl_before, held_before) -> CaseOutcome:
    report = result.cases[0]
    locality, size = None, None
    if result.fixed:
        alt_after = score(lm, bc.alternates) if bc.alternates else []
        unchanged, dll = specificity(ctl_before, score(lm, data.controls))
        locality = compare(held_before, behaviour(lm, held_windows(lm)))
        size = len(encode_result(lm, result).files[WEIGHTS_NAME])
    else:   # restored bit for bit by the driver: nothing moved
        alt_after, unchanged, dll = alt_before, None, None
    return CaseOutcome(result.fixed, report.em_before, report.em_after, result.seconds, result.neurons,
                       len(result.layers), alt_before, alt_after, unchanged, dll, result.method_seconds,
                       locality.unchanged if locality else None, locality.mean_dnll if locality else None, size)


def run_independent(lm: LoadedModel, data: BenchData, variant: Variant, tick: Callable[[str], None] = lambda status: None,
                    guard: GuardConfig | None = GuardConfig(), patches: list | None = None) -> dict:
    """Every case repaired from the original weights. `patches`, if given, receives each case's kept
    patch (None when not fixed), for the compose measure."""
    ctl_before = score(lm, data.controls)
    held_before = behaviour(lm, held_windows(lm))
    outcomes = []
    for bc in data.cases:
        alt_before = score(lm, bc.alternates) if bc.alternates else []
        result = repair(lm, [bc.case], variant.method, variant.overrides, guard=guard)
        outcomes.append(_outcome(lm, data, bc, result, alt_before, ctl_before, held_before))
        if patches is not None:
            patches.append(result.patch if result.fixed else None)
        if result.fixed:
            undo(lm, result)
        tick(f"fixed {sum(o.fixed for o in outcomes)} of {len(outcomes)}")
    summary = summarise(outcomes)
    summary["method"] = variant.method
    summary["config"] = asdict(get_method(variant.method, variant.overrides).config)
    summary["cases"] = [
        {"id": bc.record.get("id"), "fixed": o.fixed, "em_before": o.em_before, "em_after": o.em_after,
         "seconds": round(o.seconds, 3),
         "method_seconds": round(o.method_seconds, 3), "neurons": o.neurons, "layers": o.layers,
         "locality_unchanged": o.locality_unchanged, "locality_dnll": o.locality_dnll, "adapter_bytes": o.adapter_bytes}
        for bc, o in zip(data.cases, outcomes)
    ]
    return summary


def _writes(lm: LoadedModel, bc) -> bool:
    return writes_fix(lm, encode_case(lm, bc.case))[0]


def run_sequential(lm: LoadedModel, data: BenchData, variant: Variant, tick: Callable[[str], None] = lambda status: None,
                   guard: GuardConfig | None = GuardConfig(), keep_in: Path | None = None) -> dict:
    """All cases one after another through a real PatchStack, as the server does: each repair protects the
    stack's cases, a fixed one is added under the stack's regression policy (kept or refused). Then: how
    many kept fixes still hold, and the final model's locality against the base. The stack's folder is a
    temporary one unless `keep_in` (a new or empty folder) names where to leave it; the weights are
    restored either way."""
    if keep_in is not None:
        require_new_folder(keep_in)
    snapshot = WeightSnapshot(lm.arch)
    held = held_windows(lm)
    base = behaviour(lm, held)
    kept, refused, unfixed, already, seconds = [], 0, 0, 0, 0.0
    try:
        with _stack_folder(keep_in) as folder:
            stack = PatchStack(lm, folder)
            stack.load()
            for i, bc in enumerate(data.cases):
                try:
                    result = repair(lm, [bc.case], variant.method, variant.overrides, protect=stack.cases(), guard=guard)
                except RepairInputError:     # an earlier patch already taught it this fix
                    already += 1
                    tick(f"{already} already written")
                    continue
                seconds += result.seconds
                if not result.fixed:
                    unfixed += 1
                elif keep_or_undo(lm, result, stack.add)[0].fixed:
                    kept.append(i)
                else:
                    refused += 1
                tick(f"kept {len(kept)}, refused {refused}, not fixed {unfixed}; last repair {result.seconds:.0f} s")
            held_at_end = [i for i in kept if _writes(lm, data.cases[i])]
            final = compare(base, behaviour(lm, held))
            sizes = [p.size_bytes for p in stack.list()]
    finally:
        snapshot.restore()
    n = len(data.cases)
    return {
        "n_cases": n,
        "kept": len(kept),
        "refused": refused,
        "unfixed": unfixed,
        "already_written": already,
        "held": len(held_at_end) / len(kept) if kept else None,
        "final_locality_unchanged": final.unchanged,
        "final_locality_dnll": final.mean_dnll,
        "stack_bytes": sum(sizes),
        "seconds_per_case": seconds / n if n else None,
    }


def require_new_folder(path: Path) -> None:
    """A sequential run's stack goes to a new (or empty) folder, never on top of someone's patches."""
    if path.exists() and any(path.iterdir()):
        raise ValueError(f"{path} is not empty: the sequential stack needs a new folder")


@contextmanager
def _stack_folder(keep_in: Path | None) -> Iterator[Path]:
    if keep_in is None:
        with tempfile.TemporaryDirectory(prefix="star-bench-stack-") as folder:
            yield Path(folder)
    else:
        keep_in.mkdir(parents=True, exist_ok=True)
        yield keep_in


def run_compose(lm: LoadedModel, data: BenchData, patches: list, max_pairs: int = 20) -> dict:
    """Pairs of patches made independently on the base model (consecutive kept ones), applied together:
    the share of pairs where greedy decoding still writes both fixes; how many of the fixes break; and, per
    fix, how much the other patch takes from its least teacher-forced lead (median, in logits: what headroom
    a fix would need to survive its neighbour)."""
    fixed = [i for i, p in enumerate(patches) if p is not None]
    pairs = list(zip(fixed[0::2], fixed[1::2]))[:max_pairs]
    both, broken, drops = 0, 0, []
    for a, b in pairs:
        alone = {}
        for i in (a, b):
            saved = apply_patch(lm.arch, patches[i])
            alone[i] = _least_lead(lm, data.cases[i])
            restore_columns(lm.arch, saved)
        saved_a = apply_patch(lm.arch, patches[a])
        saved_b = apply_patch(lm.arch, patches[b])
        holds = [_writes(lm, data.cases[i]) for i in (a, b)]
        drops += [alone[i] - _least_lead(lm, data.cases[i]) for i in (a, b)]
        restore_columns(lm.arch, saved_b)
        restore_columns(lm.arch, saved_a)
        both += all(holds)
        broken += holds.count(False)
    drops.sort()
    return {"pairs": len(pairs), "both_hold": both / len(pairs) if pairs else None, "fixes_broken": broken,
            "lead_drop_median": drops[len(drops) // 2] if drops else None}


def _least_lead(lm: LoadedModel, bc) -> float:
    return float(teacher_forced_leads(lm, encode_case(lm, bc.case)).min())
