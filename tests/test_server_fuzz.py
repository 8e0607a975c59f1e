"""Fuzz: thousands of random and mutated JSON-RPC messages (hypothesis) written to the real server's
stdin, correctly framed; then the server must still be alive and answer a valid request correctly.

Left out on purpose: `shutdown` and `exit` (they end the server by design), `initialize` (it resets the
workspace by design) and changes of `adaptersDir` (a random path would be created on disk)."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_server import server_command, tiny_model_dir  # noqa: F401  (the session fixture)

URI = "file:///tmp/fuzz.py"
TEXT = "def add(a, b):\n    return a + b\n\nprint(add"
METHODS = [
    "textDocument/inlineCompletion", "textDocument/completion", "textDocument/codeAction",
    "textDocument/didOpen", "textDocument/didChange", "textDocument/didClose", "textDocument/didSave",
    "workspace/executeCommand", "workspace/didChangeConfiguration", "$/cancelRequest", "$/setTrace",
    "window/workDoneProgress/cancel", "initialized", "textDocument/hover", "star/status", "$/progress",
]
COMMANDS = ["star.applyFix", "star.completion.accepted", "star.patches.list", "star.patches.undoLast",
            "star.patches.setEnabled", "star.patches.remove", "star.patches.import", "star.patches.export",
            "star.stats", "star.nope"]
SETTING_KEYS = ["model", "maxTokens", "maxLineTokens", "contextTokens", "multiline", "debounceMs", "repairMethod",
                "markWrongCommand", "other"]


class Server:
    """The server process with a thread that reads its framed replies."""

    def __init__(self, command):
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.replies: dict = {}
        self.notifications: queue.Queue = queue.Queue()
        self.sent = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        out = self.proc.stdout
        while True:
            length = None
            while True:
                line = out.readline()
                if not line:
                    return
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
                if line in (b"\r\n", b"\n"):
                    break
            message = json.loads(out.read(length))
            if "id" in message and "method" not in message:
                self.replies[json.dumps(message["id"])] = message   # ids may be anything the fuzz sent
            else:
                self.notifications.put(message)

    def write(self, body: bytes) -> None:
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.proc.stdin.flush()
        self.sent += 1

    def send(self, message: dict) -> None:
        self.write(json.dumps(message).encode())

    def request(self, msg_id, method, params, timeout=180.0) -> dict:
        self.send({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
        deadline = time.monotonic() + timeout
        while json.dumps(msg_id) not in self.replies:
            assert self.proc.poll() is None, "the server died"
            assert time.monotonic() < deadline, f"no reply to {method}"
            time.sleep(0.02)
        return self.replies.pop(json.dumps(msg_id))


def inline_params(uri=URI, line=3, character=9):
    return {"textDocument": {"uri": uri}, "position": {"line": line, "character": character},
            "context": {"triggerKind": 1}}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):  # noqa: F811
    s = Server(server_command(tiny_model_dir, tmp_path_factory.mktemp("fuzz-adapters")))
    s.request(0, "initialize", {"processId": None, "capabilities": {"window": {"workDoneProgress": True}}})
    s.send({"jsonrpc": "2.0", "method": "initialized", "params": {}})
    s.send({"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": {
        "uri": URI, "languageId": "python", "version": 1, "text": TEXT}}})
    yield s
    s.proc.kill()
    s.proc.wait()


# -- strategies ----------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
positions = st.fixed_dictionaries({
    "line": st.one_of(st.integers(-5, 10), st.integers(2**31, 2**40), json_values),
    "character": st.one_of(st.integers(-5, 40), st.integers(2**31, 2**40), json_values),
})
uris = st.one_of(st.just(URI), st.just("file:///tmp/other.py"), st.text(max_size=30), json_values)
huge = st.integers(1_000, 200_000).map(lambda n: "x = 1  # " + "é" * n)


def _valid_messages():
    apply_fix = st.fixed_dictionaries({"uri": uris, "position": positions, "completion": st.text(max_size=20),
                                       "fix": st.one_of(st.text(max_size=20), json_values)})
    command = st.fixed_dictionaries({
        "command": st.one_of(st.sampled_from(COMMANDS), st.text(max_size=10)),
        "arguments": st.one_of(st.lists(st.one_of(apply_fix, json_values), max_size=2), json_values),
    })
    configuration = st.fixed_dictionaries({"settings": st.one_of(
        st.dictionaries(st.sampled_from(SETTING_KEYS), json_values, max_size=3),
        st.fixed_dictionaries({"star": st.dictionaries(st.sampled_from(SETTING_KEYS), json_values, max_size=3)}),
        json_values)})
    did_change = st.fixed_dictionaries({
        "textDocument": st.fixed_dictionaries({"uri": uris, "version": st.integers(-1, 10**6)}),
        "contentChanges": st.lists(st.one_of(
            st.fixed_dictionaries({"text": st.one_of(st.text(max_size=50), huge)}),
            st.fixed_dictionaries({"range": st.fixed_dictionaries({"start": positions, "end": positions}),
                                   "text": st.text(max_size=20)}),
            json_values), max_size=3),
    })
    did_open = st.fixed_dictionaries({"textDocument": st.fixed_dictionaries({
        "uri": st.sampled_from(["file:///tmp/other.py", "file:///tmp/third.py"]), "languageId": st.text(max_size=5),
        "version": st.integers(0, 10), "text": st.one_of(st.text(max_size=200), huge)})})
    completion = st.fixed_dictionaries({"textDocument": st.fixed_dictionaries({"uri": uris}), "position": positions,
                                        "context": st.one_of(st.fixed_dictionaries({"triggerKind": st.integers(-1, 4)}),
                                                             json_values)})
    code_action = st.fixed_dictionaries({"textDocument": st.fixed_dictionaries({"uri": uris}),
                                         "range": st.fixed_dictionaries({"start": positions, "end": positions}),
                                         "context": st.just({"diagnostics": []})})
    by_method = {
        "workspace/executeCommand": command, "workspace/didChangeConfiguration": configuration,
        "textDocument/didChange": did_change, "textDocument/didOpen": did_open,
        "textDocument/inlineCompletion": completion, "textDocument/completion": completion,
        "textDocument/codeAction": code_action,
    }
    shaped = st.sampled_from(sorted(by_method)).flatmap(
        lambda m: st.tuples(st.just(m), st.one_of(by_method[m], by_method[m], json_values)))
    random_method = st.tuples(st.one_of(st.sampled_from(METHODS), st.text(max_size=20)), json_values)
    ids = st.one_of(st.integers(1, 10**9).map(lambda i: f"f{i}"), st.integers(1, 10**6), st.none(), json_values)
    return st.builds(
        lambda mp, has_id, msg_id, drop: _message(mp[0], mp[1], msg_id if has_id else None, drop),
        st.one_of(shaped, random_method), st.booleans(), ids, st.sampled_from([None, "jsonrpc", "method", "params"]),
    )


def _message(method, params, msg_id, drop) -> bytes:
    message = {"jsonrpc": "2.0", "method": method, "params": params}
    if msg_id is not None:
        message["id"] = msg_id
    if drop:
        message.pop(drop, None)
    if isinstance(method, str) and method.startswith("$/cancel") and isinstance(params, dict):
        message["params"] = {"id": params.get("id", msg_id)}
    return json.dumps(message).encode()


bodies = st.one_of(
    _valid_messages(),
    _valid_messages(),
    json_values.map(lambda v: json.dumps(v).encode()),                       # any JSON at all
    st.binary(max_size=200),                                                 # not JSON, not even UTF-8
    _valid_messages().map(lambda b: b[: len(b) // 2]),                      # truncated JSON
)


def test_fuzz_then_a_valid_request_is_answered_correctly(server):
    before = server.request("before", "textDocument/inlineCompletion", inline_params())
    expected = before["result"]["items"][0]["insertText"]

    @settings(max_examples=80, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(bodies, min_size=30, max_size=45))   # 80 examples x at least 30 = over 2,000 messages
    def fuzz(batch):
        for body in batch:
            server.write(body)
        assert server.proc.poll() is None

    started = time.monotonic()
    fuzz()
    assert server.sent > 2000
    print(f"{server.sent} messages written in {time.monotonic() - started:.1f} s")

    # still alive and still right: undo whatever a random applyFix may have done, reset the settings
    for i in range(20):
        reply = server.request(f"undo{i}", "workspace/executeCommand", {"command": "star.patches.undoLast"})
        if reply.get("result", {}).get("removed") is None:
            break
    print(f"caught up after {time.monotonic() - started:.1f} s")
    server.send({"jsonrpc": "2.0", "method": "workspace/didChangeConfiguration",
                 "params": {"settings": {key: None for key in SETTING_KEYS if key != "model"}}})
    server.send({"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": {
        "uri": URI, "languageId": "python", "version": 99, "text": TEXT}}})
    after = server.request("final", "textDocument/inlineCompletion", inline_params())
    assert after["result"]["items"][0]["insertText"] == expected
    assert after["result"]["items"][0]["range"] == {"start": {"line": 3, "character": 9},
                                                    "end": {"line": 3, "character": 9}}
    assert server.proc.poll() is None
