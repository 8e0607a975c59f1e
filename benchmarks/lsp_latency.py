#!/usr/bin/env python
"""Completion latency of the real language server, driven like an editor drives it.

Starts `python -m star_server` (the default model unless --model), opens an empty Python file and
types a realistic file into it character by character through a real LSP client over stdio
(pygls): ~100 ms between keys with jitter, longer pauses at line ends and now and then between words.
After every keystroke it sends `textDocument/didChange` (incremental) and an automatic
`textDocument/inlineCompletion`, and cancels the previous request if it is still running
(`$/cancelRequest`), as VS Code does. When a shown completion is exactly what the typist was going to
type next, the typist accepts it (Tab) and skips ahead.

At a pause (>= 0.3 s) the typist looks for a suggestion and waits for it before typing on, so those
requests are measured in full (no survivor bias from cancellations); while typing fast most requests
are cancelled by the next key, as in an editor.

Prints p50/p95 latency of the answered requests (all, single-line, and those at pauses), the number of
cancellations, how many answers came from the server's cache, and the server's RSS; then, for
comparison in the same run and on the prefixes of the single-line requests at pauses, the latency
without the server: a plain `star_engine.generate.complete()` call, and the server's own prompt +
decoding pipeline without KV reuse or cache.

    .venv/bin/python benchmarks/lsp_latency.py [--model M[,M2]] [--compare] [--chars 1200] [--json out.json]

This is a benchmark, not a test: numbers depend on the machine and its load (printed with them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pygls.lsp.client import LanguageClient

from star_server.prompting import decide_mode

TRACE = '''import json
import os
from dataclasses import dataclass, field


@dataclass
class Task:
    name: str
    done: bool = False
    tags: list[str] = field(default_factory=list)


def load_tasks(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        data = json.load(f)
    return [Task(**item) for item in data]


def save_tasks(path, tasks):
    with open(path, "w") as f:
        json.dump([task.__dict__ for task in tasks], f, indent=2)


def pending(tasks):
    return [task for task in tasks if not task.done]


def count_by_tag(tasks):
    counts = {}
    for task in tasks:
        for tag in task.tags:
            counts[tag] = counts.get(tag, 0) + 1
    return counts


def main():
    tasks = load_tasks("tasks.json")
    for task in pending(tasks):
        print(task.name)
    print(count_by_tag(tasks))
    save_tasks("tasks.json", tasks)


if __name__ == "__main__":
    main()
'''

VISIBLE_PAUSE_S = 0.3    # a pause this long after a key: the typist looks for a suggestion...
PAUSE_WAIT_S = 10.0      # ...and waits for it (up to this long) before typing on


def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def fmt(ms):
    return "   -  " if ms is None else f"{ms:6.0f}"


def rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process, from /proc (Linux)."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    kib = lambda k: int(fields.get(k, "0 kB").split()[0])
    return kib("VmRSS") / 1024, kib("VmHWM") / 1024


def position_at(text: str) -> types.Position:
    lines = text.split("\n")
    return types.Position(line=len(lines) - 1, character=len(lines[-1].encode("utf-16-le")) // 2)


def typing_plan(text: str, seed: int, gap_ms: float):
    """(char, pause after it in seconds) for every character."""
    rng = random.Random(seed)
    plan = []
    for i, ch in enumerate(text):
        gap = min(0.25, max(0.04, rng.gauss(gap_ms / 1000, gap_ms / 4000)))
        if ch == "\n":
            gap = rng.uniform(0.4, 1.2)          # end of a line: read, think
        elif ch == " " and rng.random() < 0.08:
            gap = rng.uniform(0.3, 0.7)          # between words, now and then
        plan.append((ch, gap))
    return plan


class Typist:
    def __init__(self, client: LanguageClient, uri: str):
        self.client, self.uri = client, uri
        self.text = ""
        self.version = 1
        self.pending: dict[str, dict] = {}
        self.records: list[dict] = []
        self.shown: str | None = None
        self.accepted = 0
        self.counter = 0

    def change(self, insert: str) -> None:
        at = position_at(self.text)
        self.text += insert
        self.version += 1
        self.client.text_document_did_change(types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=self.uri, version=self.version),
            content_changes=[types.TextDocumentContentChangePartial(range=types.Range(start=at, end=at), text=insert)],
        ))

    def request(self) -> None:
        for msg_id, rec in list(self.pending.items()):   # cancel-previous, like VS Code
            if not rec["task"].done():
                self.client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id=msg_id))
        self.counter += 1
        msg_id = f"c{self.counter}"
        at = position_at(self.text)
        line_after = ""
        multiline, _ = decide_mode(self.text, line_after, "auto")
        params = types.InlineCompletionParams(
            context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic),
            text_document=types.TextDocumentIdentifier(uri=self.uri),
            position=at,
        )
        rec = {"id": msg_id, "t0": time.perf_counter(), "prefix": self.text, "multiline": multiline,
               "visible": False, "cancelled": False, "latency": None, "text": None}
        rec["task"] = asyncio.ensure_future(self.client.protocol.send_request_async(
            types.TEXT_DOCUMENT_INLINE_COMPLETION, params, msg_id=msg_id))
        rec["task"].add_done_callback(lambda t, rec=rec: self._done(rec, t))
        self.pending[msg_id] = rec
        self.records.append(rec)

    def _done(self, rec, task) -> None:
        self.pending.pop(rec["id"], None)
        rec["latency"] = (time.perf_counter() - rec["t0"]) * 1000
        try:
            result = task.result()
        except (JsonRpcException, asyncio.CancelledError):
            rec["cancelled"] = True
            return
        items = result.items if result is not None else []
        rec["text"] = items[0].insert_text if items else ""
        if rec["prefix"] == self.text:
            self.shown = rec["text"]


async def run_server_trace(args, model: str | None, options: dict) -> dict:
    command = [sys.executable, "-m", "star_server", "--adapters", args.adapters]
    command += ["--log-level", "debug", "--log-file", args.server_log] if args.server_log else ["--log-level", "warning"]
    if model:
        command += ["--model", model]
    client = LanguageClient("star-bench", "1.0")
    statuses = []
    client.feature("star/status")(lambda ls, params: statuses.append(params))
    client.feature(types.WINDOW_SHOW_MESSAGE)(lambda ls, params: None)
    client.feature(types.WINDOW_LOG_MESSAGE)(lambda ls, params: None)
    started = time.perf_counter()
    await client.start_io(*command)
    await client.initialize_async(types.InitializeParams(
        capabilities=types.ClientCapabilities(text_document=types.TextDocumentClientCapabilities(
            inline_completion=types.InlineCompletionClientCapabilities())),
        initialization_options={"debounceMs": 0} | options,
    ))
    client.initialized(types.InitializedParams())
    while not any(getattr(s, "kind", None) == "ready" for s in statuses):
        if any(getattr(s, "kind", None) == "error" for s in statuses):
            raise SystemExit(f"the server could not load the model: {statuses[-1].message}")
        await asyncio.sleep(0.05)
    ready_s = time.perf_counter() - started
    pid = client._server.pid

    uri = Path(tempfile.gettempdir(), "star-bench-typing.py").as_uri()
    client.text_document_did_open(types.DidOpenTextDocumentParams(
        types.TextDocumentItem(uri=uri, language_id="python", version=1, text="")))
    typist = Typist(client, uri)
    target = TRACE[: args.chars] if args.chars else TRACE
    plan = typing_plan(target, args.seed, args.gap_ms)
    i = 0
    trace_started = time.perf_counter()
    while i < len(plan):
        upcoming = target[len(typist.text):]
        if typist.shown and len(typist.shown) >= 2 and upcoming.startswith(typist.shown):
            # the completion is what the typist was about to write: Tab
            accepted = typist.shown
            typist.change(accepted)
            typist.accepted += 1
            typist.shown = None
            i += len(accepted)
            await asyncio.sleep(0.15)
            if i < len(plan):
                typist.request()
                await asyncio.sleep(plan[i - 1][1])
            continue
        ch, gap = plan[i]
        typist.shown = None
        typist.change(ch)
        typist.request()
        i += 1
        rec = typist.records[-1]
        if gap >= VISIBLE_PAUSE_S:
            # a pause: the typist looks at the suggestion, so this request is never cut short by the next key
            rec["visible"] = True
            deadline = time.perf_counter() + max(gap, PAUSE_WAIT_S)
            while not rec["task"].done() and time.perf_counter() < deadline:
                await asyncio.sleep(0.005)
            await asyncio.sleep(max(0.0, gap - (time.perf_counter() - rec["t0"])))
        else:
            await asyncio.sleep(gap)
    while typist.pending:
        await asyncio.sleep(0.05)
    trace_s = time.perf_counter() - trace_started
    stats = await client.workspace_execute_command_async(types.ExecuteCommandParams(command="star.stats"))
    rss, peak = rss_mib(pid)
    await client.shutdown_async(None)
    client.exit(None)
    await client.stop()
    return {"records": typist.records, "accepted": typist.accepted, "stats": stats, "rss_mib": rss,
            "peak_rss_mib": peak, "ready_s": ready_s, "trace_s": trace_s}


def baselines(model: str | None, prefixes: list[str]) -> dict[str, list[float]]:
    """Latency without the server, in this process, on the same prefixes:
    * `complete()`: the engine's plain call (the whole prompt prefilled, 24 new tokens, no healing);
    * "same pipeline": the server's prompt, token healing and decoding, but no KV reuse and no cache,
      with and without prompt-lookup drafts."""
    import torch

    from star_engine.decode import Decoder
    from star_engine.generate import complete, complete_prompt
    from star_engine.model import load_model
    from star_server.prompting import Context, build_prompt

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))   # as the server does
    lm = load_model(model)
    gen = Decoder(lm)
    complete(lm, "import os\n", max_new_tokens=2)   # warm-up
    out = {"plain complete() (no server)": [], "same pipeline, no KV reuse/cache": [],
           "same, and no drafts": []}
    for prefix in prefixes:
        t0 = time.perf_counter()
        complete(lm, prefix, max_new_tokens=24)
        out["plain complete() (no server)"].append((time.perf_counter() - t0) * 1000)
        prompt = build_prompt(Context.at(prefix, len(prefix), 384), lm.tokenizer)
        for name, speculate in (("same pipeline, no KV reuse/cache", True), ("same, and no drafts", False)):
            t0 = time.perf_counter()
            complete_prompt(gen, prompt.text, max_new_tokens=prompt.max_new_tokens, multiline=prompt.multiline,
                            base_indent=prompt.base_indent, heal=prompt.heal, speculate=speculate)
            out[name].append((time.perf_counter() - t0) * 1000)
    return out


def summarize(result: dict, baseline: dict[str, list[float]] | None) -> dict:
    recs = [{k: v for k, v in r.items() if k != "task"} for r in result["records"]]
    answered = [r for r in recs if not r["cancelled"]]
    single = [r for r in answered if not r["multiline"]]
    groups = {
        "all answered": answered,
        "single-line, answered": single,
        "single-line, at pauses": [r for r in single if r["visible"]],
        "multi-line, at pauses": [r for r in answered if r["multiline"] and r["visible"]],
    }
    table = {}
    for name, rows in groups.items():
        lat = [r["latency"] for r in rows]
        table[name] = {"n": len(rows), "p50_ms": percentile(lat, 0.5), "p95_ms": percentile(lat, 0.95)}
    for name, lat in (baseline or {}).items():
        table[name] = {"n": len(lat), "p50_ms": percentile(lat, 0.5), "p95_ms": percentile(lat, 0.95)}
    cache = result["stats"]["cache"]
    return {
        "requests": len(recs),
        "pauses": sum(r["visible"] for r in recs),
        "pauses_cancelled": sum(r["visible"] and r["cancelled"] for r in recs),
        "answered_from_cache": result["stats"]["cached"],
        "cancelled": sum(r["cancelled"] for r in recs),
        "shown": sum(bool(r["text"]) for r in answered),
        "accepted": result["accepted"],
        "latency": table,
        "server": {k: result["stats"][k] for k in ("generated", "cached", "cancelled", "generationMsP50", "generationMsP95",
                                                   "newTokens", "forwardPasses", "drafted", "draftAccepted")},
        "cache_hit_rate": cache["hitRate"],
        "cache_forward_hits": cache["forwardHits"],
        "rss_mib": round(result["rss_mib"]),
        "peak_rss_mib": round(result["peak_rss_mib"]),
        "ready_s": round(result["ready_s"], 1),
        "trace_s": round(result["trace_s"], 1),
        "cpus": os.cpu_count(),
        "loadavg_1min": os.getloadavg()[0],
    }


def report(name: str, summary: dict) -> None:
    print(f"\n== {name}: typed {summary['requests']} keystrokes in {summary['trace_s']} s "
          f"(server ready after {summary['ready_s']} s); {summary['cancelled']} requests cancelled by the next key; "
          f"{summary['pauses']} pauses; {summary['shown']} completions shown, {summary['accepted']} accepted")
    print(f"{'':34} {'n':>5} {'p50 ms':>7} {'p95 ms':>7}")
    for group, row in summary["latency"].items():
        print(f"{group:34} {row['n']:5d} {fmt(row['p50_ms'])}  {fmt(row['p95_ms'])}")
    s = summary["server"]
    answered = summary["latency"]["all answered"]["n"]
    print(f"server: {s['generated']} generations (p50 {s['generationMsP50']} ms, p95 {s['generationMsP95']} ms); "
          f"{s['cached']} of {answered} answered requests served from the cache "
          f"({summary['cache_forward_hits']} typing-forward); hit rate over all lookups {summary['cache_hit_rate']:.1%}")
    print(f"decoding: {s['newTokens']} new tokens in {s['forwardPasses']} forward passes; "
          f"{s['draftAccepted']} of {s['drafted']} drafted tokens accepted")
    print(f"server RSS {summary['rss_mib']} MiB (peak {summary['peak_rss_mib']} MiB); {summary['cpus']} CPUs, "
          f"load average {summary['loadavg_1min_before']:.1f} before, {summary['loadavg_1min']:.1f} after")


def main(argv=None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as the server does (before torch loads)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="",
                        help="model spec for the server (default: the embedded default model); several, "
                             "comma-separated, are typed one after the other in the same run")
    parser.add_argument("--chars", type=int, default=0, help="type only the first N characters of the trace")
    parser.add_argument("--gap-ms", type=float, default=100.0, help="mean gap between keystrokes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", type=int, default=30,
                        help="prefixes (of the single-line requests at pauses) to time without the server (0: skip)")
    parser.add_argument("--compare", action="store_true",
                        help="then type the same trace again with the decoder as it was before drafting and the "
                             "multi-line budget (speculate off, multilineBudgetMs 0), for a same-run comparison")
    parser.add_argument("--json", help="also write the summary (and every request) to this file")
    parser.add_argument("--server-log", help="the server's debug log (per-completion timings) goes here")
    args = parser.parse_args(argv)

    runs = []
    for model in args.model.split(",") if args.model else [None]:
        runs.append((model or "default model", model, {}))
        if args.compare:
            runs.append((f"{model or 'default model'}, no drafts, no multi-line budget", model,
                         {"speculate": False, "multilineBudgetMs": 0}))
    summaries = {}
    for name, model, options in runs:
        load_before = os.getloadavg()[0]
        with tempfile.TemporaryDirectory(prefix="star-bench-") as adapters:
            args.adapters = adapters
            result = asyncio.run(run_server_trace(args, model, options))
        visible = [r["prefix"] for r in result["records"]
                   if r["visible"] and not r["cancelled"] and not r["multiline"]]
        baseline = None
        if args.baseline and visible and not options:
            step = max(1, len(visible) // args.baseline)
            baseline = baselines(model, visible[::step][: args.baseline])
        summary = summaries[name] = summarize(result, baseline)
        summary["loadavg_1min_before"] = load_before
        summary["records"] = [{k: v for k, v in r.items() if k not in ("task", "prefix")} for r in result["records"]]
        report(name, summary)
    if len(summaries) > 1:
        print("\nsame trace, same run:")
        for i, name in enumerate(summaries):
            print(f"  [{i + 1}] {name}")
        print(f"{'':34} " + "  ".join(f"{'[' + str(i + 1) + ']':>20}" for i in range(len(summaries))))
        for group in ("single-line, at pauses", "multi-line, at pauses"):
            cells = [summaries[n]["latency"][group] for n in summaries]
            print(f"{group + ' p50/p95 ms':34} " + "  ".join(
                f"{fmt(c['p50_ms']).strip() + ' / ' + fmt(c['p95_ms']).strip():>20}" for c in cells))
        for label, key in (("completions shown", "shown"), ("accepted", "accepted"), ("server RSS MiB", "rss_mib")):
            print(f"{label:34} " + "  ".join(f"{summaries[n][key]:>20}" for n in summaries))
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
