"""pygls' LanguageServerProtocol made robust against bad input, plus access to the raw
`workspace/executeCommand` params (pygls hands command handlers only the arguments, but `star.applyFix`
needs the client's `workDoneToken`).

pygls drops a request whose params do not match the LSP types without answering it (the client waits
forever); here it gets an InvalidParams error. A body that is not a JSON-RPC 2.0 message gets the error
JSON-RPC prescribes instead of silence or a traceback: a parse error (-32700, id null) for bytes that are
not UTF-8 JSON or are nested too deeply, an invalid request (-32600) for a batch, a non-object, a missing
or wrong `jsonrpc`, an `id` that is neither a string, a number nor null, a `method` that is not a string.
Replies carry the message's id where it has a valid one, else null; a client's response is never
answered, only logged."""

from __future__ import annotations

import contextvars
import json
import logging
import threading

from lsprotocol import types
from pygls.exceptions import (
    JsonRpcException, JsonRpcInvalidParams, JsonRpcInvalidRequest, JsonRpcParseError,
)
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.language_server import lsp_method

log = logging.getLogger(__name__)

# The ExecuteCommandParams of the command being run (set for the handler's task).
command_params: contextvars.ContextVar[types.ExecuteCommandParams | None] = contextvars.ContextVar(
    "star_command_params", default=None
)


# Commands whose `$/cancelRequest` the command itself handles (it sets this event and answers when it has
# really stopped, or says what it could not undo) instead of pygls answering "cancelled" at once while the
# work goes on.
CANCELLABLE_COMMANDS = {"star.applyFix"}


class RequestCancel(threading.Event):
    """Set by `$/cancelRequest` (then `by_request` is True) or by anything else that cancels the command."""

    by_request = False


command_cancel: contextvars.ContextVar[RequestCancel | None] = contextvars.ContextVar(
    "star_command_cancel", default=None
)


class _Ignored:
    """A message that could not be read; already answered if it was a request."""

    jsonrpc = "ignored"


def _valid_id(msg_id) -> bool:
    return msg_id is None or (isinstance(msg_id, (str, int, float)) and not isinstance(msg_id, bool))


def request_problem(message) -> str | None:
    """Why a decoded body is not a JSON-RPC 2.0 message pygls can handle (None: it is one)."""
    if isinstance(message, list):
        return "a batch (LSP has no batch messages)"
    if not isinstance(message, dict):
        return f"a JSON {type(message).__name__} is not a message"
    if message.get("jsonrpc") != "2.0":
        return 'jsonrpc must be "2.0"'
    if not _valid_id(message.get("id")):
        return "id must be a string, a number or null"
    if "method" in message and not isinstance(message["method"], str):
        return "method must be a string"
    if "method" not in message and "id" not in message:
        return "neither a method nor an id"
    return None


def _is_response(message) -> bool:
    return isinstance(message, dict) and "method" not in message and ("result" in message or "error" in message)


