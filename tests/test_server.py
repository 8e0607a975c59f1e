"""The language server end to end, with pytest-lsp as the client, against the real server process
(`python -m star_server`) on a tiny random model saved to disk: capabilities, completions, applyFix with
progress, the patch commands, cancellation, settings, the code action, hot reload, and bad input.

Starting a server takes seconds, so most tests use the session's shared one (conftest's `shared`;
`server` is the same one cleaned before and after a test that changes it) and a second one whose client
has no inline completion (`plain`); only what needs a server of its own (initialization options, a
vanishing client) starts one."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import pytest
import pytest_asyncio
from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcRequestCancelled

from lsp_harness import (
    FIX,
    FIX_PROMPT,
    PLAIN_CAPS,
    apply_the_demo_fix,
    cleaned,
    command,
    end_of,
    fix_args,
    inline,
    inline_text,
    on_shared,
    open_doc,
    open_the_demo_case,
    raw_request,
    serving,
    wait_for,
)

PROTOCOL_COMMANDS = {
    "star.applyFix",
    "star.completion.accepted",
    "star.patches.list",
    "star.patches.undoLast",
    "star.patches.setEnabled",
    "star.patches.remove",
    "star.patches.import",
    "star.patches.export",
}
LONG = "print(add"


# -- fixtures ------------------------------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def plain_server(ahead):
    async with serving(await ahead.take("plain_server"), capabilities=PLAIN_CAPS) as c:
        yield c


@pytest_asyncio.fixture(loop_scope="session")
async def plain(plain_server):
    """A second server, whose client has no inline completion, for a test that changes it."""
    async with cleaned(plain_server) as c:
        yield c


# -- tests -----------------------------------------------------------------------------------------------------------


@on_shared
async def test_capabilities_and_ready_status(shared):
    client = shared
    caps = client.init_result.capabilities
    assert caps.inline_completion_provider is not None
    assert caps.completion_provider is not None
    assert caps.code_action_provider is not None
    assert PROTOCOL_COMMANDS <= set(caps.execute_command_provider.commands)
    assert client.init_result.server_info.name == "star"
    first, second = client.startup_statuses[:2]
    assert (first.kind, first.busy, second.kind, second.busy) == ("loading", True, "ready", False)
    assert second.message.startswith("ready")


@on_shared
async def test_inline_completion_is_the_models_greedy_completion(shared, tiny_model_dir, tokenizer):
    from star_engine.model import load_model
    from star_engine.decode import Decoder
    from star_engine.generate import complete_prompt
    from star_server.prompting import Context, build_prompt, postprocess

    client = shared
    text = "def add(a, b):\n    return a + b\n\nprint(add"
    uri = "file:///tmp/tiny.py"
    open_doc(client, uri, text)
    result = await inline(client, uri, end_of(text))
    lm = load_model(str(tiny_model_dir))   # the same pipeline in this process, without LSP, cache or KV reuse
    prompt = build_prompt(Context.at(text, len(text), 384), lm.tokenizer)
    generated = complete_prompt(Decoder(lm), prompt.text, max_new_tokens=prompt.max_new_tokens, heal=prompt.heal)
    expected = postprocess(generated.text, prompt)
    assert expected, "the tiny model writes something here"
    assert [item.insert_text for item in result.items] == [expected]
    item = result.items[0]
    assert item.range == types.Range(start=end_of(text), end=end_of(text))
    assert item.command.command == "star.completion.accepted"
    # accepting records it (no error), and the same request is now served from the cache
    assert await command(client, "star.completion.accepted", *item.command.arguments) is None
    assert await inline_text(client, uri, end_of(text)) == expected
    stats = await command(client, "star.stats")
    assert stats["accepted"] >= 1 and stats["cache"]["hits"] >= 1
    # typing the first characters of the completion: the rest comes from the cache at once
    typed = text + expected[:2]
    client.text_document_did_change(types.DidChangeTextDocumentParams(
        text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=2),
        content_changes=[types.TextDocumentContentChangeWholeDocument(text=typed)]))
    forwarded = (await command(client, "star.stats"))["cache"]["forwardHits"]
    assert await inline_text(client, uri, end_of(typed)) == expected[2:]
    assert (await command(client, "star.stats"))["cache"]["forwardHits"] == forwarded + 1


@on_shared
async def test_apply_fix_end_to_end_with_progress_and_patch_commands(server, tmp_path):
    client = server
    uri = "file:///tmp/fix.py"
    reply, before, at = await apply_the_demo_fix(client, client.adapters, uri)
    kinds = [s.kind for s in client.statuses]
    assert "repairing" in kinds and kinds[-1] in ("ready", "slow")

    # persisted in the adapters folder, listed, toggled, exported, undone
    patches = await command(client, "star.patches.list")
    assert [p["id"] for p in patches] == [reply["patchId"]]
    assert patches[0]["fix"] == FIX and patches[0]["prompt"] == FIX_PROMPT and patches[0]["enabled"]

    assert await command(client, "star.patches.setEnabled", {"id": reply["patchId"], "enabled": False}) == \
        {"id": reply["patchId"], "enabled": False}
    assert await inline_text(client, uri, at) == before
    await command(client, "star.patches.setEnabled", {"id": reply["patchId"], "enabled": True})
    assert await inline_text(client, uri, at) == FIX

    archive = tmp_path / "fix.star.zip"
    exported = await command(client, "star.patches.export", {"id": reply["patchId"], "path": str(archive)})
    assert Path(exported["path"]).is_file()

    undone = await command(client, "star.patches.undoLast")
    assert undone["removed"] == reply["patchId"]
    assert await inline_text(client, uri, at) == before
    assert await command(client, "star.patches.list") == []
    assert (await command(client, "star.patches.undoLast"))["removed"] is None

    imported = await command(client, "star.patches.import", {"path": str(archive)})
    assert imported["id"]
    assert await inline_text(client, uri, at) == FIX
    assert await command(client, "star.patches.remove", {"id": imported["id"]}) == {"removed": imported["id"]}
    assert await inline_text(client, uri, at) == before

    with pytest.raises(JsonRpcException, match="no-such-patch"):
        await command(client, "star.patches.remove", {"id": "no-such-patch"})


@on_shared
async def test_completions_during_a_repair_use_the_old_weights(server):
    client = server
    uri = "file:///tmp/during.py"
    before, at = await open_the_demo_case(client, uri)
    repair = asyncio.ensure_future(command(client, "star.applyFix", fix_args(uri, at, before, FIX)))
    await wait_for(lambda: any(s.kind == "repairing" for s in client.statuses), 30, "repairing status")
    # served while the repair runs: the old weights, never a half-patched model
    other = "file:///tmp/other.py"
    open_doc(client, other, FIX_PROMPT + "\n")
    during = await inline_text(client, other, end_of(FIX_PROMPT + "\n"))
    assert (await repair)["fixed"]
    assert await inline_text(client, uri, at) == FIX
    # `during` came from the unpatched weights: the same as before the repair started
    await command(client, "star.patches.undoLast")
    assert await inline_text(client, other, end_of(FIX_PROMPT + "\n")) == during


@on_shared
async def test_apply_fix_cancelled_through_progress(server):
    client = server
    uri = "file:///tmp/cancel-fix.py"
    before, at = await open_the_demo_case(client, uri)
    token = "cancel-me"
    client.progress_reports[token] = []
    repair = asyncio.ensure_future(command(client, "star.applyFix", fix_args(uri, at, before, FIX), work_done_token=token))
    # The begin report goes out before the repair starts, which then takes about a second on the tiny
    # model: a cancel sent on the report reaches it while it runs.
    await wait_for(lambda: client.progress_reports[token], 30, "progress begin")
    client.protocol.notify(types.WINDOW_WORK_DONE_PROGRESS_CANCEL, types.WorkDoneProgressCancelParams(token=token))
    reply = await repair
    assert not reply["fixed"] and "cancelled" in reply["message"], reply
    assert client.progress_reports[token][-1].message == "cancelled"
    assert await inline_text(client, uri, at) == before   # weights restored
    assert await command(client, "star.patches.list") == []


@on_shared
async def test_bad_input_gets_errors_or_empty_results(shared):
    client = shared
    uri = "file:///tmp/bad.py"
    open_doc(client, uri, "x = 1\n")
    # unknown document, positions outside the text
    assert not (await inline(client, "file:///tmp/never-opened.py", types.Position(0, 0))).items
    assert not (await inline(client, uri, types.Position(5, 0))).items
    assert not (await inline(client, uri, types.Position(0, 99))).items
    # malformed params: an InvalidParams error, not silence
    with pytest.raises(JsonRpcException, match="invalid params"):
        await raw_request(client, types.TEXT_DOCUMENT_INLINE_COMPLETION, {
            "textDocument": {"uri": uri}, "position": {"line": "zero", "character": 0}, "context": {"triggerKind": 1}})
    with pytest.raises(JsonRpcException, match="invalid params"):
        await raw_request(client, types.TEXT_DOCUMENT_COMPLETION, {"textDocument": None, "position": []})
    # bad command arguments: one-line errors
    for args, match in [
        ([], "one argument"),
        (["text"], "one argument"),
        ([{"uri": uri, "position": {"line": 0, "character": 0}}], "fix"),
        ([fix_args(uri, types.Position(9, 0), "", "y")], "outside"),
        ([fix_args("file:///nope.py", types.Position(0, 0), "", "y")], "not open"),
        ([fix_args(uri, types.Position(0, 0), "", "  ")], "empty"),
    ]:
        with pytest.raises(JsonRpcException, match=match) as e:
            await command(client, "star.applyFix", *args)
        assert "\n" not in e.value.message
    with pytest.raises(JsonRpcException, match="not defined"):
        await command(client, "star.noSuchCommand")
    with pytest.raises(JsonRpcException, match="enabled"):
        await command(client, "star.patches.setEnabled", {"id": "x", "enabled": "yes"})
    with pytest.raises(JsonRpcException):
        await command(client, "star.patches.import", {"path": "/nonexistent/adapter"})
    with pytest.raises(JsonRpcException):
        await client.protocol.send_request_async("star/noSuchMethod", {})
    # a huge document and a flood of requests
    huge = "x = 1\n" * 200_000 + "y = "
    open_doc(client, "file:///tmp/huge.py", huge)
    flood = [inline(client, "file:///tmp/huge.py", end_of(huge), automatic=True) for _ in range(50)]
    results = await asyncio.gather(*flood)
    assert all(isinstance(r, types.InlineCompletionList) for r in results)
    # still serving
    assert isinstance(await inline(client, uri, types.Position(1, 0)), types.InlineCompletionList)


@on_shared
async def test_cancel_request_stops_the_generation(server):
    c = server
    # long multi-line generations (the tiny model never stops by itself; without prompt-lookup drafts, which
    # accept its repetitions many tokens a step, and without the multi-line budget, which would answer the
    # automatic ones early), so there is time to cancel
    c.workspace_did_change_configuration(types.DidChangeConfigurationParams(
        settings={"maxTokens": 1000, "multiline": "always", "speculate": False, "multilineBudgetMs": 0}))
    cancelled = (await command(c, "star.stats"))["cancelled"]
    try:
        uri = "file:///tmp/long.py"
        open_doc(c, uri, LONG)
        started = time.monotonic()   # the tiny model writes "addaddadd..." and never stops by itself
        await inline(c, uri, end_of(LONG))
        full = time.monotonic() - started
        assert full > 1.0, full

        open_doc(c, "file:///tmp/long2.py", "x = " + LONG)
        task = asyncio.ensure_future(c.protocol.send_request_async(
            types.TEXT_DOCUMENT_INLINE_COMPLETION,
            types.InlineCompletionParams(
                context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked),
                text_document=types.TextDocumentIdentifier(uri="file:///tmp/long2.py"),
                position=end_of("x = " + LONG)),
            msg_id="cancel-me"))
        await asyncio.sleep(min(0.3, full / 4))
        c.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id="cancel-me"))
        with pytest.raises(JsonRpcRequestCancelled):
            await task
        # the worker is free again at once: the generation stopped instead of running to its end
        c.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={"maxTokens": 4}))
        open_doc(c, "file:///tmp/short.py", "x = 1\n")
        t0 = time.monotonic()
        await inline(c, "file:///tmp/short.py", types.Position(1, 0))
        assert time.monotonic() - t0 < full / 2, (time.monotonic() - t0, full)
        assert (await command(c, "star.stats"))["cancelled"] > cancelled
        c.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={"maxTokens": 1000}))

        # cancel-previous: a newer request for the same document makes the older one answer empty
        open_doc(c, "file:///tmp/prev.py", "y = " + LONG)
        first = asyncio.ensure_future(inline(c, "file:///tmp/prev.py", end_of("y = " + LONG), automatic=True))
        await asyncio.sleep(min(0.3, full / 4))
        second = asyncio.ensure_future(inline(c, "file:///tmp/prev.py", end_of("y = " + LONG), automatic=True))
        assert not (await first).items
        assert len((await second).items) == 1
    finally:
        c.workspace_did_change_configuration(types.DidChangeConfigurationParams(
            settings={"maxTokens": None, "multiline": None, "speculate": None,
                      "multilineBudgetMs": None}))   # the defaults again


@on_shared
async def test_settings_from_init_options_and_did_change_configuration(settings_server):
    async with serving(settings_server, options={"maxLineTokens": 3}) as c:
        uri = "file:///tmp/s.py"
        text = "print(add"
        open_doc(c, uri, text)
        short = await inline_text(c, uri, end_of(text))
        c.workspace_did_change_configuration(types.DidChangeConfigurationParams(
            settings={"star": {"maxLineTokens": 8, "maxTokens": "many"}}))
        await wait_for(lambda: any("maxTokens" in m.message for m in c.messages), 10, "settings warning")
        longer = await inline_text(c, uri, end_of(text))
        assert longer.startswith(short) and len(longer) > len(short)


@on_shared
async def test_completion_fallback_for_clients_without_inline(server, plain):
    uri, text = "file:///tmp/c.py", "print(add"
    at = types.CompletionParams(text_document=types.TextDocumentIdentifier(uri=uri), position=end_of(text))
    open_doc(server, uri, text)
    open_doc(plain, uri, text)
    # a client with inline completion gets nothing from textDocument/completion
    assert not (await server.text_document_completion_async(at)).items
    expected = await inline_text(server, uri, end_of(text))
    # one without it gets the same completion as a completion item
    (item,) = (await plain.text_document_completion_async(at)).items
    assert item.text_edit.new_text == "add" + expected            # replaces the word before the cursor
    assert item.text_edit.range == types.Range(start=types.Position(0, 6), end=end_of(text))
    assert item.command.command == "star.completion.accepted"


@on_shared
async def test_code_action_marks_the_shown_completion_wrong(shared):
    client = shared
    uri = "file:///tmp/ca.py"
    text = "print(add"
    open_doc(client, uri, text)
    at = end_of(text)
    shown = await inline_text(client, uri, at)

    def actions(start, end):
        # raw: lsprotocol's client-side converter reads any CodeAction that has a `command` as a Command
        return raw_request(client, types.TEXT_DOCUMENT_CODE_ACTION, {
            "textDocument": {"uri": uri}, "context": {"diagnostics": []},
            "range": {"start": {"line": start.line, "character": start.character},
                      "end": {"line": end.line, "character": end.character}}})

    (action,) = await actions(at, at)
    assert action["title"] == "STAR: mark the completion here as wrong" and action["kind"] == "quickfix"
    assert action["command"]["command"] == "starRepair.markWrong"
    assert action["command"]["arguments"] == [{"uri": uri, "position": {"line": 0, "character": 9},
                                               "completion": shown, "accepted": False}]
    assert await actions(types.Position(0, 0), types.Position(0, 0)) == []


@on_shared
async def test_hot_reload_of_the_adapters_folder(server, plain):
    # server A makes a patch in its folder; copying it into server B's folder patches B while it runs
    a, b = server, plain
    before, at = await open_the_demo_case(a, "file:///tmp/h.py")
    patch_id = (await command(a, "star.applyFix", fix_args("file:///tmp/h.py", at, before, FIX)))["patchId"]

    open_doc(b, "file:///tmp/h.py", FIX_PROMPT)
    assert await inline_text(b, "file:///tmp/h.py", at) == before
    tmp = b.adapters / f".incoming-{patch_id}"
    shutil.copytree(a.adapters / patch_id, tmp)
    os.replace(tmp, b.adapters / patch_id)   # dropped in atomically
    await wait_for(lambda: any("reloaded" in m.message for m in b.messages), 30, "reload message")
    assert await inline_text(b, "file:///tmp/h.py", at) == FIX
    assert [p["id"] for p in await command(b, "star.patches.list")] == [patch_id]


def test_server_exits_when_the_client_vanishes(vanishing_server):
    """stdin closed in the middle of a generation: the process ends on its own, with the exit code of an
    exit without shutdown, and answers the completion still in flight as cancelled."""
    server = vanishing_server
    server.request(1, "initialize", {"capabilities": {}, "initializationOptions": {
        "maxTokens": 1000, "multiline": "always", "speculate": False}})      # a long generation (see above)
    server.send({"jsonrpc": "2.0", "method": "initialized", "params": {}})
    server.send({"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": {
        "uri": "file:///tmp/v.py", "languageId": "python", "version": 1, "text": LONG}}})
    assert server.request(3, "workspace/executeCommand", {"command": "star.stats"})["result"]   # loaded
    server.send({"jsonrpc": "2.0", "id": 2, "method": "textDocument/inlineCompletion", "params": {
        "textDocument": {"uri": "file:///tmp/v.py"}, "position": {"line": 0, "character": len(LONG)},
        "context": {"triggerKind": 1}}})
    time.sleep(0.2)              # LONG never ends: 1000 tokens take seconds (test_cancel_request_stops_the_generation)
    server.proc.stdin.close()
    assert server.proc.wait(timeout=60) == 1     # LSP: exit code 1 without a shutdown request
    deadline = time.monotonic() + 10                  # the reader thread takes the last reply off the pipe
    while '2' not in server.replies and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.replies["2"]["error"]["code"] == -32800
