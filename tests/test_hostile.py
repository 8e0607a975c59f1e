"""Hostile input (issue 15): adapter files built to hang, wreck or confuse star, and requests built to crash
the server. Every one must get a one-line refusal (or a JSON-RPC error) and change nothing; tiny random
models, real files, a real pygls server for the LSP part."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import make_tiny
from star_engine.adapters import AdapterError, PatchStack, load_adapter, save_adapter
from star_engine.adapters.format import CONFIG_NAME, META_NAME, WEIGHTS_NAME
from helpers import READ_ONLY, can_mount, forked, kill_9, mounted, same_weights, snapshot
from test_adapters import CASES, fake_result, folder_listing, hand_patch, rewrite_weights

HOSTILE_COUNTS: dict[str, int] = {}    # class of hostile input -> how many the tests send (see the report)


def count(kind: str, n: int = 1) -> None:
    HOSTILE_COUNTS[kind] = HOSTILE_COUNTS.get(kind, 0) + n


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    """Print how many hostile inputs of each class this run sent (`pytest -s` shows it)."""
    yield
    print("\nhostile inputs sent:", ", ".join(f"{k}: {v}" for k, v in sorted(HOSTILE_COUNTS.items())))


# -- adapter files ---------------------------------------------------------------------------------------------


@pytest.fixture
def adapter(tokenizer, tmp_path) -> Path:
    """A valid adapter made on the tiny Llama (seed 0): one-hot layer 1, identity layer 2."""
    lm = make_tiny("llama", tokenizer)
    return save_adapter(lm, fake_result(lm, hand_patch(lm)), tmp_path / "colleague" / "shared")


@pytest.fixture
def stack(tiny_llama, tmp_path) -> PatchStack:
    """The user's stack with one patch of their own already applied."""
    s = PatchStack(tiny_llama, tmp_path / "mine")
    s.load()
    s.add(fake_result(tiny_llama, hand_patch(tiny_llama, seed=7), CASES[1]))
    return s


def archive_of(directory: Path, tmp_path: Path) -> Path:
    out = tmp_path / f"{directory.name}.star.zip"
    with zipfile.ZipFile(out, "w") as z:
        for p in directory.iterdir():
            z.write(p, f"{directory.name}/{p.name}")
    return out


def assert_refused(stack: PatchStack, source: Path, match: str, tmp_path: Path, *, archive: bool = True) -> None:
    """Import `source` (the directory, and the same files as a .star.zip): refused with one line, the weights
    and the folder exactly as they were."""
    before, listing = snapshot(stack.lm), folder_listing(stack.path)
    sources = [source, archive_of(source, tmp_path)] if archive else [source]
    for src in sources:
        count("adapter file")
        started = time.perf_counter()
        with pytest.raises(AdapterError, match=match) as err:
            stack.import_(src)
        assert time.perf_counter() - started < 10
        assert "\n" not in str(err.value)
        assert same_weights(stack.lm, before) and folder_listing(stack.path) == listing


def edit_json(directory: Path, name: str, change) -> None:
    data = json.loads((directory / name).read_text())
    change(data)
    (directory / name).write_text(json.dumps(data))


# 0. ReDoS: no pattern from a file is ever evaluated.

CATASTROPHIC = "(.*.*)*!"       # backtracks for hours against any module path


def _modules(config: dict) -> list[str]:
    return list(config["rank_pattern"])


