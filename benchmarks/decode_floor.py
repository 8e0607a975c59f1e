#!/usr/bin/env python
"""How fast can this machine decode, and how close does the serving model come?

Greedy decoding of a small model on a CPU is memory-bound: every new token reads every weight once (and
the KV cache so far). So the floor of one decode step is (bytes read per token) ÷ (memory bandwidth).
This script measures, in one run:

* the memory bandwidth, STREAM-style: the best of several copies of a 256 MiB tensor (read + write
  counted, as STREAM's "Copy" does) and of several sums over it (read only), with 1 and 2 torch threads;
* the bytes read per generated token: the parameters the forward pass reads (the output head's whole
  matrix, one row of the input embedding) plus the KV cache at the measured context length;
* the measured decode step (one new token with the KV cache, `logits_to_keep=1`), its ratio to the floor,
  the prefill rate, and what verifying k drafted tokens in one forward pass costs against one token
  (what speculative decoding spends per step).

    .venv/bin/python benchmarks/decode_floor.py [--model M] [--context 256] [--json out.json]

A benchmark, not a test: figures depend on the machine and its load (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from transformers import DynamicCache

from star_engine.corpus import CorpusSpec, corpus_windows
from star_engine.model import load_model

MIB = 1 << 20


def best_seconds(fn, repeats: int) -> float:
    fn()   # warm-up: page faults, allocator
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bandwidth(threads: int, mib: int = 256, repeats: int = 10) -> dict:
    torch.set_num_threads(threads)
    src = torch.ones(mib * MIB // 4)
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    copy = best_seconds(lambda: dst.copy_(src), repeats)
    read = best_seconds(lambda: src.sum(), repeats)
    return {"threads": threads, "copy_gb_s": 2 * nbytes / copy / 1e9, "read_gb_s": nbytes / read / 1e9}


def bytes_per_token(model, context: int) -> dict:
    """What one decode step reads: every parameter except the input embedding table (one row of it), the
    output head once (tied or not), and the keys and values of the context."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    seen, params = set(), 0
    for p in model.parameters():
        if id(p) in seen or p is embed:
            continue
        seen.add(id(p))
        params += p.numel() * p.element_size()
    if head is embed:
        params += head.numel() * head.element_size()
    params += embed.shape[1] * embed.element_size()
    cfg = model.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * kv_heads * head_dim * context * embed.element_size()
    return {"weights": params, "kv_cache": kv, "total": params + kv}


@torch.inference_mode()
def decode_timings(model, prompt: list[int], steps: int, verify_sizes: tuple[int, ...]) -> dict:
    def prefill():
        cache = DynamicCache()
        out = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.past_key_values, int(out.logits[0, -1].argmax())

    t0 = time.perf_counter()
    cache, token = prefill()
    prefill_s = time.perf_counter() - t0
    step_ms = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
        step_ms.append((time.perf_counter() - t0) * 1000)
    verify_ms = {}
    for k in verify_sizes:   # one forward pass over k tokens, all k positions' logits kept, then undone
        times = []
        for _ in range(max(3, steps // 4)):
            t0 = time.perf_counter()
            model(input_ids=torch.tensor([prompt[-k:]]), past_key_values=cache, use_cache=True, logits_to_keep=k)
            times.append((time.perf_counter() - t0) * 1000)
            cache.crop(-k)
        verify_ms[k] = statistics.median(times)
    return {
        "prefill_tokens_s": len(prompt) / prefill_s,
        "decode_ms_p50": statistics.median(step_ms),
        "decode_ms_min": min(step_ms),
        "verify_ms": verify_ms,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model name or directory (default: the embedded default)")
    ap.add_argument("--context", type=int, default=256, help="prompt tokens before the timed decode steps")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per thread setting")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()

    lm = load_model(args.model)
    window = corpus_windows(lm, CorpusSpec(split="held", n_tokens=args.context, window=args.context))[0]
    need = bytes_per_token(lm.model, args.context + args.steps // 2)
    report = {"model": lm.name, "load_average": os.getloadavg()[0], "bytes_per_token": need, "threads": []}
    print(f"model {lm.name}; load average {report['load_average']:.2f}")
    print(f"bytes read per token: weights {need['weights'] / MIB:.0f} MiB + KV cache "
          f"{need['kv_cache'] / MIB:.1f} MiB at {args.context} tokens = {need['total'] / MIB:.0f} MiB")
    for threads in (1, 2):
        bw = bandwidth(threads)
        torch.set_num_threads(threads)
        dec = decode_timings(lm.model, list(window), args.steps, (1, 2, 3, 4, 8))
        floor_ms = need["total"] / (max(bw["copy_gb_s"], bw["read_gb_s"]) * 1e9) * 1000
        row = {**bw, **dec, "floor_ms": floor_ms, "ratio": dec["decode_ms_p50"] / floor_ms}
        report["threads"].append(row)
        verify = ", ".join(f"{k}: {v:.0f} ms ({v / dec['verify_ms'][1]:.2f}×)" for k, v in dec["verify_ms"].items())
        print(f"{threads} thread(s): bandwidth copy {bw['copy_gb_s']:.1f} GB/s, read {bw['read_gb_s']:.1f} GB/s "
              f"→ floor {floor_ms:.1f} ms/token; decode p50 {dec['decode_ms_p50']:.1f} ms (min "
              f"{dec['decode_ms_min']:.1f}) = {row['ratio']:.2f}× the floor; prefill "
              f"{dec['prefill_tokens_s']:.0f} tokens/s; verify k tokens in one pass: {verify}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
