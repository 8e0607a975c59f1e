"""`star bench`: STAR and the baselines side by side on a JSON Lines dataset, with a report and plots."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark repair methods on a JSON Lines dataset (intent, target)")
    p.add_argument("--data", required=True, help="JSON Lines file with intent, target (optional intent_alt)")
    p.add_argument("--limit", type=int, default=50, help="number of cases (records the model gets wrong)")
    p.add_argument("--methods", default="star,mint,sgd,lora", help="comma-separated methods (default: all four)")
    p.add_argument("--model", help="embedded model name, HF directory or .gguf file (default: the embedded model)")
    p.add_argument("--out", default="bench-out", help="output directory (results.json, report.md, plots)")
    p.add_argument("--seed", type=int, default=0, help="shuffle / control-sample seed")
    p.add_argument("--set", action="append", metavar="METHOD.KEY=VALUE",
                   help="method setting, e.g. --set star.layer_ratio=0.25 (repeatable)")
    p.add_argument("--ablation", nargs="?", const="all", metavar="PICK",
                   help="also run the STAR ablation grid (layers, sparsity, mode); optional PICK = comma-separated "
                        "parts of grid labels to run only those, e.g. 'dense,top 1/4,layer 1/16'")
    p.add_argument("--sequential", action="store_true",
                   help="also run every method over all cases in a row through a real patch stack")
    p.add_argument("--sequential-only", action="store_true",
                   help="run only the cases in a row through the patch stack, not the independent repairs "
                        "(half the repairs of --sequential; no fix-rate or compose table)")
    p.add_argument("--compose", action="store_true",
                   help="also stack pairs of patches made independently on the base model: do both still hold?")
    p.add_argument("--no-guard", action="store_true",
                   help="turn the repair's locality guard off (it is on in `star repair` and the server)")
    p.add_argument("--kind", choices=["python", "bash", "asm"], help="prompt template (default: from the file path)")
    p.add_argument("--controls", type=int, default=10, help="control prompts for specificity")
    p.add_argument("--max-target-tokens", type=int, default=48, help="skip records with longer targets")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy shared machine)")
    p.set_defaults(func=cmd_bench)


def parse_method_settings(pairs: list[str] | None) -> dict[str, dict]:
    from ..cli import UserError

    out: dict[str, dict] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        method, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise UserError(f"--set wants METHOD.KEY=VALUE, got {pair!r}")
        out.setdefault(method, {})[name] = value.strip()
    return out


def cmd_bench(args) -> int:
    import torch
    from tqdm import tqdm

    from ..model import DEFAULT_MODEL, load_model
    from . import data as bench_data
    from .report import time_ratios, write
    from ..guard import GuardConfig
    from .runner import run_compose, run_independent, run_sequential, variants

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    settings = parse_method_settings(args.set)
    rows = variants(methods, settings, args.ablation)
    records = bench_data.load_records(args.data)
    kind = args.kind or bench_data.guess_kind(args.data)
    started = time.perf_counter()
    lm = load_model(args.model)
    with tqdm(total=args.limit, desc="finding cases", unit="case", file=sys.stderr) as bar:
        data = bench_data.build(lm, records, kind=kind, limit=args.limit, seed=args.seed, n_controls=args.controls,
                                max_target_tokens=args.max_target_tokens, progress=bar.update)
    if not data.cases:
        print("star: no case: the model already writes every target", file=sys.stderr)
    guard = None if args.no_guard else GuardConfig()
    results: dict[str, dict] = {}
    independent, sequential = not args.sequential_only, args.sequential or args.sequential_only
    per_row = len(data.cases) * (independent + sequential)
    with tqdm(total=per_row * len(rows), desc="repairing", unit="repair", file=sys.stderr) as bar:
        def tick(status: str) -> None:
            bar.set_postfix_str(status, refresh=False)
            bar.update()

        for v in rows:
            bar.set_description(v.label)
            patches: list = []
            results[v.label] = {}
            if independent:
                results[v.label] = run_independent(lm, data, v, tick, guard=guard, patches=patches)
            if independent and args.compose:
                results[v.label]["compose"] = run_compose(lm, data, patches)
            if sequential:
                results[v.label]["sequential"] = run_sequential(lm, data, v, tick, guard=guard)
    meta = {
        "command": "star bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "star bench",
        "data": str(args.data), "kind": kind, "template": bench_data.TEMPLATES[kind],
        "model": args.model or DEFAULT_MODEL, "seed": args.seed, "limit": args.limit,
        "n_cases": len(data.cases), "records_checked": data.checked, "already_right": data.already_right,
        "too_long": data.too_long, "n_controls": len(data.controls), "max_target_tokens": args.max_target_tokens,
        "variants": {v.label: {"method": v.method, "overrides": v.overrides} for v in rows},
        "time_ratios": time_ratios(results),
        "method_time_ratios": time_ratios(results, key="method_seconds_per_case"),
        "torch_threads": torch.get_num_threads(),
        "guard": None if guard is None else vars(guard),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(args.out)
    write(out, results, meta)
    print(f"wrote {out / 'results.json'}, {out / 'report.md'} and plots")
    print((out / "report.md").read_text().split("\n\n")[3])
    return 0
