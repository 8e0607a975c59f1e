"""The star language server: feature registration and thin handlers over the services.

    completions.py   textDocument/inlineCompletion, textDocument/completion (fallback)
    fixes.py         star.applyFix, star.patches.*
    engine_host.py   the serving and workbench models, the weight switch
    status.py        star/status

Every handler turns bad input into an LSP error or an empty result: nothing a client sends stops the
server."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import sys
import threading
import time
from importlib.metadata import PackageNotFoundError, version

from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInternalError
from pygls.io_ import StdoutWriter
from pygls.lsp.server import LanguageServer

from .completions import ACCEPT_COMMAND, CompletionService
from .documents import BadPosition, offset_at, open_document
from .engine_host import EngineHost, worker_pool
from .fixes import FixService
from .framing import CHUNK, serve, stdin_chunks
from .protocol import StarProtocol
from .settings import Settings, section
from .status import StatusBoard

log = logging.getLogger(__name__)

STATUS_NOTIFICATION = "star/status"
MARK_WRONG_TITLE = "STAR: mark the completion here as wrong"
MARK_WRONG_WITHIN_S = 600
PARENT_POLL_S = 3.0
SHUTDOWN_WAIT_S = 30.0

try:
    VERSION = version("star-repair")
except PackageNotFoundError:   # pragma: no cover
    VERSION = "0"


class StarServer(LanguageServer):
    def __init__(self, defaults: Settings | None = None):
        super().__init__("star", VERSION, protocol_cls=StarProtocol, max_workers=4)
        self.defaults = defaults or Settings()
        self.settings = self.defaults
        self.host = EngineHost()
        self.host.on_weights_changed = self._weights_changed_threadsafe
        self.status = StatusBoard(lambda payload: self.protocol.notify(STATUS_NOTIFICATION, payload))
        self.completions = CompletionService(self)
        self.fixes = FixService(self)
        self.load_executor = worker_pool("star-load")
        self._load_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- transports: pygls' start_io / start_tcp with star's framing reader (server/framing.py) -----------

    def start_io(self, stdin=None, stdout=None) -> None:
        self._stop_event = threading.Event()
        self.protocol.set_writer(StdoutWriter(stdout or sys.stdout.buffer))
        chunks = stdin_chunks(stdin or sys.stdin.buffer, self.thread_pool)
        try:
            asyncio.run(serve(chunks, self.protocol, self._stop_event))
        except BrokenPipeError:
            log.error("the connection to the client is lost: shutting down")
        except (KeyboardInterrupt, SystemExit):
            pass
        finally:
            self.shutdown()

    def start_tcp(self, host: str, port: int) -> None:
        self._stop_event = threading.Event()

        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
            self.protocol.set_writer(writer)
            await serve(lambda: reader.read(CHUNK), self.protocol, self._stop_event)
            self.shutdown()

        async def listen():
            self._server = await asyncio.start_server(connection, host, port)
            log.info("serving on %s", ", ".join(str(s.getsockname()) for s in self._server.sockets))
            async with self._server:
                await self._server.serve_forever()

        try:
            asyncio.run(listen())
        except asyncio.CancelledError:
            pass

    # -- lifecycle ---------------------------------------------------------------------------------------

    def client_supports_inline(self) -> bool:
        caps = self.client_capabilities
        return bool(caps and caps.text_document and caps.text_document.inline_completion is not None)

    def client_supports_progress(self) -> bool:
        caps = self.client_capabilities
        return bool(caps and caps.window and caps.window.work_done_progress)

    def start_loading(self) -> None:
        """(Re)load the model and the patch stack in the background (status: loading -> ready/error)."""
        self._loop = asyncio.get_running_loop()
        previous = self._load_task
        self._load_task = asyncio.ensure_future(self._load(previous))

    async def _load(self, previous: asyncio.Task | None) -> bool:
        if previous is not None and not previous.done():
            await asyncio.wait([previous])
        spec, adapters = self.settings.model, self.settings.adapters_dir
        name = spec or "the default model"
        self.status.update(loading=f"loading {name}", error=None)
        started = time.perf_counter()
        try:
            report = await asyncio.get_running_loop().run_in_executor(self.load_executor, self.host.load, spec, adapters)
        except Exception as e:
            log.exception("cannot load %s", name)
            message = f"cannot load {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            self.status.update(loading=None, error=message)
            self.window_show_message(types.ShowMessageParams(type=types.MessageType.Error, message=f"STAR: {message}"))
            return False
        self.completions.weights_changed()
        self._log(f"loaded {report.model} in {time.perf_counter() - started:.1f} s; "
                  f"{report.patches} patch(es) from {report.adapters_dir}")
        news, problems = _split_messages(report.problems)
        for message in news:
            self._log(message)
        for problem in problems:
            self._tell(types.MessageType.Warning, f"STAR: {problem}")
        self.status.model = report.model
        self.status.update(loading=None, error=None)
        return True

    async def wait_loaded(self) -> bool:
        """Wait for the current load; True when a model is there to serve."""
        task = self._load_task
        if task is not None and not task.done():
            await asyncio.shield(task)
        return self.host.ready

    def apply_settings(self, options, *, reload: bool) -> None:
        new, problems = self.settings.updated(options, self.defaults)
        old, self.settings = self.settings, new
        for problem in problems:
            self._tell(types.MessageType.Warning, f"STAR: {problem}")
        if reload and (new.model, new.adapters_dir) != (old.model, old.adapters_dir):
            self.start_loading()

    def _weights_changed_threadsafe(self, reason: str, problems: list[str]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._weights_changed, reason, problems)

    def _weights_changed(self, reason: str, messages: list[str]) -> None:
        self.completions.weights_changed()
        self._log(f"weights changed: {reason}")
        news, problems = _split_messages(messages)
        if reason == "reloaded" and news:
            self._tell(types.MessageType.Info, f"STAR: patches reloaded: {'; '.join(news)}")
        for problem in problems:
            self._tell(types.MessageType.Warning, f"STAR: {problem}")

    def watch_parent(self, pid: int | None) -> None:
        """Exit when the client process is gone (its pipes may outlive it)."""
        if not pid or pid == os.getpid():
            return

        async def poll():
            while True:
                await asyncio.sleep(PARENT_POLL_S)
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    log.warning("the client (pid %d) is gone: exiting", pid)
                    self.stop_work()
                    os._exit(0)
                except PermissionError:
                    pass

        asyncio.ensure_future(poll())

    def stop_work(self) -> None:
        """Cancel every generation and repair (they stop at their next check)."""
        self.completions.cancel_all()
        self.fixes.cancel_all()
        self.host.close()

    # -- messages ----------------------------------------------------------------------------------------

    def _tell(self, kind: types.MessageType, message: str) -> None:
        try:
            self.window_show_message(types.ShowMessageParams(type=kind, message=message))
        except Exception:
            pass

    def _log(self, message: str) -> None:
        log.info(message)
        try:
            self.window_log_message(types.LogMessageParams(type=types.MessageType.Info, message=f"star: {message}"))
        except Exception:
            pass

    def report_server_error(self, error, source):
        # Bad input from the client must not pop up error dialogs in the editor: log it only.
        log.warning("%s: %s", getattr(source, "__name__", source), str(error).splitlines()[0] if str(error) else error)


def _split_messages(messages: list[str]) -> tuple[list[str], list[str]]:
    """The patch stack's messages: (news such as "applied x" / "removed x", problems)."""
    news = [m for m in messages if m.startswith(("applied ", "removed "))]
    return news, [m for m in messages if m not in news]