def _one_line(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    text = str(cause).strip().splitlines()
    return text[0][:300] if text else type(cause).__name__


class StarProtocol(LanguageServerProtocol):
    def structure_message(self, data):
        try:
            return super().structure_message(data)
        except JsonRpcException as exc:
            msg_id = data.get("id") if isinstance(data, dict) else None
            if isinstance(data, dict) and "method" in data and isinstance(msg_id, (str, int)) and not isinstance(msg_id, bool):
                method = data.get("method")
                self._send_response(
                    msg_id,
                    error=JsonRpcInvalidParams(f"invalid params for {method}: {_one_line(exc)}").to_response_error(),
                )
            return _Ignored()

    def _send_handler_result(self, future, *, msg_id):
        # pygls logs every error a handler raises with its traceback, even InvalidParams for a bad argument:
        # an expected JSON-RPC error is answered and logged as one line instead.
        exc = None if future.cancelled() else future.exception()
        if isinstance(exc, JsonRpcException):
            self._request_futures.pop(msg_id, None)
            log.info("request %s answered with error %s: %s", msg_id, exc.code, _one_line(exc))
            self._send_response(msg_id, error=exc.to_response_error())
            return
        return super()._send_handler_result(future, msg_id=msg_id)

    def receive(self, body: bytes) -> None:
        """One framed body (server/framing.py): decoded, checked, then handled by pygls."""
        try:
            message = json.loads(body.decode("utf-8"))
        except UnicodeDecodeError as e:
            return self.refuse(JsonRpcParseError(f"Parse Error: the body is not UTF-8 (byte {e.start})"))
        except RecursionError:
            return self.refuse(JsonRpcParseError("Parse Error: the body is nested too deeply"))
        except ValueError as e:
            return self.refuse(JsonRpcParseError(f"Parse Error: the body is not JSON ({e})"))
        problem = request_problem(message)
        if problem is None:
            if "method" in message:
                message.setdefault("params", None)   # JSON-RPC lets a request leave params out; pygls does not
            return self.handle_message(self.structure_message(message))
        if _is_response(message):
            log.warning("dropped a response that is no JSON-RPC 2.0 message: %s", problem)
            return
        msg_id = message.get("id") if isinstance(message, dict) and _valid_id(message.get("id")) else None
        self.refuse(JsonRpcInvalidRequest(f"Invalid Request: {problem}"), msg_id)

    def refuse_unreadable(self, reason: str) -> None:
        """A message whose framing could not be read (server/framing.py)."""
        self.refuse(JsonRpcParseError(f"Parse Error: {reason}"))

    def refuse(self, error: JsonRpcException, msg_id=None) -> None:
        """Answer an unreadable or invalid message with `error`, and log it as one line."""
        log.warning("refused a message (id %s): %s", json.dumps(msg_id), error.message)
        if msg_id is not None:
            return self._send_response(msg_id, error=error.to_response_error())
        # pygls' ResponseErrorMessage leaves out a null id, which JSON-RPC requires in the reply.
        self._send_data({"jsonrpc": "2.0", "id": None, "error": self._converter.unstructure(error.to_response_error())})

    def handle_message(self, message):
        if isinstance(message, _Ignored):
            return
        return super().handle_message(message)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cancel_hooks: dict = {}          # request id -> RequestCancel, for CANCELLABLE_COMMANDS

    def _handle_cancel_notification(self, msg_id):
        event = self.cancel_hooks.get(msg_id)
        if event is None:
            return super()._handle_cancel_notification(msg_id)
        log.info("cancel requested for %s", msg_id)
        event.by_request = True
        event.set()

    @lsp_method(types.WORKSPACE_EXECUTE_COMMAND)
    def lsp_workspace__execute_command(self, params: types.ExecuteCommandParams):
        command_params.set(params)
        msg_id = self.msg_id
        if params.command in CANCELLABLE_COMMANDS and msg_id is not None:
            # Registered while the request is handled, before its handler runs: no cancel can slip past.
            event = RequestCancel()
            self.cancel_hooks[msg_id] = event
            command_cancel.set(event)
        return (yield from super().lsp_workspace__execute_command(params))

    def forget_cancel(self, event: RequestCancel) -> None:
        for msg_id in [i for i, e in self.cancel_hooks.items() if e is event]:
            del self.cancel_hooks[msg_id]

    @lsp_method(types.SHUTDOWN)
    def lsp_shutdown(self, *args):
        # pygls' own iterates over the in-flight requests while cancelling them, and a cancelled request's
        # callback removes itself from that dict: "dictionary changed size during iteration".
        if (user_handler := self.fm.features.get(types.SHUTDOWN)) is not None:
            yield user_handler, args, None
        current_id = self.msg_id
        for msg_id, future in list(self._request_futures.items()):
            if msg_id != current_id and not future.done():
                future.cancel()
        self._shutdown = True
        return None
