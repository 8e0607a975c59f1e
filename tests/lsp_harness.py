"""The LSP client side of the server tests: start `python -m star_server` under pytest-lsp, wait for its
`ready` status, and the requests the tests send (documents, inline completions, commands, raw JSON-RPC)."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from concurrent.futures import Future
from contextlib import asynccontextmanager
from pathlib import Path

from lsprotocol import types
from pytest_lsp import ClientServerConfig

INLINE_CAPS = types.ClientCapabilities(
    window=types.WindowClientCapabilities(work_done_progress=True),
    text_document=types.TextDocumentClientCapabilities(
        inline_completion=types.InlineCompletionClientCapabilities(),
        completion=types.CompletionClientCapabilities(),
    ),
)
PLAIN_CAPS = types.ClientCapabilities(
    window=types.WindowClientCapabilities(work_done_progress=True),
    text_document=types.TextDocumentClientCapabilities(completion=types.CompletionClientCapabilities()),
)
# The demo repair: after this prompt the models write something else than FIX.
FIX_PROMPT = "# Reverse the list `a`\n"
FIX = "a.reverse()"


def server_command(model: str | Path | None, adapters: Path, *extra: str) -> list[str]:
    """`python -m star_server` on `model` (None: the default model) with its own adapters folder. A tiny
    random model on disk gets the locality guard off: any change moves a random model's predictions."""
    chosen = ["--model", str(model)] if model is not None else []
    if isinstance(model, Path):
        chosen += ["--locality-budget", "1"]
    return [sys.executable, "-m", "star_server", *chosen, "--adapters", str(adapters), *extra]


async def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    """Poll (pytest-lsp's wait_for_notification hangs on notifications that already arrived)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def start_client(command: list[str], *, capabilities=INLINE_CAPS, options: dict | None = None,
                       ready_timeout: float = 120.0):
    """Start the server, initialize, and wait for its `ready` status."""
    client = await ClientServerConfig(server_command=command).start()
    client.statuses = []
    client.feature("star/status")(lambda ls, params: client.statuses.append(params))
    client.init_result = await client.initialize_session(
        types.InitializeParams(capabilities=capabilities, initialization_options=options)
    )
    await wait_for(lambda: any(s.kind in ("ready", "error") for s in client.statuses), ready_timeout, "ready status")
    return client


async def stop_client(client) -> None:
    try:
        await asyncio.wait_for(client.shutdown_session(), 30)
    finally:
        await client.stop()


@asynccontextmanager
async def ready_client(command: list[str], **options):
    """A started client whose server must have loaded its model (status `ready`, not `error`)."""
    client = await start_client(command, **options)
    try:
        assert client.statuses[-1].kind == "ready", client.statuses
        yield client
    finally:
        await stop_client(client)


def open_doc(client, uri: str, text: str, version: int = 1) -> None:
    client.text_document_did_open(
        types.DidOpenTextDocumentParams(types.TextDocumentItem(uri=uri, language_id="python", version=version, text=text))
    )


def end_of(text: str) -> types.Position:
    lines = text.split("\n")
    return types.Position(line=len(lines) - 1, character=len(lines[-1]))


async def inline(client, uri: str, position: types.Position, automatic: bool = False):
    kind = types.InlineCompletionTriggerKind.Automatic if automatic else types.InlineCompletionTriggerKind.Invoked
    return await client.text_document_inline_completion_async(
        types.InlineCompletionParams(
            context=types.InlineCompletionContext(trigger_kind=kind),
            text_document=types.TextDocumentIdentifier(uri=uri),
            position=position,
        )
    )


async def inline_text(client, uri: str, position: types.Position) -> str | None:
    result = await inline(client, uri, position)
    return result.items[0].insert_text if result.items else None


async def command(client, name: str, *arguments, **params):
    return await client.workspace_execute_command_async(
        types.ExecuteCommandParams(command=name, arguments=list(arguments), **params)
    )


def raw_request(client, method: str, params, msg_id: str | None = None):
    """Send a request exactly as given (the typed client API would refuse malformed params)."""
    msg_id = msg_id or f"raw-{uuid.uuid4().hex[:8]}"
    future = Future()
    client.protocol._request_futures[msg_id] = future
    client.protocol._send_data({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
    return asyncio.wrap_future(future)


def fix_args(uri: str, position: types.Position, completion: str, fix: str) -> dict:
    return {"uri": uri, "position": {"line": position.line, "character": position.character},
            "completion": completion, "fix": fix}
