"""`star adapters ...`: the patch stack from the command line.

    star adapters [--dir DIR] [--model M] list | show ID | enable ID | disable ID | remove ID
                                          | export ID FILE | import FILE | verify

IDs may be abbreviated to any unique prefix. `list`, `show`, `disable`, `remove` and `export` only touch
files; `enable`, `import` and `verify` load the model (to validate, check regressions and run the cases).
A running `star serve` watching the same folder follows every change.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..model import DEFAULT_MODEL
from ..text import excerpt


def _common(parser, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--dir", dest="adapters_dir", default=default, metavar="DIR", help=(
        "adapters folder (default: $STAR_ADAPTERS_DIR or the user data dir, e.g. ~/.local/share/star/adapters)"))
    parser.add_argument("--model", default=default, help=f"model the stack belongs to (default: {DEFAULT_MODEL})")


def register(sub) -> None:
    p = sub.add_parser("adapters", help="list, enable, share and verify saved repairs (PEFT adapter files)")
    _common(p, suppress=False)
    asub = p.add_subparsers(dest="adapters_command", required=True, metavar="COMMAND")

    def cmd(name, func, help_, *args):
        c = asub.add_parser(name, help=help_)
        _common(c, suppress=True)
        for a in args:
            a(c)
        c.set_defaults(func=func)

    ident = lambda c: c.add_argument("id", metavar="ID", help="adapter id (or a unique prefix)")
    keep = lambda c: c.add_argument(
        "--keep-going", action="store_true", help="apply even if it breaks a case an earlier patch fixed"
    )
    as_json = lambda c: c.add_argument("--json", action="store_true", help="print JSON")
    cmd("list", cmd_list, "the patches in stack order", as_json)
    cmd("show", cmd_show, "details of one patch", ident, as_json)
    cmd("enable", cmd_enable, "apply a disabled patch again (checks the other patches' cases)", ident, keep)
    cmd("disable", cmd_disable, "stop applying a patch (its file stays)", ident)
    cmd("remove", cmd_remove, "delete a patch", ident)
    cmd(
        "export", cmd_export, "write a patch as one .star.zip file to share", ident,
        lambda c: c.add_argument("file", metavar="FILE", help="archive path, or a directory to put ID.star.zip in"),
    )
    cmd(
        "import", cmd_import, "add a colleague's .star.zip (or adapter directory) on top of the stack",
        lambda c: c.add_argument("file", metavar="FILE"), keep,
    )
    cmd("verify", cmd_verify, "re-check every stored case against the model with the stack applied", as_json)


# -- helpers ----------------------------------------------------------------------------------------------


def _folder(args):
    from .folder import AdapterFolder

    return AdapterFolder(args.adapters_dir)


def _stack(args):
    from ..model import load_model
    from .stack import PatchStack

    print(f"loading {args.model or DEFAULT_MODEL} ...", file=sys.stderr, flush=True)
    stack = PatchStack(load_model(args.model), args.adapters_dir)
    for message in stack.load():
        _warn(message)
    return stack


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} kB"


def _safe(text) -> str:
    """User-provided text for the terminal: every character that is not printable (escape sequences, other
    control characters, bidirectional overrides) written as its Python escape, e.g. \\x1b."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))


def _cut(text: str, n: int) -> str:
    return _safe(excerpt(text, n))


def _warn(message: str) -> None:
    print(f"star: warning: {_safe(message)}", file=sys.stderr)


def _layers(layers: list[int]) -> str:
    if not layers:
        return "no layer"
    if len(layers) == 1:
        return f"layer {layers[0]}"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{len(layers)} layers ({layers[0]}-{layers[-1]})"
    return f"{len(layers)} layers ({', '.join(map(str, layers))})"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# -- commands ---------------------------------------------------------------------------------------------