def guarded(empty=None):
    """Handler wrapper: LSP errors pass through; anything unexpected becomes a one-line InternalError
    (commands) or an empty result (features), and is logged."""

    def wrap(fn):
        @functools.wraps(fn)
        async def handler(ls, *args):
            try:
                return await fn(ls, *args)
            except (JsonRpcException, asyncio.CancelledError):
                raise
            except Exception as e:
                log.exception("%s failed", fn.__name__)
                if empty is not None:
                    return empty()
                first = str(e).splitlines()[0] if str(e) else ""
                raise JsonRpcInternalError(f"{type(e).__name__}: {first}"[:300]) from None

        return handler

    return wrap


_WORD = re.compile(r"[A-Za-z0-9_]*$")


def make_server(defaults: Settings | None = None) -> StarServer:
    server = StarServer(defaults)

    @server.feature(types.INITIALIZE)
    def initialize(ls: StarServer, params: types.InitializeParams):
        ls.apply_settings(params.initialization_options, reload=False)
        ls.watch_parent(params.process_id)

    @server.feature(types.INITIALIZED)
    def initialized(ls: StarServer, params: types.InitializedParams):
        if ls._load_task is None:   # a repeated `initialized` does not reload
            ls.start_loading()

    @server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
    def did_change_configuration(ls: StarServer, params: types.DidChangeConfigurationParams):
        ls.apply_settings(section(params.settings), reload=True)

    @server.feature(types.SHUTDOWN)
    async def shutdown(ls: StarServer, params=None):
        # Stop the work, then let a repair reach its next cancellation check (it restores the weights, or
        # finishes committing), so that the exit that follows never cuts an adapter write in half.
        ls.stop_work()
        if not await ls.fixes.wait_idle(SHUTDOWN_WAIT_S):
            log.warning("shutdown: a repair is still running after %.0f s", SHUTDOWN_WAIT_S)

    @server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
    @guarded(empty=lambda: types.InlineCompletionList(items=[]))
    async def inline_completion(ls: StarServer, params: types.InlineCompletionParams):
        if params.context is not None and params.context.selected_completion_info is not None:
            return types.InlineCompletionList(items=[])   # the suggest widget is open: stay out of its way
        automatic = params.context is None or params.context.trigger_kind == types.InlineCompletionTriggerKind.Automatic
        shown = await ls.completions.complete(params.text_document.uri, params.position, automatic)
        return ls.completions.inline_items(shown)

    @server.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions())
    @guarded(empty=lambda: types.CompletionList(is_incomplete=True, items=[]))
    async def completion(ls: StarServer, params: types.CompletionParams):
        if ls.client_supports_inline():
            return types.CompletionList(is_incomplete=False, items=[])   # it gets inline completions instead
        uri, position = params.text_document.uri, params.position
        automatic = params.context is None or params.context.trigger_kind != types.CompletionTriggerKind.Invoked
        shown = await ls.completions.complete(uri, position, automatic)
        word = ""
        if shown is not None:
            doc = open_document(ls, uri)
            word = _WORD.search(doc.source[: offset_at(doc, position)]).group(0)
        return ls.completions.completion_items(shown, word)

    @server.feature(
        types.TEXT_DOCUMENT_CODE_ACTION,
        types.CodeActionOptions(code_action_kinds=[types.CodeActionKind.QuickFix]),
    )
    @guarded(empty=list)
    async def code_action(ls: StarServer, params: types.CodeActionParams):
        return mark_wrong_actions(ls, params)

    @server.command(ACCEPT_COMMAND)
    @guarded()
    async def completion_accepted(ls: StarServer, *args):
        ls.completions.accepted(args[0] if args else None)
        return None

    @server.command("star.applyFix")
    @guarded()
    async def apply_fix(ls: StarServer, *args):
        return await ls.fixes.apply_fix(args)

    @server.command("star.patches.list")
    @guarded()
    async def patches_list(ls: StarServer, *args):
        return await ls.fixes.list()

    @server.command("star.patches.undoLast")
    @guarded()
    async def patches_undo_last(ls: StarServer, *args):
        return await ls.fixes.undo_last()

    @server.command("star.patches.setEnabled")
    @guarded()
    async def patches_set_enabled(ls: StarServer, *args):
        return await ls.fixes.set_enabled(args)

    @server.command("star.patches.remove")
    @guarded()
    async def patches_remove(ls: StarServer, *args):
        return await ls.fixes.remove(args)

    @server.command("star.patches.import")
    @guarded()
    async def patches_import(ls: StarServer, *args):
        return await ls.fixes.import_(args)

    @server.command("star.patches.export")
    @guarded()
    async def patches_export(ls: StarServer, *args):
        return await ls.fixes.export(args)

    @server.command("star.stats")
    @guarded()
    async def stats(ls: StarServer, *args):
        return ls.completions.stats.to_json(ls.completions.cache) | {"status": ls.status.current()}

    return server


