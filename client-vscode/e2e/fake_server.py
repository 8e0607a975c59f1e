"""A fake `star serve` for developing and testing the VS Code client without a model.

It implements docs/protocol.md with canned behaviour (pygls 2.1.1, lsprotocol 2025.0.0):

* `star/status`: loading at `initialized`, ready LOAD_SECONDS later; generating → ready around
  each completion; repairing → ready around a repair.
* `textDocument/inlineCompletion`: the prompt is the document text before the cursor. A patched
  prompt completes to its fix; a prompt ending with TRIGGER completes to WRONG; anything else gets
  no completion. Items carry an empty `range` at the cursor and the `star.completion.accepted`
  command.
* `star.applyFix {uri, position, completion, fix}`: takes REPAIR_SECONDS with server-initiated
  `$/progress`, records prompt → fix (a "patch"), sends `window/showMessage` and returns
  `{fixed, message, seconds, neurons, layers, patchId}`. A fix equal to "UNFIXABLE" is not fixed.
* `star.patches.*`: an in-memory patch stack.

Usage: python fake_server.py [serve] [--stdio]   (arguments are ignored)
Environment: STAR_FAKE_TRIGGER, STAR_FAKE_WRONG, STAR_FAKE_LOG (a JSON-lines log of what arrived).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid

from lsprotocol import types
from pygls.lsp.server import LanguageServer

TRIGGER = os.environ.get("STAR_FAKE_TRIGGER", "return")
WRONG = os.environ.get("STAR_FAKE_WRONG", " a - b")
LOAD_SECONDS = float(os.environ.get("STAR_FAKE_LOAD_SECONDS", "0.5"))
REPAIR_SECONDS = float(os.environ.get("STAR_FAKE_REPAIR_SECONDS", "2.0"))
LOG = os.environ.get("STAR_FAKE_LOG")

server = LanguageServer("star-fake", "0.0.1")
patches: list[dict] = []  # stack order, newest last
state = {"init": None}


def log(event: str, **data) -> None:
    print(f"[fake] {event} {json.dumps(data, default=str)}", file=sys.stderr, flush=True)
    if LOG:
        with open(LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps({"event": event, **data}, default=str) + "\n")


def status(kind: str, message: str = "", busy: bool | None = None) -> None:
    if busy is None:
        busy = kind in ("loading", "generating", "repairing")
    server.protocol.notify("star/status", {"busy": busy, "kind": kind, "message": message})


def prompt_at(uri: str, line: int, character: int) -> str:
    doc = server.workspace.get_text_document(uri)
    offset = doc.offset_at_position(types.Position(line=line, character=character))
    return doc.source[:offset]


def active_fix(prompt: str) -> str | None:
    for p in reversed(patches):
        if p["enabled"] and p["prompt"] == prompt:
            return p["fix"]
    return None


@server.feature(types.INITIALIZE)
def on_initialize(ls: LanguageServer, params: types.InitializeParams) -> None:
    state["init"] = params.initialization_options
    log("initialize", initializationOptions=params.initialization_options, argv=sys.argv[1:])


@server.feature(types.INITIALIZED)
async def on_initialized(ls: LanguageServer, params: types.InitializedParams) -> None:
    status("loading", "loading the fake model")
    await asyncio.sleep(LOAD_SECONDS)
    status("ready", "fake model")


@server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
def on_config(ls: LanguageServer, params: types.DidChangeConfigurationParams) -> None:
    log("didChangeConfiguration", settings=params.settings)


@server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
def inline(ls: LanguageServer, params: types.InlineCompletionParams):
    pos = params.position
    prompt = prompt_at(params.text_document.uri, pos.line, pos.character)
    status("generating")
    try:
        text = active_fix(prompt)
        if text is None and prompt.endswith(TRIGGER):
            text = WRONG
        log("inlineCompletion", tail=prompt[-40:], result=text)
        if not text:
            return types.InlineCompletionList(items=[])
        cid = uuid.uuid4().hex[:8]
        return types.InlineCompletionList(
            items=[
                types.InlineCompletionItem(
                    insert_text=text,
                    range=types.Range(start=pos, end=pos),
                    command=types.Command(title="accepted", command="star.completion.accepted", arguments=[cid]),
                )
            ]
        )
    finally:
        status("ready")


@server.feature(types.TEXT_DOCUMENT_COMPLETION)
def completion(ls: LanguageServer, params: types.CompletionParams):
    log("completion (should not be asked by the VS Code client)")
    return types.CompletionList(is_incomplete=False, items=[])


@server.command("star.completion.accepted")
def accepted(ls: LanguageServer, cid: str):
    log("accepted", id=cid)
    return None


@server.command("star.applyFix")
async def apply_fix(ls: LanguageServer, args: dict):
    log("applyFix", args=args)
    if not isinstance(args, dict) or set(args) != {"uri", "position", "completion", "fix"}:
        raise ValueError("star.applyFix takes one argument {uri, position, completion, fix}")
    pos = args["position"]
    prompt = prompt_at(args["uri"], pos["line"], pos["character"])
    t0 = time.monotonic()
    status("repairing", "fake repair")
    token = f"star-fake-{uuid.uuid4().hex[:8]}"
    try:
        await ls.work_done_progress.create_async(token)
        ls.work_done_progress.begin(token, types.WorkDoneProgressBegin(title="STAR repair", percentage=0, cancellable=False))
        steps = 4
        for i in range(steps):
            await asyncio.sleep(REPAIR_SECONDS / steps)
            ls.work_done_progress.report(
                token, types.WorkDoneProgressReport(message=f"step {i + 1}/{steps}", percentage=int(100 * (i + 1) / steps))
            )
        ls.work_done_progress.end(token, types.WorkDoneProgressEnd(message="done"))
    finally:
        status("ready", "fake model")
    seconds = round(time.monotonic() - t0, 2)
    if args["fix"] == "UNFIXABLE":
        msg = "not fixed: the fake refuses UNFIXABLE"
        ls.window_show_message(types.ShowMessageParams(type=types.MessageType.Warning, message=msg))
        return {"fixed": False, "message": msg, "seconds": seconds, "neurons": 0, "layers": [], "patchId": None}
    pid = f"fake-{len(patches) + 1}"
    patches.append(
        {
            "id": pid,
            "enabled": True,
            "method": (state["init"] or {}).get("repairMethod", "star") if isinstance(state["init"], dict) else "star",
            "prompt": prompt,
            "completion": args["completion"],
            "fix": args["fix"],
            "neurons": 3,
            "layers": [5, 7],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    )
    msg = f"fixed: 3 neurons in 2 layers, {seconds} s"
    ls.window_show_message(types.ShowMessageParams(type=types.MessageType.Info, message=msg))
    return {"fixed": True, "message": msg, "seconds": seconds, "neurons": 3, "layers": [5, 7], "patchId": pid}


@server.command("star.patches.list")
def patches_list(ls: LanguageServer):
    return patches


@server.command("star.patches.undoLast")
def patches_undo(ls: LanguageServer):
    if not patches:
        return {"removed": None, "message": "no patch to undo"}
    p = patches.pop()
    return {"removed": p["id"], "message": f"removed patch {p['id']}"}


def find(pid: str) -> dict:
    for p in patches:
        if p["id"] == pid:
            return p
    raise ValueError(f"no patch {pid!r}")


@server.command("star.patches.setEnabled")
def patches_set_enabled(ls: LanguageServer, args: dict):
    find(args["id"])["enabled"] = bool(args["enabled"])
    return {"id": args["id"], "enabled": bool(args["enabled"])}


@server.command("star.patches.remove")
def patches_remove(ls: LanguageServer, args: dict):
    patches.remove(find(args["id"]))
    return {"removed": args["id"]}


@server.command("star.patches.import")
def patches_import(ls: LanguageServer, args: dict):
    pid = f"imported-{len(patches) + 1}"
    patches.append({"id": pid, "enabled": True, "method": "star", "prompt": "", "completion": "", "fix": "",
                    "neurons": 0, "layers": [], "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return {"id": pid, "message": f"imported {os.path.basename(args['path'])} as {pid}"}


@server.command("star.patches.export")
def patches_export(ls: LanguageServer, args: dict):
    p = find(args["id"])
    with open(args["path"], "w", encoding="utf-8") as f:
        json.dump(p, f)
    return {"path": args["path"]}


if __name__ == "__main__":
    server.start_io()
