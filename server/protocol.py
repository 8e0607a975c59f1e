"""pygls' LanguageServerProtocol made robust against bad input, plus access to the raw
`workspace/executeCommand` params (pygls hands command handlers only the arguments, but `star.applyFix`
needs the client's `workDoneToken`).

pygls drops a request whose params do not match the LSP types without answering it (the client waits
forever); here it gets an InvalidParams error. Messages that are not JSON-RPC objects are logged and
ignored instead of raising inside the read loop."""

from __future__ import annotations

import contextvars
import logging

from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.language_server import lsp_method

log = logging.getLogger(__name__)

# The ExecuteCommandParams of the command being run (set for the handler's task).
command_params: contextvars.ContextVar[types.ExecuteCommandParams | None] = contextvars.ContextVar(
    "star_command_params", default=None
)


class _Ignored:
    """A message that could not be read; already answered if it was a request."""

    jsonrpc = "ignored"


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

    def handle_message(self, message):
        if not hasattr(message, "jsonrpc"):
            log.warning("ignoring a message that is not a JSON-RPC object: %.200r", message)
            return
        if isinstance(message, _Ignored):
            return
        return super().handle_message(message)

    @lsp_method(types.WORKSPACE_EXECUTE_COMMAND)
    def lsp_workspace__execute_command(self, params: types.ExecuteCommandParams):
        command_params.set(params)
        return (yield from super().lsp_workspace__execute_command(params))
