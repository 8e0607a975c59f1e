"""Repair from the editor (`star.applyFix`) and the patch-stack commands (`star.patches.*`).

A repair runs in its own worker on the workbench model with `$/progress` (begin / report / end,
cancellable through the progress or `$/cancelRequest`), then tells the user with `window/showMessage`.
Completions keep being served from the old weights meanwhile; the new ones switch in atomically (see
engine_host). One repair at a time: a second one is refused with a one-line error."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams, JsonRpcRequestCancelled

from star_engine.case import RepairCase, RepairInputError
from star_engine.session import RepairCancelled
from star_engine.text import excerpt

from .documents import BadPosition, offset_at, open_document, position_arg
from .engine_host import RepairBusy, worker_pool
from .patches import PatchError, info_json
from .prompting import Context, build_prompt
from .protocol import RequestCancel, command_cancel, command_params

log = logging.getLogger(__name__)

REQUEST_FAILED = -32803     # LSP RequestFailed
PROGRESS_INTERVAL_S = 0.25


def failed(message: str) -> JsonRpcException:
    return JsonRpcException(message=message, code=REQUEST_FAILED)


def _arg_object(args: tuple, *required: str) -> dict:
    if len(args) != 1 or not isinstance(args[0], dict):
        raise JsonRpcInvalidParams("expected one argument, an object")
    obj = args[0]
    for name in required:
        if name not in obj:
            raise JsonRpcInvalidParams(f"missing argument field {name!r}")
    return obj


def _string(obj: dict, name: str, *, allow_empty: bool = True) -> str:
    value = obj.get(name)
    if value is None and allow_empty:
        return ""
    if not isinstance(value, str):
        raise JsonRpcInvalidParams(f"{name} must be a string")
    if not allow_empty and not value.strip():
        raise JsonRpcInvalidParams(f"{name} is empty")
    return value


class FixService:
    def __init__(self, server):
        self.server = server
        self.repair_executor = worker_pool("star-repair")
        self.stack_executor = worker_pool("star-stack", 2)
        self.cancel_events: set = set()
        self.active = False          # a star.applyFix is between its busy check and its end

    async def wait_idle(self, timeout: float) -> bool:
        """Wait (after cancel_all) until no repair runs; False if one still runs after `timeout` s."""
        deadline = time.monotonic() + timeout
        while self.active or self.server.host.repairing:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    # -- star.applyFix -------------------------------------------------------------------------------

    async def apply_fix(self, args: tuple) -> dict:
        cancel = command_cancel.get() or RequestCancel()     # $/cancelRequest sets it (protocol.py)
        try:
            return await self._apply_fix(args, cancel)
        finally:
            self.server.protocol.forget_cancel(cancel)

    async def _apply_fix(self, args: tuple, cancel: RequestCancel) -> dict:
        obj = _arg_object(args, "uri", "position", "fix")
        fix = _string(obj, "fix", allow_empty=False)
        wrong = _string(obj, "completion")
        try:
            doc = open_document(self.server, obj["uri"])
            offset = offset_at(doc, position_arg(obj["position"]))
        except BadPosition as e:
            raise JsonRpcInvalidParams(str(e)) from None
        if not await self.server.wait_loaded():
            raise failed(f"no model: {self.server.status.error or 'the model did not load'}")
        host = self.server.host
        # Check and claim in one step (no await in between): a second request of the same burst is refused
        # here instead of queueing behind the first in the repair worker.
        if self.active or host.repairing:
            raise failed("a repair is already running: wait for it to finish or cancel it")
        self.active = True
        try:
            return await self._repair(doc, offset, wrong, fix, cancel)
        finally:
            self.active = False

    async def _repair(self, doc, offset: int, wrong: str, fix: str, cancel: RequestCancel) -> dict:
        host, settings = self.server.host, self.server.settings
        context = Context.at(doc.source, offset, self.server.completions._budget(settings))
        self.cancel_events.add(cancel)
        progress = await self._progress_begin(wrong, fix, cancel)
        self.server.status.update(repairing=f"repairing: {excerpt(wrong, 24)} → {excerpt(fix, 24)}")
        loop = asyncio.get_running_loop()

        def work():
            prompt = build_prompt(context, host.workbench.tokenizer, multiline=settings.multiline,
                                  max_tokens=settings.max_tokens, max_line_tokens=settings.max_line_tokens)
            case = RepairCase(prompt=prompt.text, fix=prompt.repair_fix(fix), wrong=wrong or None)
            return host.repair(case, settings.repair_method, cancel=cancel, progress=progress.from_thread(loop),
                               locality_budget=settings.locality_budget)

        outcome = "failed"
        try:
            result, info = await loop.run_in_executor(self.repair_executor, work)
            outcome = "fixed" if result.fixed else "not fixed"
            reply = repair_reply(result, info, cancelled_late=cancel.is_set())
            self._tell(types.MessageType.Info if result.fixed else types.MessageType.Warning, reply["message"])
            return reply
        except asyncio.CancelledError:
            cancel.set()
            outcome = "cancelled"
            raise
        except RepairCancelled:
            outcome = "cancelled"
            message = "STAR: repair cancelled; the model is unchanged"
            self._tell(types.MessageType.Info, message)
            if cancel.by_request:      # $/cancelRequest: the LSP answer to a cancelled request
                raise JsonRpcRequestCancelled(message) from None
            return {"fixed": False, "message": message, "seconds": 0.0, "neurons": 0, "layers": [], "patchId": None}
        except RepairInputError as e:
            outcome = "not fixed"
            message = f"STAR could not repair this: {e}"
            self._tell(types.MessageType.Warning, message)
            return {"fixed": False, "message": message, "seconds": 0.0, "neurons": 0, "layers": [], "patchId": None}
        except RepairBusy as e:
            raise failed(str(e)) from None
        except (ValueError, OSError) as e:   # e.g. an unknown repair method, a full disk
            raise failed(f"repair failed: {e}") from None
        finally:
            self.cancel_events.discard(cancel)
            progress.end(outcome)
            self.server.status.update(repairing=None)

    def _tell(self, kind: types.MessageType, message: str) -> None:
        self.server.window_show_message(types.ShowMessageParams(type=kind, message=message))

    async def _progress_begin(self, wrong: str, fix: str, cancel) -> "_Progress":
        ls = self.server
        params = command_params.get()
        token = params.work_done_token if params is not None else None
        if token is None and ls.client_supports_progress():
            token = f"star-repair-{uuid.uuid4().hex[:8]}"
            try:
                await asyncio.wait_for(ls.work_done_progress.create_async(token), timeout=10)
            except Exception as e:
                log.info("no progress for the repair: %s", e)
                token = None
        progress = _Progress(ls, token)
        progress.begin(f"{excerpt(wrong or '(empty)')} → {excerpt(fix)}", cancel)
        return progress

    # -- star.patches.* --------------------------------------------------------------------------------

    async def _stack_call(self, fn, *args):
        if not await self.server.wait_loaded():
            raise failed(f"no model: {self.server.status.error or 'the model did not load'}")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.stack_executor, fn, *args)
        except (PatchError, ValueError, OSError, KeyError) as e:   # AdapterError is a ValueError
            raise failed(str(e).strip("'\"") or type(e).__name__) from None

    async def list(self) -> list[dict]:
        return [info_json(p) for p in await self._stack_call(self.server.host.patches)]

    async def undo_last(self) -> dict:
        info = await self._stack_call(self.server.host.undo_last)
        if info is None:
            return {"removed": None, "message": "STAR: no patch to undo"}
        data = info_json(info)
        return {"removed": data["id"], "message": f"STAR: undid patch {data['id']} ({excerpt(data['fix'])})"}

    async def set_enabled(self, args: tuple) -> dict:
        obj = _arg_object(args, "id", "enabled")
        if not isinstance(obj["enabled"], bool):
            raise JsonRpcInvalidParams("enabled must be true or false")
        patch_id = _string(obj, "id", allow_empty=False)
        await self._stack_call(self.server.host.set_enabled, patch_id, obj["enabled"])
        return {"id": patch_id, "enabled": obj["enabled"]}

    async def remove(self, args: tuple) -> dict:
        patch_id = _string(_arg_object(args, "id"), "id", allow_empty=False)
        await self._stack_call(self.server.host.remove, patch_id)
        return {"removed": patch_id}

    async def import_(self, args: tuple) -> dict:
        path = _string(_arg_object(args, "path"), "path", allow_empty=False)
        info = await self._stack_call(self.server.host.import_, path)
        data = info_json(info)
        return {"id": data["id"], "message": f"STAR: imported patch {data['id']} from {path}"}

    async def export(self, args: tuple) -> dict:
        obj = _arg_object(args, "id", "path")
        out = await self._stack_call(self.server.host.export, _string(obj, "id", allow_empty=False),
                                     _string(obj, "path", allow_empty=False))
        return {"path": str(out)}

    def cancel_all(self) -> None:
        for event in list(self.cancel_events):
            event.set()


def repair_reply(result, info, *, cancelled_late: bool = False) -> dict:
    """The star.applyFix result. `cancelled_late`: a cancel arrived after the patch was committed (saved
    and applied), so it was kept, and the reply says so (`kept: true`)."""
    if result.fixed:
        message = (
            f"STAR fixed the completion: {result.neurons} neuron(s) in layer(s) "
            f"{', '.join(map(str, result.layers))}, {result.seconds:.1f} s"
        )
        if cancelled_late:
            message += "; the cancel came after the patch was saved, so it was kept (STAR: Undo last patch removes it)"
    else:
        message = f"STAR could not fix the completion: {result.reason}"
    reply = {
        "fixed": result.fixed,
        "message": message,
        "seconds": round(result.seconds, 3),
        "neurons": result.neurons,
        "layers": list(result.layers),
        "patchId": info_json(info)["id"] if info is not None else None,
    }
    if result.fixed and cancelled_late:
        reply["kept"] = True
    return reply


class _Progress:
    """$/progress for one repair (a no-op without a token)."""

    def __init__(self, ls, token):
        self.ls, self.token = ls, token
        self._last = 0.0
        self._ended = False

    def begin(self, message: str, cancel) -> None:
        if self.token is None:
            return
        wdp = self.ls.work_done_progress
        wdp.begin(self.token, types.WorkDoneProgressBegin(
            title="STAR: repairing the model", message=message, percentage=0, cancellable=True))
        future = wdp.tokens.get(self.token)
        if future is not None:   # window/workDoneProgress/cancel cancels this future
            future.add_done_callback(lambda f: cancel.set() if f.cancelled() else None)

    def from_thread(self, loop):
        """The repair's progress callback (message, fraction), called from the worker thread."""

        def report(message: str, fraction: float | None) -> None:
            now = time.monotonic()
            if self.token is None or now - self._last < PROGRESS_INTERVAL_S:
                return
            self._last = now
            percentage = None if fraction is None else max(0, min(100, int(fraction * 100)))
            loop.call_soon_threadsafe(self._report, message, percentage)

        return report

    def _report(self, message: str, percentage: int | None) -> None:
        if self.token is not None and not self._ended:
            self.ls.work_done_progress.report(
                self.token, types.WorkDoneProgressReport(message=message, percentage=percentage))

    def end(self, outcome: str) -> None:
        if self.token is None or self._ended:
            return
        self._ended = True
        try:
            self.ls.work_done_progress.end(self.token, types.WorkDoneProgressEnd(message=outcome))
        finally:
            self.ls.work_done_progress.tokens.pop(self.token, None)