CONFIG_PATTERNS = {
    "target-regex-catastrophic": (lambda c: c.update(target_modules=CATASTROPHIC), "target_modules is a pattern"),
    "target-regex-benign": (lambda c: c.update(target_modules=r".*\.down_proj"), "target_modules is a pattern"),
    "target-all-linear": (lambda c: c.update(target_modules="all-linear"), "target_modules is a pattern"),
    "target-not-strings": (lambda c: c.update(target_modules=[*_modules(c), 5]), "list of module names"),
    "rank-key-catastrophic": (
        lambda c: c.update(rank_pattern={CATASTROPHIC: 1, **c["rank_pattern"]}), "not a module path"),
    "alpha-key-catastrophic": (
        lambda c: c.update(alpha_pattern={CATASTROPHIC: 1, **c["alpha_pattern"]}), "not a module path"),
    "rank-key-suffix-regex": (
        lambda c: c.update(rank_pattern={r"layers\.\d+\.mlp\.down_proj": 3}), "not a module path"),
    "rank-not-object": (lambda c: c.update(rank_pattern=["x"]), "must be an object"),
    "rank-bool": (lambda c: c["rank_pattern"].update({m: True for m in _modules(c)}), "rank"),
    "exclude-modules": (lambda c: c.update(exclude_modules=CATASTROPHIC), "exclude_modules is set"),
    "layers-pattern": (lambda c: c.update(layers_pattern=CATASTROPHIC, layers_to_transform=[1]), "is set"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", list(CONFIG_PATTERNS))
def test_patterns_in_adapter_config_are_refused_without_being_evaluated(kind, adapter, stack, tmp_path):
    change, match = CONFIG_PATTERNS[kind]
    edit_json(adapter, CONFIG_NAME, change)
    assert_refused(stack, adapter, match, tmp_path)


def test_module_names_star_writes_and_peft_suffixes_are_accepted(adapter, stack):
    edit_json(adapter, CONFIG_NAME, lambda c: c.update(target_modules=["down_proj"]))   # peft's suffix match
    info = stack.import_(adapter)
    assert info.applied


# 1. Absurd but finite values: the delta bound, then the probe.


def _scale_b(value: float, dtype=torch.float32):
    def spoil(d: Path) -> None:
        from safetensors.torch import load_file

        tensors = load_file(d / WEIGHTS_NAME)
        for key in [k for k in tensors if k.endswith("lora_B.weight") and ".1." in k]:   # the one-hot layer
            tensors[key] = torch.full_like(tensors[key], value, dtype=dtype)
        rewrite_weights(d, tensors)

    return spoil


ABSURD = {"1e30": _scale_b(1e30), "1e4": _scale_b(1e4), "bf16-1e30": _scale_b(1e30, torch.bfloat16)}


@pytest.mark.parametrize("kind", list(ABSURD))
def test_an_adapter_that_moves_columns_absurdly_far_is_refused(kind, adapter, stack, tmp_path):
    ABSURD[kind](adapter)
    assert_refused(stack, adapter, r"layer 1: the adapter moves neuron \d+ by .*x the norm of its column", tmp_path)


@pytest.mark.parametrize("kind", ["1e30", "bf16-1e30"])
def test_behind_the_bound_the_probe_refuses_a_model_that_breaks_down(kind, adapter, stack, tmp_path, monkeypatch):
    from star_engine.adapters import format as fmt

    monkeypatch.setattr(fmt, "MAX_DELTA_RATIO", float("inf"))      # only the probe stands in the way now
    ABSURD[kind](adapter)
    assert_refused(stack, adapter, "breaks down on a probe prompt", tmp_path)


def test_an_absurd_adapter_dropped_into_the_watched_folder_is_ignored(adapter, stack):
    import shutil

    ABSURD["1e30"](adapter)
    before = snapshot(stack.lm)
    shutil.copytree(adapter, stack.path / "dropped")
    count("adapter file")
    [message] = stack.sync()
    assert message.startswith("ignored dropped: layer 1: the adapter moves neuron")
    assert same_weights(stack.lm, before) and "dropped" not in [i.id for i in stack.list()]


def test_the_bound_and_the_probe_accept_ordinary_patches_in_every_family(tiny_lm, tokenizer, tmp_path):
    """hand_patch moves columns by up to 45x their norm on GPT-2's tiny random weights (std 0.02 / sqrt(8))."""
    family = tiny_lm.name.removeprefix("tiny-")
    path = save_adapter(tiny_lm, fake_result(tiny_lm, hand_patch(tiny_lm)), tmp_path / "fix")
    lm = make_tiny(family, tokenizer)
    before = snapshot(lm)
    assert sorted(load_adapter(lm, path).patch.layers) == [1, 2]
    assert same_weights(lm, before)                  # the probe's hooks never write the weights


# 7. Files that are not files: FIFOs, links out of the folder, devices, huge sparse files.


def _fifo(name):
    def spoil(d: Path) -> None:
        (d / name).unlink()
        os.mkfifo(d / name)

    return spoil


def _link(name, target):
    def spoil(d: Path) -> None:
        (d / name).unlink()
        (d / name).symlink_to(target)

    return spoil


def _link_outside(name):
    def spoil(d: Path) -> None:                       # the same bytes, but kept outside the adapter directory
        outside = d.parent / f"outside-{name}"
        (d / name).rename(outside)
        (d / name).symlink_to(outside)

    return spoil


def _sparse(name, size):
    def spoil(d: Path) -> None:
        os.truncate(d / name, size)

    return spoil


NOT_FILES = {
    "meta-fifo": (_fifo(META_NAME), "star.json .*not a regular file"),
    "config-fifo": (_fifo(CONFIG_NAME), "adapter_config.json is not a regular file"),
    "weights-fifo": (_fifo(WEIGHTS_NAME), "not a regular file"),
    "meta-dev-zero": (_link(META_NAME, "/dev/zero"), "symbolic link"),
    "weights-dev-zero": (_link(WEIGHTS_NAME, "/dev/zero"), "symbolic link"),
    "meta-link-outside": (_link_outside(META_NAME), "symbolic link"),
    "weights-link-outside": (_link_outside(WEIGHTS_NAME), "symbolic link"),
    "meta-huge-sparse": (_sparse(META_NAME, 64 * 2**20), "too large"),
    "config-huge-sparse": (_sparse(CONFIG_NAME, 64 * 2**20), "too large"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", list(NOT_FILES))
def test_files_that_are_not_regular_files_are_refused_without_blocking(kind, adapter, stack, tmp_path):
    spoil, match = NOT_FILES[kind]
    spoil(adapter)
    assert_refused(stack, adapter, match, tmp_path, archive=False)     # a zip cannot hold these
    # Dropped into the stack folder (what the watcher syncs): ignored, and listing it does not hang.
    before = snapshot(stack.lm)
    os.rename(adapter, stack.path / "dropped")
    count("adapter file")
    [message] = stack.sync()
    assert message.startswith("ignored dropped:") and "\n" not in message
    assert same_weights(stack.lm, before)
    from star_engine.adapters import AdapterFolder

    listed = AdapterFolder(stack.path).list()                  # `star adapters list`: returns, does not block
    assert [i.id for i in listed] == [i.id for i in stack.list()] + ["dropped"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_manifest_that_is_not_a_file_is_rebuilt_from_the_folder(kind, stack, tiny_llama, tokenizer):
    manifest = stack.path / "stack.json"
    manifest.unlink()
    if kind == "fifo":
        os.mkfifo(manifest)
    else:
        manifest.symlink_to("/dev/zero")
    count("adapter file")
    again = PatchStack(make_tiny("llama", tokenizer), stack.path)
    [message] = again.load()
    assert "stack.json" in message and "rebuilt from the folder" in message
    assert again.applied == stack.applied


# 4. star.json is typed data; what it says is printed escaped.


def _meta_set(path: list, value):
    def spoil(d: Path) -> None:
        def change(meta):
            target = meta
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value

        edit_json(d, META_NAME, change)

    return spoil


WRONG_TYPES = {
    "n_neurons-string": (["n_neurons"], "5", r"star\.json\.n_neurons"),
    "n_neurons-bool": (["n_neurons"], True, r"star\.json\.n_neurons"),
    "version-string": (["version"], "1", r"star\.json\.version"),
    "cases-string": (["cases"], "not a list", r"star\.json\.cases"),
    "case-prompt-int": (["cases", 0, "prompt"], 7, r"star\.json\.cases\[0\]\.prompt"),
    "case-fix-list": (["cases", 0, "fix"], ["b"], r"star\.json\.cases\[0\]\.fix"),
    "case-wrong-object": (["cases", 0, "wrong"], {"x": 1}, r"star\.json\.cases\[0\]\.wrong"),
    "layers-strings": (["layers"], ["1", "2"], r"star\.json\.layers"),
    "neurons-values": (["neurons", "1"], "3", r"star\.json\.neurons"),
    "name-number": (["name"], 12, r"star\.json\.name"),
    "created-object": (["created"], {}, r"star\.json\.created"),
    "config-list": (["config"], [1, 2], r"star\.json\.config"),
    "base-n_layers-float": (["base_model", "n_layers"], 4.0, r"star\.json\.base_model\.n_layers"),
    "base-sha-int": (["base_model", "weights_sha256", "1"], 5, r"star\.json\.base_model\.weights_sha256"),
    "base-missing": (["base_model"], None, r"star\.json\.base_model"),
}


@pytest.mark.parametrize("kind", list(WRONG_TYPES))
def test_a_sidecar_with_wrong_types_is_refused_naming_the_field(kind, adapter, stack, tmp_path):
    path, value, field = WRONG_TYPES[kind]
    _meta_set(path, value)(adapter)
    assert_refused(stack, adapter, f"wrong type: .*{field}", tmp_path)


ESCAPES = "\x1b[2J\x1b]0;owned\x07\u202e"


def test_adapters_list_and_show_print_user_text_escaped(adapter, tmp_path):
    from test_adapters import run_cli

    _meta_set(["name"], f"name{ESCAPES}")(adapter)
    _meta_set(["cases", 0, "prompt"], f"# prompt{ESCAPES}\n")(adapter)
    _meta_set(["cases", 0, "fix"], f"fix{ESCAPES}")(adapter)
    _meta_set(["method"], f"star{ESCAPES}")(adapter)
    folder = tmp_path / "folder"
    folder.mkdir()
    os.rename(adapter, folder / "shared")
    count("adapter file")
    for command in (["list"], ["show", "shared"]):
        code, out, err = run_cli("adapters", "--dir", str(folder), *command)
        assert code == 0, err
        assert not any(c in out + err for c in "\x1b\x07\u202e"), out
        assert "\\x1b[2J" in out


# 10. Stored cases are bounded (each is re-checked whenever a patch is applied).


def _cases(n: int, prompt: str):
    return _meta_set(["cases"], [{"prompt": prompt, "fix": " b", "wrong": None} for _ in range(n)])


CASE_BOUNDS = {
    "too-many": (_cases(9, "x = 1\n"), "holds 9 cases; at most 8"),
    "one-too-long": (_cases(1, "x = 1\n" * 1200), "case 1 is .* tokens long; at most 2048"),
    "too-long-together": (_cases(3, "x = 1\n" * 400), "over 4096 tokens together"),
    "megabytes": (_cases(1, "x" * 3_000_000), "characters long"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", list(CASE_BOUNDS))
def test_the_stored_cases_of_an_imported_patch_are_bounded(kind, adapter, stack, tmp_path):
    spoil, match = CASE_BOUNDS[kind]
    spoil(adapter)
    assert_refused(stack, adapter, match, tmp_path)


# -- the language server ---------------------------------------------------------------------------------------

import asyncio  # noqa: E402

import pytest_asyncio  # noqa: E402
from lsprotocol import types  # noqa: E402
from pygls.exceptions import JsonRpcException  # noqa: E402

from lsp_harness import (  # noqa: E402
    FIX,
    FIX_PROMPT,
    command,
    end_of,
    fix_args,
    initialize,
    inline,
    on_shared,
    open_doc,
    raw_request,
    serving,
    wait_for,
)

INVALID_PARAMS = -32602
REQUEST_FAILED = -32803
URI = "file:///tmp/hostile.py"
TEXT = "x = 1\nname = 'caf\U0001F600e'\n"     # line 1 holds a character outside the BMP (two UTF-16 units)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def hostile(shared):
    """The shared server, with the document the invalid requests point into."""
    open_doc(shared, URI, TEXT)
    return shared


def _position(line, character):
    return {"line": line, "character": character}


BAD_FIX_ARGS = [
    # the argument list itself
    [], [None], ["text"], [1], [[]], [{}, {}],
    # fields of the wrong type
    [{"uri": 5, "position": _position(0, 0), "fix": "y"}],
    [{"uri": None, "position": _position(0, 0), "fix": "y"}],
    [{"uri": ["x"], "position": _position(0, 0), "fix": "y"}],
    [{"uri": URI, "position": _position(0, 0), "fix": 5}],
    [{"uri": URI, "position": _position(0, 0), "fix": ["y"]}],
    [{"uri": URI, "position": _position(0, 0), "fix": {"text": "y"}}],
    [{"uri": URI, "position": _position(0, 0), "fix": "y", "completion": 3}],
    [{"uri": URI, "position": _position(0, 0), "fix": "y", "completion": {"a": 1}}],
    [{"uri": URI, "position": "0:0", "fix": "y"}],
    [{"uri": URI, "position": [0, 0], "fix": "y"}],
    [{"uri": URI, "position": None, "fix": "y"}],
    # positions out of range
    [{"uri": URI, "position": _position(-1, 0), "fix": "y"}],
    [{"uri": URI, "position": _position(0, -1), "fix": "y"}],
    [{"uri": URI, "position": _position(-(2**40), -(2**40)), "fix": "y"}],
    [{"uri": URI, "position": _position(2**31, 0), "fix": "y"}],
    [{"uri": URI, "position": _position(0, 2**70), "fix": "y"}],
    [{"uri": URI, "position": _position(1.5, 0), "fix": "y"}],
    [{"uri": URI, "position": _position(True, 0), "fix": "y"}],
    [{"uri": URI, "position": _position("1", "2"), "fix": "y"}],
    [{"uri": URI, "position": {"line": 0}, "fix": "y"}],
    [{"uri": URI, "position": _position(0, 6), "fix": "y"}],              # past the end of line 0
    [{"uri": URI, "position": _position(1, 12), "fix": "y"}],             # between the two halves of U+1F600
    # blank or huge fixes
    [{"uri": URI, "position": _position(0, 0), "fix": ""}],
    [{"uri": URI, "position": _position(0, 0), "fix": " \n\t "}],
]
BAD_PATCH_ARGS = {
    "star.patches.setEnabled": [[], [{"id": 5, "enabled": True}], [{"id": "x", "enabled": "yes"}],
                                [{"id": "x", "enabled": 1}], [{"id": None, "enabled": False}], [{"enabled": True}],
                                [{"id": ["x"], "enabled": True}]],
    "star.patches.remove": [[], [{"id": 5}], [{"id": ""}], [{"id": {"a": 1}}], [{}], ["id"]],
    "star.patches.import": [[], [{"path": 5}], [{"path": ""}], [{"path": ["x"]}], [{}], [None]],
    "star.patches.export": [[], [{"id": "x"}], [{"id": 5, "path": "/tmp/x"}], [{"id": "x", "path": None}],
                            [{"id": "x", "path": 7}]],
    "star.completion.accepted": [[{"id": "x"}], [5], [None], [["x"]]],
}


def _tracebacks(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if "Traceback" in line]


@on_shared
async def test_invalid_command_params_answer_invalid_params_with_one_line(hostile):
    client = hostile
    before = _tracebacks(client.log_path)
    answered = []
    calls = [("star.applyFix", args) for args in BAD_FIX_ARGS]
    calls += [(name, args) for name, cases in BAD_PATCH_ARGS.items() for args in cases]
    for name, args in calls:
        count("invalid params")
        try:
            result = await command(client, name, *args)
        except JsonRpcException as e:
            answered.append((name, args, e.code, e.message))
        else:
            answered.append((name, args, "result", result))
    wrong = [a for a in answered if (a[2], a[3]) != ("result", None) if a[0] == "star.completion.accepted"]
    wrong += [a for a in answered if a[0] != "star.completion.accepted"
              if a[2] != INVALID_PARAMS or "\n" in a[3] or "Traceback" in a[3]]
    assert not wrong, "\n".join(map(repr, wrong))
    assert _tracebacks(client.log_path) == before
    assert isinstance(await inline(client, URI, types.Position(0, 5)), types.InlineCompletionList)   # still serving


def test_a_position_inside_a_surrogate_pair_is_refused():
    from pygls.workspace import TextDocument

    from star_server.documents import BadPosition, offset_at

    doc = TextDocument(URI, TEXT)
    smile = TEXT.split("\n")[1].index("\U0001F600")                 # 10: its UTF-16 columns are 10 and 11
    assert offset_at(doc, types.Position(1, smile)) == len("x = 1\n") + smile
    assert offset_at(doc, types.Position(1, smile + 2)) == len("x = 1\n") + smile + 1
    count("invalid params")
    with pytest.raises(BadPosition, match="surrogate pair"):
        offset_at(doc, types.Position(1, smile + 1))


@on_shared
async def test_no_completion_inside_a_surrogate_pair(hostile):
    count("invalid params")
    assert not (await inline(hostile, URI, types.Position(1, 12))).items


# 2. Cancelling star.applyFix: truly cancelled before the commit, reported as kept after it.


async def _status(client) -> str:
    return (await command(client, "star.stats"))["status"]["kind"]


@pytest.mark.timeout(300)
@on_shared
async def test_cancel_request_of_apply_fix_answers_only_once_the_repair_has_stopped(server):
    client, uri, at = server, "file:///tmp/cancel.py", end_of(FIX_PROMPT)
    open_doc(client, uri, FIX_PROMPT)
    before = (await inline(client, uri, at)).items
    reply = raw_request(client, types.WORKSPACE_EXECUTE_COMMAND,
                        {"command": "star.applyFix", "arguments": [fix_args(uri, at, "", FIX)]}, msg_id="fix-1")
    await wait_for(lambda: any(s.kind == "repairing" for s in client.statuses), 60, "repairing status")
    count("cancel")
    client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id="fix-1"))
    with pytest.raises(JsonRpcException) as e:
        await asyncio.wait_for(reply, 120)
    assert e.value.code == -32800 and "unchanged" in e.value.message
    assert await _status(client) != "repairing"                 # answered once it had really stopped
    assert await command(client, "star.patches.list") == []
    assert not list(client.adapters.glob("[!.]*"))               # nothing on disk (stack.json aside)
    assert not any("fixed the completion" in m.message for m in client.messages)
    assert (await inline(client, uri, at)).items == before


def _host_with_stack(tiny_llama, folder):
    from star_server.engine_host import EngineHost

    host = EngineHost()
    host.install(tiny_llama, str(folder))
    host.close()                                                    # no watcher thread in this test
    return host


def _fake_repair(host):
    """A repair function that always fixes: the hand-made patch, applied as repair() leaves it."""

    def fake(lm, cases, method, **kwargs):
        return fake_result(lm, hand_patch(lm, seed=3), cases[0])

    return fake


def test_a_cancel_just_before_the_commit_restores_the_weights_and_writes_nothing(tiny_llama, tmp_path, monkeypatch):
    import star_server.engine_host as eh
    from star_engine.case import RepairCase
    from star_engine.session import RepairCancelled

    host = _host_with_stack(tiny_llama, tmp_path / "adapters")
    before = snapshot(host.workbench)
    cancel = threading.Event()
    real = _fake_repair(host)

    def repair_then_cancel(*args, **kwargs):            # the cancel arrives as the repair returns, fixed
        result = real(*args, **kwargs)
        cancel.set()
        return result

    monkeypatch.setattr(eh, "repair", repair_then_cancel)
    count("cancel")
    with pytest.raises(RepairCancelled):
        host.repair(RepairCase(prompt=FIX_PROMPT, fix=FIX), "star", cancel=cancel)
    assert same_weights(host.workbench, before)
    assert host.stack.list() == [] and not list((tmp_path / "adapters").glob("[!.]*"))


def test_a_cancel_after_the_commit_keeps_the_patch_and_the_reply_says_so(tiny_llama, tmp_path, monkeypatch):
    import star_server.engine_host as eh
    from star_engine.case import RepairCase
    from star_server.fixes import repair_reply

    host = _host_with_stack(tiny_llama, tmp_path / "adapters")
    cancel = threading.Event()
    monkeypatch.setattr(eh, "repair", _fake_repair(host))
    add = host.stack.add

    def add_then_cancel(result):                         # the cancel arrives just after the commit
        info = add(result)
        cancel.set()
        return info

    monkeypatch.setattr(host.stack, "add", add_then_cancel)
    count("cancel")
    result, info = host.repair(RepairCase(prompt=FIX_PROMPT, fix=FIX), "star", cancel=cancel)
    assert result.fixed and [p.id for p in host.stack.list()] == [info.id]
    reply = repair_reply(result, info, cancelled_late=cancel.is_set())
    assert reply["kept"] is True and "so it was kept" in reply["message"] and reply["patchId"] == info.id


# 9. Two repairs in one burst; shutdown during a repair.


@pytest.mark.timeout(300)
@on_shared
async def test_two_apply_fix_in_one_burst_the_second_is_refused(server):
    open_doc(server, "file:///tmp/burst.py", FIX_PROMPT)
    args = fix_args("file:///tmp/burst.py", end_of(FIX_PROMPT), "", FIX)
    count("burst", 2)
    first, second = await asyncio.gather(command(server, "star.applyFix", args),
                                         command(server, "star.applyFix", args), return_exceptions=True)
    assert isinstance(first, dict), first
    assert isinstance(second, JsonRpcException) and second.code == REQUEST_FAILED
    assert "already running" in second.message


@pytest.mark.timeout(300)
@on_shared
async def test_shutdown_during_a_repair_exits_cleanly(shutdown_server):
    client = await initialize(shutdown_server)
    uri = "file:///tmp/shutdown.py"
    open_doc(client, uri, FIX_PROMPT)
    repair = asyncio.ensure_future(command(client, "star.applyFix", fix_args(uri, end_of(FIX_PROMPT), "", FIX)))
    await wait_for(lambda: any(s.kind == "repairing" for s in client.statuses), 60, "repairing status")
    count("shutdown")
    assert await asyncio.wait_for(client.shutdown_async(None), 60) is None      # no -32603
    client.exit(None)
    await asyncio.wait_for(client._server.wait(), 60)
    assert client._server.returncode == 0
    await asyncio.gather(repair, return_exceptions=True)
    leftovers = [p.name for p in client.adapters.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []
    await client.stop()


# 3. Temporaries of a writer killed with SIGKILL are cleaned on the next open (only ones no live process owns).


def _write_then_hang(mode: str, target: Path, tokenizer, ready) -> None:
    """Save an adapter (mode "save") or add one to the stack in `target` on the tiny Llama; once its first
    file is written, set `ready` and hang until killed."""
    from star_engine.adapters import format as fmt

    real = fmt._write_file

    def write_then_hang(path, data):
        real(path, data)
        ready.set()
        time.sleep(600)

    fmt._write_file = write_then_hang                 # in the child only: it is a forked copy
    lm = make_tiny("llama", tokenizer)
    result = fake_result(lm, hand_patch(lm))
    if mode == "save":
        fmt.save_adapter(lm, result, target)
    else:
        stack = PatchStack(lm, target)
        stack.load()
        stack.add(result)


def _killed_while_writing(mode: str, target: Path, tokenizer) -> int:
    """Run a writer process and kill it with SIGKILL once its first file is written; returns its pid."""
    proc, ready = forked(_write_then_hang, mode, target, tokenizer)
    try:
        assert ready.wait(60), f"the writer exited with {proc.exitcode}"
    finally:
        kill_9(proc)
    count("kill -9")
    return proc.pid


def _temps(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith((".tmp-", ".trash-")))


@pytest.mark.timeout(120)
def test_temporaries_beside_a_save_target_are_cleaned_when_their_writer_is_dead(tiny_llama, tokenizer, tmp_path):
    dead = _killed_while_writing("save", tmp_path / "fix", tokenizer)
    [left] = _temps(tmp_path)
    assert left.startswith(f".tmp-{dead}-")
    live = tmp_path / f".tmp-{os.getpid()}-live"          # a writer of this (live) process: never touched
    live.mkdir()
    mine = tmp_path / f".tmp-{dead}-notes"                # not an adapter's files: not ours to delete
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    save_adapter(tiny_llama, fake_result(tiny_llama, hand_patch(tiny_llama)), tmp_path / "another")
    assert _temps(tmp_path) == sorted([live.name, mine.name])


@pytest.mark.timeout(120)
def test_temporaries_in_a_stack_folder_are_cleaned_on_open(tokenizer, tmp_path):
    folder = tmp_path / "adapters"
    dead = _killed_while_writing("stack", folder, tokenizer)
    (folder / ".tmp-import-abc123").mkdir()                 # these are only made under the folder lock
    (folder / ".trash-def456").mkdir()
    live = folder / f".tmp-{os.getpid()}-live"
    live.mkdir()
    assert any(n.startswith(f".tmp-{dead}-") for n in _temps(folder))
    stack = PatchStack(make_tiny("llama", tokenizer), folder)
    assert stack.load() == []
    assert _temps(folder) == [live.name]


# A full disk or a read-only adapters folder: the repair fails with one line, and nothing is lost. A real
# full disk (a tmpfs of 8 KiB) and a real read-only folder (a read-only bind mount) need a private mount
# namespace (`unshare -rm`, as root or as a user allowed user namespaces: helpers.mounted); the
# persist-layer tests below simulate the full disk by making the file writes raise ENOSPC, and run everywhere.


def _enospc(path, data):
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])                 # a part is written, then the disk is full
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _enospc_atomic(path, data):
    """atomic_write_file on a full disk: the temp file is half written when ENOSPC comes (the real
    temp + rename path, so the file it replaces is untouched)."""
    from star_engine.adapters.atomic import atomic_write_with

    def fill(f):
        f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    atomic_write_with(path, fill)


def _add_fails_and_nothing_is_lost(stack: PatchStack, tokenizer, match: str) -> None:
    listed, before, listing = [i.id for i in stack.list()], snapshot(stack.lm), folder_listing(stack.path)
    count("full disk / read-only folder")
    with pytest.raises(OSError, match=match) as err:
        stack.add(fake_result(stack.lm, hand_patch(stack.lm, seed=3), CASES[2]))
    assert "\n" not in str(err.value)
    assert same_weights(stack.lm, before)                       # the stack's weights, the earlier patch kept
    assert folder_listing(stack.path) == listing and [i.id for i in stack.list()] == listed
    reopened = PatchStack(make_tiny("llama", tokenizer), stack.path)
    assert reopened.load() == [] and [i.id for i in reopened.list()] == listed


def test_a_full_disk_while_the_adapter_is_written_fails_the_repair_and_loses_nothing(stack, tokenizer, monkeypatch):
    from star_engine.adapters import format as fmt

    monkeypatch.setattr(fmt, "_write_file", _enospc)
    _add_fails_and_nothing_is_lost(stack, tokenizer, "No space left on device")


def test_a_full_disk_while_the_manifest_is_written_fails_the_repair_and_loses_nothing(stack, tokenizer, monkeypatch):
    from star_engine.adapters import folder as fld

    monkeypatch.setattr(fld, "atomic_write_file", _enospc_atomic)
    _add_fails_and_nothing_is_lost(stack, tokenizer, "No space left on device")


_READ_ONLY_CHILD = """
import json, sys
sys.path.insert(0, "tests")
from transformers import AutoTokenizer
from conftest import make_tiny
from helpers import same_weights, snapshot
from test_adapters import CASES, fake_result, hand_patch
from star_engine.adapters import PatchStack

lm = make_tiny("llama", AutoTokenizer.from_pretrained(sys.argv[2], local_files_only=True))
stack, out = PatchStack(lm, sys.argv[1]), {}
try:
    stack.load()
    out["listed"] = [i.id for i in stack.list()]
    before = snapshot(lm)
    stack.add(fake_result(lm, hand_patch(lm, seed=3), CASES[2]))
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
    out["unchanged"] = "listed" in out and same_weights(lm, before)
print(json.dumps(out))
"""


@pytest.mark.timeout(120)
def test_a_read_only_folder_still_serves_its_patches_and_fails_the_repair_with_one_line(stack, tiny_tokenizer_dir,
                                                                                         tmp_path):
    import subprocess
    import sys

    listed, listing = [i.id for i in stack.list()], folder_listing(stack.path)
    child = [sys.executable, "-c", _READ_ONLY_CHILD, str(stack.path), str(tiny_tokenizer_dir)]
    if not can_mount():
        pytest.skip("needs `unshare -rm` (user and mount namespaces) for a real read-only folder")
    command = mounted(READ_ONLY, stack.path, child)
    count("full disk / read-only folder")
    done = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=100)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out.get("listed") == listed, out
    assert "Read-only file system" in out["error"] and "\n" not in out["error"] and out["unchanged"]
    assert folder_listing(stack.path) == listing


@pytest.mark.timeout(300)
@on_shared
async def test_apply_fix_on_a_full_disk_fails_with_one_line_and_the_model_is_unchanged(full_disk_server):
    async with serving(full_disk_server) as client:
        uri = "file:///tmp/full-disk.py"
        open_doc(client, uri, FIX_PROMPT)
        before = (await inline(client, uri, end_of(FIX_PROMPT))).items
        count("full disk / read-only folder")
        with pytest.raises(JsonRpcException) as e:
            await command(client, "star.applyFix", fix_args(uri, end_of(FIX_PROMPT), "", FIX))
        assert e.value.code == REQUEST_FAILED and "No space left on device" in e.value.message
        assert "\n" not in e.value.message
        assert await command(client, "star.patches.list") == []
        assert (await inline(client, uri, end_of(FIX_PROMPT))).items == before
        assert await _status(client) in ("ready", "slow")