def mark_wrong_actions(ls: StarServer, params: types.CodeActionParams) -> list[types.CodeAction]:
    """"STAR: mark the completion here as wrong" where a completion was shown at the cursor, or where an
    accepted one still sits in the text. Its command is the client's UI command (setting
    markWrongCommand), which asks the user for the fix and then runs star.applyFix."""
    uri = params.text_document.uri
    shown = ls.completions.last_shown(uri)
    if shown is None or time.monotonic() - shown.at > MARK_WRONG_WITHIN_S:
        return []
    try:
        doc = open_document(ls, uri)
        start = offset_at(doc, shown.position)
    except BadPosition:
        return []
    r = params.range
    if shown.accepted:
        if doc.source[start : start + len(shown.text)] != shown.text:
            return []   # edited since: no longer the model's completion
        end_line = shown.position.line + shown.text.count("\n")
        if r.end.line < shown.position.line or r.start.line > end_line:
            return []
    elif (r.start.line, r.start.character) != (shown.position.line, shown.position.character):
        return []
    argument = {
        "uri": uri,
        "position": {"line": shown.position.line, "character": shown.position.character},
        "completion": shown.text,
        "accepted": shown.accepted,
    }
    return [
        types.CodeAction(
            title=MARK_WRONG_TITLE,
            kind=types.CodeActionKind.QuickFix,
            command=types.Command(title=MARK_WRONG_TITLE, command=ls.settings.mark_wrong_command, arguments=[argument]),
        )
    ]
