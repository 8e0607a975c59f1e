"""Benchmark outputs: results.json, report.md (the table) and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

PLOTS = {
    "em": "em_before_after.png",
    "time": "seconds_per_case.png",
    "gen_spec": "generalization_vs_specificity.png",
}


def _f(x, digits=2, pct=False):
    if x is None:
        return "–"
    return f"{100 * x:.0f} %" if pct else f"{x:.{digits}f}"


def time_ratios(results: dict, ref: str = "star", key: str = "seconds_per_case") -> dict:
    """{"star/mint": ..., ...}: the reference row's `key` over each baseline's, from the same run."""
    out = {}
    if ref not in results or not results[ref].get(key):
        return out
    for other in ("mint", "sgd", "lora"):
        if other in results and results[other].get(key):
            out[f"{ref}/{other}"] = results[ref][key] / results[other][key]
    return out


def _best_first(x, lower_is_better=False):
    """Sort key: the better value first, a missing value last."""
    if x is None:
        return float("inf")
    return x if lower_is_better else -x


def ranking(results: dict) -> list[str]:
    """The rows best first by the selection rule: effectiveness (fix rate, then EM after), then specificity
    (controls unchanged, then mean |delta log-lik|), then time."""
    def key(label):
        r = results[label]
        return (_best_first(r["fix_rate"]), _best_first(r["em_after"]), _best_first(r["specificity"]),
                _best_first(r["specificity_detail"]["mean_abs_dloglik"], True),
                _best_first(r["seconds_per_case"], True))
    return sorted(results, key=key)


def table(results: dict) -> str:
    rows = [
        "| method | cases | fix rate | EM before → after | gen. EM before → after (prompts) | gen. fix rate after "
        "| spec. unchanged | spec. mean abs Δlog-lik | s / case | method s / case | neurons / case | layers / case |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in results.items():
        g, s = r["generalization_detail"], r["specificity_detail"]
        rows.append(
            f"| {label} | {r['n_cases']} | {_f(r['fix_rate'], pct=True)} | {_f(r['em_before'])} → {_f(r['em_after'])} "
            f"| {_f(g['em_before'])} → {_f(g['em_after'])} ({g['n_prompts']}) | {_f(g['fix_rate_after'], pct=True)} "
            f"| {_f(s['unchanged'], pct=True)} | {_f(s['mean_abs_dloglik'], 3)} | {_f(r['seconds_per_case'], 1)} "
            f"| {_f(r.get('method_seconds_per_case'), 1)} | {_f(r['neurons_per_case'], 0)} | {_f(r['layers_per_case'], 1)} |"
        )
    return "\n".join(rows)


def _pct2(x) -> str:
    return "–" if x is None else f"{100 * x:.2f} %"


def _kib(n) -> str:
    return "–" if n is None else f"{n / 1024:.0f} KiB"


def _compose(c: dict | None) -> str:
    if not c or not c.get("pairs"):
        return "–"
    return (f"{100 * c['both_hold']:.0f} % of {c['pairs']} ({c['fixes_broken']} fixes broken; "
            f"median lead drop {c['lead_drop_median']:.2f})")


def locality_table(results: dict) -> str:
    rows = ["| method | kept patches | unrelated argmax unchanged, mean | worst | mean abs ΔNLL | neurons (median) "
            "| adapter file (median) | two independent patches stacked, both hold |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in results.items():
        rows.append(f"| {label} | {r['n_fixed']} | {_pct2(r.get('locality'))} | {_pct2(r.get('locality_worst'))} "
                    f"| {_f(r.get('locality_dnll'), 4)} | {_f(r.get('neurons_median'), 0)} "
                    f"| {_kib(r.get('adapter_bytes_median'))} | {_compose(r.get('compose'))} |")
    return "\n".join(rows)


def sequential_table(results: dict) -> str:
    rows = ["| method | cases | kept | refused by the stack | not fixed | already written | kept fixes still holding "
            "| unrelated argmax unchanged at the end | stack size |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in results.items():
        q = r.get("sequential")
        if q:
            rows.append(f"| {label} | {q['n_cases']} | {q['kept']} | {q['refused']} | {q['unfixed']} | {q['already_written']} "
                        f"| {_f(q['held'], pct=True)} | {_pct2(q['final_locality_unchanged'])} "
                        f"| {q['stack_bytes'] / 2**20:.2f} MiB |")
    return "\n".join(rows) if len(rows) > 2 else ""


def plot(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    x = range(len(labels))
    width = max(6.0, 1.1 * len(labels))

    fig, ax = plt.subplots(figsize=(width, 4))
    for k, (key, name) in enumerate([("em_before", "EM before"), ("em_after", "EM after"), ("fix_rate", "fix rate")]):
        ax.bar([i + (k - 1) * 0.27 for i in x], [results[l][key] or 0 for l in labels], 0.27, label=name)
    ax.set_xticks(list(x), labels, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_title("Effectiveness on the repaired cases")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / PLOTS["em"], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(width, 4))
    ax.bar(list(x), [results[l]["seconds_per_case"] or 0 for l in labels], color="tab:gray")
    ax.set_xticks(list(x), labels, rotation=30, ha="right")
    ax.set_ylabel("seconds per case (wall)")
    ax.set_title("Repair time")
    fig.tight_layout()
    fig.savefig(out / PLOTS["time"], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 5))
    for l in labels:
        g = results[l]["generalization_detail"]
        gain = (g["em_after"] - g["em_before"]) if g["em_after"] is not None else 0.0
        spec = results[l]["specificity"]
        if spec is None:    # no repair kept: nothing moved, which is not a specificity to compare
            ax.scatter([gain], [1.0], facecolors="none", edgecolors="gray")
            ax.annotate(f"{l} (no repair kept)", (gain, 1.0), fontsize=8, color="gray")
        else:
            ax.scatter([gain], [spec])
            ax.annotate(l, (gain, spec), fontsize=8)
    ax.set_xlabel("generalization: EM gain on other phrasings")
    ax.set_ylabel("specificity: controls unchanged")
    ax.set_title("Generalization vs specificity")
    fig.tight_layout()
    fig.savefig(out / PLOTS["gen_spec"], dpi=100)
    plt.close(fig)
    return list(PLOTS.values())


DEFINITIONS = """\
## Definitions