def cmd_list(args) -> int:
    folder = _folder(args)
    infos = folder.list()
    if args.json:
        print(json.dumps([i.to_json() for i in infos], indent=2))
        return 0
    if not infos:
        print(f"no adapters in {_safe(folder.path)}")
        return 0
    rows = [["#", "ID", "ON", "METHOD", "NEURONS", "SIZE", "PROMPT", "FIX"]]
    for n, i in enumerate(infos, start=1):
        case = i.cases[0] if i.cases else None
        rows.append([
            str(n), _safe(i.id), "yes" if i.enabled else "no", _cut(i.method, 12), str(i.neurons), _size(i.size_bytes),
            _cut(case.prompt, 32) if case else "?", _cut(case.fix, 24) if case else "?",
        ])
    print(_table(rows))
    for i in infos:
        if i.problem:
            print(f"! {_safe(i.id)}: {_safe(i.problem)}")
    print(f"({len(infos)} adapter(s) in {_safe(folder.path)})")
    return 0


def cmd_show(args) -> int:
    from .sidecar import read_sidecar_or_none

    folder = _folder(args)
    manifest, _, _ = folder.state()
    adapter_id = folder.resolve(args.id, manifest.order)
    info = folder.info(adapter_id, manifest.enabled[adapter_id])
    sidecar = read_sidecar_or_none(info.path)
    if args.json:
        print(json.dumps(info.to_json() | {"star": sidecar.to_json() if sidecar else {}}, indent=2))
        return 0
    print(f"id:       {_safe(info.id)}")
    print(f"name:     {_safe(info.name)}")
    print(f"enabled:  {'yes' if info.enabled else 'no'}")
    print(f"created:  {_safe(info.created)}")
    print(f"method:   {_safe(info.method)} {json.dumps((sidecar.config if sidecar else None) or {})}")
    if sidecar:
        base = sidecar.base_model
        print(f"model:    {_safe(base.name or '?')} ({_safe(base.model_type)}, {base.n_layers} layers)")
    print(f"patch:    {info.neurons} neuron(s) in {_layers(info.layers)}")
    print(f"size:     {_size(info.size_bytes)}  ({_safe(info.path)})")
    for n, c in enumerate(info.cases, start=1):
        print(f"case {n}:")
        print(f"  prompt: {c.prompt!r}")
        print(f"  wrong:  {c.wrong!r}")
        print(f"  fix:    {c.fix!r}")
    if info.problem:
        print(f"problem:  {_safe(info.problem)}")
    return 0


def _warned(info):
    """A PatchInfo whose messages (regressions accepted with --keep-going) went to stderr."""
    for m in info.messages:
        _warn(m)
    return info


def cmd_enable(args) -> int:
    info = _warned(_stack(args).set_enabled(args.id, True, keep_going=args.keep_going))
    print(f"enabled {_safe(info.id)}")
    return 0


def cmd_disable(args) -> int:
    print(f"disabled {_safe(_folder(args).set_enabled(args.id, False))}")
    return 0


def cmd_remove(args) -> int:
    print(f"removed {_safe(_folder(args).remove(args.id))}")
    return 0


def cmd_export(args) -> int:
    print(f"exported to {_safe(_folder(args).export(args.id, args.file))}")
    return 0


def cmd_import(args) -> int:
    info = _warned(_stack(args).import_(args.file, keep_going=args.keep_going))
    print(f"imported {_safe(info.id)}: {info.neurons} neuron(s), {len(info.cases)} case(s)")
    return 0


def cmd_verify(args) -> int:
    stack = _stack(args)
    rows = stack.verify()
    if args.json:
        print(json.dumps([r.to_json() for r in rows], indent=2))
    elif not rows:
        print(f"no stored cases in {_safe(stack.path)}")
    else:
        table = [["ID", "CASE", "PROMPT", "FIX", "WRITES NOW", "FIXED"]]
        for r in rows:
            status = ("yes" if r.fixed else "NO") if r.enabled else ("(disabled) " + ("yes" if r.fixed else "no"))
            table.append([_safe(r.id), str(r.case), _cut(r.prompt, 32), _cut(r.fix, 24), _cut(r.wrote, 24), status])
        print(_table(table))
        bad = sum(1 for r in rows if r.enabled and not r.fixed)
        held = sum(1 for r in rows if r.enabled and r.fixed)
        print(f"{held} of {held + bad} case(s) of enabled patches still fixed")
    return 0 if all(r.fixed for r in rows if r.enabled) else 1
