"""The LSP client side of the server tests: start `python -m star_server` under pytest-lsp, wait for its
`ready` status, and the requests the tests send (documents, inline completions, commands, raw JSON-RPC);
one server shared by several tests, cleaned between them; the issue's apply-fix flow; and a raw stdio
client for bytes no LSP client would write."""

from __future__ import annotations

import asyncio
import json
import queue
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import Future
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
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
# The mark of a test on the session's shared server (conftest's `shared`, `server`).
on_shared = pytest.mark.asyncio(loop_scope="session")
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


async def spawn(command: list[str]):
    """The server process started under a pytest-lsp client, not yet initialized (it boots meanwhile)."""
    return await ClientServerConfig(server_command=command).start()


async def initialize(client, *, capabilities=INLINE_CAPS, options: dict | None = None, ready_timeout: float = 120.0):
    """Initialize a spawned server and wait for its `ready` status."""
    client.statuses = []
    client.feature("star/status")(lambda ls, params: client.statuses.append(params))
    client.init_result = await client.initialize_session(
        types.InitializeParams(capabilities=capabilities, initialization_options=options)
    )
    await wait_for(lambda: any(s.kind in ("ready", "error") for s in client.statuses), ready_timeout, "ready status")
    client.startup_statuses = list(client.statuses)
    return client


async def start_client(command: list[str], **options):
    """Start the server, initialize, and wait for its `ready` status."""
    return await initialize(await spawn(command), **options)


@asynccontextmanager
async def serving(client, **options):
    """A spawned server, initialized with `options` for the body, stopped at the end."""
    try:
        yield await initialize(client, **options)
    finally:
        await stop_client(client)


@asynccontextmanager
async def tiny_server(model_dir: Path, adapters: Path, *extra: str, **options):
    """A started server on the tiny model saved at `model_dir`, its adapters folder kept as `client.adapters`;
    stopped at the end."""
    client = await spawn(server_command(model_dir, adapters, *extra))
    client.adapters = adapters
    async with serving(client, **options):
        yield client


class Ahead:
    """Servers started before the tests that use them: a start is seconds of imports (torch, transformers,
    pygls), which then pass while other tests run. `starters` maps a fixture name to the async function that
    starts that server (or to why it cannot start here); `queue` is the order the selected tests take them in.
    At most `depth` wait started at a time, so that they boot while the tests before theirs run without
    crowding the cores; the fixture of that name takes its server once, and the next one in the queue starts."""

    def __init__(self, starters: dict, queue: list[str], depth: int = 2):
        self.starters, self.queue, self.depth = starters, [n for n in queue if not isinstance(starters[n], str)], depth
        self.started: dict = {}

    async def fill(self) -> None:
        while self.queue and len(self.started) < self.depth:
            name = self.queue.pop(0)
            self.started[name] = await self.starters[name]()

    async def take(self, name: str):
        if isinstance(self.starters[name], str):
            pytest.skip(self.starters[name])
        if name not in self.started:
            if name in self.queue:
                self.queue.remove(name)
            self.started[name] = await self.starters[name]()
        server = self.started.pop(name)
        await self.fill()
        return server

    @asynccontextmanager
    async def own(self, name: str):
        """The server `name` for one test, killed after it if it still runs (the test failed first)."""
        server = await self.take(name)
        try:
            yield server
        finally:
            await self.discard(server)

    @staticmethod
    async def discard(server) -> None:
        if hasattr(server, "proc"):                      # a raw process
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait()
        elif server._server.returncode is None:          # a pytest-lsp client
            server._server.kill()
            await server.stop()

    async def close(self) -> None:
        """The servers nobody took: killed."""
        for server in self.started.values():
            await self.discard(server)
        self.started.clear()


async def clean_slate(client) -> None:
    """Every patch a test left on a shared server (a failed test too) removed, and the client's records of
    statuses, messages and progress emptied."""
    for patch in await command(client, "star.patches.list"):
        await command(client, "star.patches.remove", {"id": patch["id"]})
    assert await command(client, "star.patches.list") == []
    client.statuses.clear()
    client.messages.clear()
    client.progress_reports.clear()


@asynccontextmanager
async def cleaned(client):
    """A server shared by several tests, for one that changes it: clean before and after, so that each test
    sees only its own patches and notifications."""
    await clean_slate(client)
    try:
        yield client
    finally:
        await clean_slate(client)


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


async def open_the_demo_case(client, uri: str) -> tuple[str | None, types.Position]:
    """FIX_PROMPT opened at `uri`: the completion the model writes at its end, and that position."""
    open_doc(client, uri, FIX_PROMPT)
    at = end_of(FIX_PROMPT)
    return await inline_text(client, uri, at), at


async def apply_the_demo_fix(client, adapters: Path, uri: str) -> tuple[dict, str | None, types.Position]:
    """The issue's flow: after FIX_PROMPT the model writes something else; star.applyFix with FIX fixes it,
    with $/progress from a cancellable begin through reports to an end saying "fixed" and a "STAR fixed"
    message; the next completion there is FIX and the patch is a directory in `adapters`. Returns the reply,
    the completion before the fix and the cursor position."""
    before, at = await open_the_demo_case(client, uri)
    assert before != FIX
    reply = await command(client, "star.applyFix", fix_args(uri, at, before or "", FIX))
    assert reply["fixed"] is True and reply["neurons"] > 0 and reply["layers"] and reply["patchId"], reply
    assert "fixed" in reply["message"]
    (reports,) = client.progress_reports.values()
    assert isinstance(reports[0], types.WorkDoneProgressBegin) and reports[0].cancellable
    assert any(isinstance(r, types.WorkDoneProgressReport) for r in reports)
    assert isinstance(reports[-1], types.WorkDoneProgressEnd) and reports[-1].message == "fixed"
    assert any(m.type == types.MessageType.Info and m.message.startswith("STAR fixed") for m in client.messages)
    assert await inline_text(client, uri, at) == FIX
    assert (adapters / reply["patchId"]).is_dir()
    return reply, before, at


# -- raw stdio: any bytes can be written ------------------------------------------------------------------------


def frame(body: bytes) -> bytes:
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


def read_message(stream) -> dict | None:
    """The next framed JSON-RPC message on a binary stream (None at its end)."""
    length = None
    while (line := stream.readline()) not in (b"\r\n", b"\n"):
        if not line:
            return None
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return json.loads(stream.read(length))


class RawServer:
    """The server process over raw stdin, with a thread that reads its framed replies."""

    def __init__(self, command):
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.replies: dict = {}
        self.responses: list = []          # every reply in the order it came, those with id null included
        self.notifications: queue.Queue = queue.Queue()
        self.sent = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while (message := read_message(self.proc.stdout)) is not None:
            if "id" in message and "method" not in message:
                self.responses.append(message)
                self.replies[json.dumps(message["id"])] = message   # ids may be anything the fuzz sent
            else:
                self.notifications.put(message)

    def write(self, body: bytes) -> None:
        self.write_raw(frame(body))

    def write_raw(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()
        self.sent += 1

    def send(self, message: dict) -> None:
        self.write(json.dumps(message).encode())

    def request(self, msg_id, method, params, timeout=180.0) -> dict:
        self.send({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
        return self.reply(msg_id, method, timeout)

    def reply(self, msg_id, method="the request", timeout=180.0) -> dict:
        deadline = time.monotonic() + timeout
        while json.dumps(msg_id) not in self.replies:
            assert self.proc.poll() is None, "the server died"
            assert time.monotonic() < deadline, f"no reply to {method}"
            time.sleep(0.02)
        return self.replies.pop(json.dumps(msg_id))

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
