"""Run repair methods over benchmark cases: independent mode (every repair from the original weights) and,
optionally, sequential mode (all cases in a row, no reset)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ..capture import encode, target_text
from ..case import RepairInputError
from ..generate import writes
from ..methods import get_method
from ..model import LoadedModel
from ..patch import WeightSnapshot
from ..repair import repair, undo
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
_DENSE = {"mode": "token", "layer_ratio": "1.0", "sparsity": "none"}
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


def _outcome(lm: LoadedModel, data: BenchData, bc, result, alt_before, ctl_before) -> CaseOutcome:
    report = result.cases[0]
    if result.fixed:
        alt_after = score(lm, bc.alternates) if bc.alternates else []
        unchanged, dll = specificity(ctl_before, score(lm, data.controls))
    else:   # restored bit for bit by the driver: nothing moved
        alt_after, unchanged, dll = alt_before, None, None
    return CaseOutcome(result.fixed, report.em_before, report.em_after, result.seconds, result.neurons,
                       len(result.layers), alt_before, alt_after, unchanged, dll, result.method_seconds)


def run_independent(lm: LoadedModel, data: BenchData, variant: Variant, tick: Callable[[], None] = lambda: None) -> dict:
    ctl_before = score(lm, data.controls)
    outcomes = []
    for bc in data.cases:
        alt_before = score(lm, bc.alternates) if bc.alternates else []
        result = repair(lm, [bc.case], variant.method, variant.overrides)
        outcomes.append(_outcome(lm, data, bc, result, alt_before, ctl_before))
        if result.fixed:
            undo(lm, result)
        tick()
    summary = summarise(outcomes)
    summary["method"] = variant.method
    summary["config"] = asdict(get_method(variant.method, variant.overrides).config)
    summary["cases"] = [
        {"id": bc.record.get("id"), "fixed": o.fixed, "em_before": o.em_before, "em_after": o.em_after,
         "seconds": round(o.seconds, 3),
         "method_seconds": round(o.method_seconds, 3), "neurons": o.neurons, "layers": o.layers}
        for bc, o in zip(data.cases, outcomes)
    ]
    return summary


def _writes(lm: LoadedModel, bc) -> bool:
    text = target_text(bc.case.fix)
    ids = encode(lm, text)
    return writes(lm, encode(lm, bc.case.prompt), text, len(ids) + 4)[0]


def run_sequential(lm: LoadedModel, data: BenchData, variant: Variant, tick: Callable[[], None] = lambda: None) -> dict:
    """All cases one after another, keeping every successful patch; then how many earlier fixes still hold."""
    snapshot = WeightSnapshot(lm.arch)
    fixed, already, seconds = [], 0, 0.0
    try:
        for i, bc in enumerate(data.cases):
            try:
                result = repair(lm, [bc.case], variant.method, variant.overrides)
            except RepairInputError:     # an earlier patch already taught it this fix
                already += 1
                tick()
                continue
            seconds += result.seconds
            if result.fixed:
                fixed.append(i)
            tick()
        held = [i for i in fixed if _writes(lm, data.cases[i])]
        final = sum(_writes(lm, bc) for bc in data.cases)
    finally:
        snapshot.restore()
    n = len(data.cases)
    return {
        "n_cases": n,
        "n_fixed": len(fixed),
        "already_written": already,
        "held": len(held) / len(fixed) if fixed else None,
        "final_fix_rate": final / n if n else None,
        "seconds_per_case": seconds / n if n else None,
    }