* **cases**: records whose greedy completion (on the original weights) is not the target, the first N
  after a seeded shuffle; targets over {max_tokens} tokens are skipped. Every method repairs every case
  from the same original weights (independent mode).
* **fix rate**: share of cases whose greedy completion writes the target after the repair (the driver's
  verification; an unfixed repair is rolled back).
* **EM before → after**: token ExactMatch (teacher-forced argmax = reference token), mean over cases, before
  and after the method ran (measured before any roll-back).
* **generalization**: the same EM on other phrasings of each case (CoNaLa `intent_alt`; records of the file
  with the same target), after the repair that was kept (a rolled-back repair leaves them as before);
  **gen. fix rate** = share of those prompts for which greedy decoding writes the target.
* **specificity**: over the kept repairs, the share of {n_controls} fixed control prompts (a seeded sample of
  other records) whose greedy first line is unchanged, and the mean absolute change of that line's mean
  per-token log-likelihood.
* **s / case**: wall-clock seconds of the repair call (the same driver checks for every method);
  **method s / case**: the part of it spent in the method itself, without the driver's input check and
  verification (greedy decoding before and after, identical work for every method);
  **neurons / layers per case**: columns / layers changed by the kept patches.
"""


def write(out: Path, results: dict, meta: dict) -> None:
    """The first table is the independent-mode one, or the sequential one when only that ran."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results | {"meta": meta}, indent=2))
    independent = {label: r for label, r in results.items() if "fix_rate" in r}
    plots = plot(independent, out) if independent else []
    ratios, method_ratios = meta.get("time_ratios", {}), meta.get("method_time_ratios", {})
    lines = [
        f"# Repair benchmark: {meta['data']}",
        "",
        f"Model `{meta['model']}`, prompt template `{meta['template']!r}` ({meta['kind']}), seed {meta['seed']}, "
        f"{meta['n_cases']} cases ({meta['records_checked']} records checked: {meta['already_right']} already "
        f"right, {meta['too_long']} targets too long), {meta['n_controls']} control prompts.",
        "",
        f"Command: `{meta['command']}`",
        "",
    ]
    seq = sequential_table(results)
    if independent:
        lines += [table(independent), ""]
    if ratios:
        lines += ["Time ratios (same run): " + ", ".join(f"{k} = {v:.2f}" for k, v in ratios.items()), ""]
    if method_ratios:
        lines += ["Method-time ratios (same run, the driver's shared checks left out): "
                  + ", ".join(f"{k} = {v:.2f}" for k, v in method_ratios.items()), ""]
    if len(independent) > 1:
        lines += ["Ranked by the selection rule (fix rate, EM after, controls unchanged, mean |Δlog-lik|, "
                  "s / case): " + " > ".join(f"`{label}`" for label in ranking(independent)), ""]
    if independent:
        lines += ["## Locality (held-out code corpus, per kept patch)", "", locality_table(independent), ""]
    if seq:
        heading = ["## Sequential mode (one repair after another through the patch stack)", ""] if independent else []
        lines += heading + [seq, ""]
    lines += [f"![{p}]({p})" for p in plots] + [""]
    lines.append(DEFINITIONS.format(max_tokens=meta["max_target_tokens"], n_controls=meta["n_controls"]))
    (out / "report.md").write_text("\n".join(lines))
