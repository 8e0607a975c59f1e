"""`star serve` (through the `star.commands` entry point) and `python -m star_server`: the language
server over stdio (default) or TCP."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from star_engine.model import DEFAULT_MODEL

from .settings import MULTILINE_MODES, Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Settings()
    parser.add_argument("--model", help=f"embedded model name, HF directory or .gguf file (default: {DEFAULT_MODEL})")
    parser.add_argument("--adapters", metavar="DIR", help="the patch stack folder (default: the user data dir)")
    parser.add_argument("--stdio", action="store_true", help="serve over stdio (the default; accepted for LSP clients)")
    parser.add_argument("--tcp", metavar="HOST:PORT", help="serve over TCP instead of stdio")
    parser.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"new tokens per completion (default {d.max_tokens})")
    parser.add_argument("--max-line-tokens", type=int, default=d.max_line_tokens,
                        help=f"new tokens per single-line completion (default {d.max_line_tokens})")
    parser.add_argument("--context-tokens", type=int, default=d.context_tokens,
                        help=f"prompt budget in tokens (default {d.context_tokens})")
    parser.add_argument("--multiline", choices=MULTILINE_MODES, default=d.multiline)
    parser.add_argument("--debounce-ms", type=int, default=d.debounce_ms, help="server-side debounce of automatic requests")
    parser.add_argument("--latency-budget-ms", type=int, default=d.latency_budget_ms,
                        help="automatic single-line completions return what they have after this long "
                             f"(default {d.latency_budget_ms}; 0: off)")
    parser.add_argument("--multiline-budget-ms", type=int, default=d.multiline_budget_ms,
                        help="automatic multi-line completions show the lines ready after this long and "
                             f"continue at the next request (default {d.multiline_budget_ms}; 0: off)")
    parser.add_argument("--no-speculate", dest="speculate", action="store_false",
                        help="decode without prompt-lookup drafts (slower; the completions are the same)")
    parser.add_argument("--repair-method", default=d.repair_method, help=f"default: {d.repair_method}")
    parser.add_argument("--locality-budget", type=float, default=d.locality_budget,
                        help="largest share of unrelated next-token predictions a fix may change "
                             f"(default {d.locality_budget}; 1: guard off)")
    parser.add_argument("--threads", type=int,
                        help="torch threads for generation and repair (default: half the CPUs, at least 1; "
                             "OMP_NUM_THREADS also sets it)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-file", help="log here instead of stderr")


def register(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="run the language server (LSP over stdio)")
    add_arguments(serve)
    serve.set_defaults(func=serve_command)


def _settings(args) -> Settings:
    settings, problems = Settings(model=args.model, adapters_dir=args.adapters).updated({
        "maxTokens": args.max_tokens,
        "maxLineTokens": args.max_line_tokens,
        "contextTokens": args.context_tokens,
        "multiline": args.multiline,
        "debounceMs": args.debounce_ms,
        "latencyBudgetMs": args.latency_budget_ms,
        "multilineBudgetMs": args.multiline_budget_ms,
        "speculate": args.speculate,
        "repairMethod": args.repair_method,
        "localityBudget": args.locality_budget,
    })
    if problems:
        raise ValueError("; ".join(problems))
    return settings


def _logging(args) -> None:
    handler = logging.FileHandler(args.log_file) if args.log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(args.log_level.upper())
    if args.log_level != "debug":   # pygls logs every message it sends at INFO
        logging.getLogger("pygls").setLevel(logging.WARNING)


def _argv(args) -> list[str]:
    """The options of `args` as command-line arguments for `python -m star_server`."""
    out = []
    for flag, value in [("--model", args.model), ("--adapters", args.adapters), ("--tcp", args.tcp),
                        ("--max-tokens", args.max_tokens), ("--max-line-tokens", args.max_line_tokens),
                        ("--context-tokens", args.context_tokens), ("--multiline", args.multiline),
                        ("--debounce-ms", args.debounce_ms), ("--latency-budget-ms", args.latency_budget_ms),
                        ("--multiline-budget-ms", args.multiline_budget_ms),
                        ("--repair-method", args.repair_method), ("--locality-budget", args.locality_budget),
                        ("--threads", args.threads),
                        ("--log-level", args.log_level), ("--log-file", args.log_file)]:
        if value is not None:
            out += [flag, str(value)]
    return out + ([] if args.speculate else ["--no-speculate"])


def _passive_openmp(args) -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the user chose: with spinning OpenMP threads, torch on a busy
    machine (an editor, a browser, a build...) decodes 3-5x slower than with one thread; passive waiting
    keeps both cores useful. OpenMP reads it when torch loads, so `star serve` (whose command line
    already imported torch) re-executes itself as `python -m star_server`."""
    if "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if "torch" in sys.modules:
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "star_server", *_argv(args)])


def _threads(args) -> None:
    """Half the CPUs by default: the editor needs the rest while the user types (on 2 cores one thread
    decodes faster than two whenever something else runs, and a repair gets the other core)."""
    import torch

    if args.threads:
        torch.set_num_threads(max(1, args.threads))
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))


def serve_command(args) -> int:
    settings = _settings(args)
    _passive_openmp(args)
    _threads(args)
    from .server import make_server

    _logging(args)
    server = make_server(settings)
    exit_code = 1
    try:
        if args.tcp:
            host, _, port = args.tcp.rpartition(":")
            server.start_tcp(host or "127.0.0.1", int(port))
        else:
            # The protocol owns the real stdout: anything else printed goes to stderr.
            stdout = sys.stdout.buffer
            sys.stdout = sys.stderr
            server.start_io(sys.stdin.buffer, stdout)
        exit_code = 0 if getattr(server.protocol, "_shutdown", True) else 1
    except Exception:
        logging.getLogger(__name__).exception("the server stopped on an unexpected error")
    finally:
        server.stop_work()
        logging.shutdown()
        # Worker threads stop at their next cancellation check; don't wait for a long repair step.
        os._exit(exit_code)
    return exit_code   # pragma: no cover


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m star_server", description="The star language server.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return serve_command(args)
    except ValueError as e:
        print(f"star serve: error: {e}", file=sys.stderr)
        return 2
