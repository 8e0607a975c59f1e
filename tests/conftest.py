"""Shared fixtures: tiny random models built from configs with a tokenizer trained here (nothing to install or
download), the real servers on the tiny Llama that the server tests use (each started ahead of the test that
takes it, since a start takes seconds; two of them shared by many tests), and the real default model (slow
tests only)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytest_asyncio
import torch
from transformers import AutoModelForCausalLM, CodeGenConfig, GPT2Config, LlamaConfig, Qwen2Config

from helpers import FULL_DISK, can_mount, mounted
from lsp_harness import Ahead, RawServer, cleaned, serving, server_command, spawn
from star_engine.model import from_modules, load_model
from tiny_tokenizer import train_tiny_tokenizer

TINY = dict(hidden=64, ff=128, layers=4, heads=4, positions=256)


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny models' tokenizer: a small byte-level BPE trained on a few lines of code."""
    return train_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tokenizer, tmp_path_factory) -> Path:
    """The tiny tokenizer saved to disk, for subprocesses that build a tiny model of their own."""
    path = tmp_path_factory.mktemp("tiny-tokenizer")
    tokenizer.save_pretrained(path)
    return path


def tiny_config(family: str, vocab: int, bos: int = 1, eos: int = 2):
    h, ff, n, heads, pos = TINY["hidden"], TINY["ff"], TINY["layers"], TINY["heads"], TINY["positions"]
    if family in ("llama", "qwen2"):
        cls = LlamaConfig if family == "llama" else Qwen2Config
        return cls(vocab_size=vocab, hidden_size=h, intermediate_size=ff, num_hidden_layers=n,
                   num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=pos,
                   tie_word_embeddings=True)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=h, n_inner=ff, n_layer=n, n_head=heads, n_positions=pos,
                          bos_token_id=bos, eos_token_id=eos)
    if family == "codegen":
        return CodeGenConfig(vocab_size=vocab, n_embd=h, n_inner=ff, n_layer=n, n_head=heads, rotary_dim=8,
                             n_positions=pos, n_ctx=pos, bos_token_id=bos, eos_token_id=eos)
    raise ValueError(family)


def make_tiny(family: str, tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_config(family, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    return from_modules(model, tokenizer, name=f"tiny-{family}")


@pytest.fixture(params=["llama", "qwen2", "gpt2", "codegen"])
def tiny_lm(request, tokenizer):
    """A tiny random model of each supported family."""
    return make_tiny(request.param, tokenizer)


@pytest.fixture
def tiny_llama(tokenizer):
    return make_tiny("llama", tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory) -> Path:
    """The tiny random Llama (seed 0) saved as a local HF directory: `--model <dir>`."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny("llama", tokenizer).model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _starters(model_dir: Path, tmp_path_factory) -> dict:
    """How each server the tests use is started, by the name of the fixture that serves it."""

    def folders(name: str) -> tuple[Path, Path]:
        root = tmp_path_factory.mktemp(name)
        return root / "adapters", root / "server.log"

    def lsp(name: str, logged: bool = False, mount: str | None = None):
        async def start():
            adapters, log = folders(name)
            command = server_command(model_dir, adapters, *(["--log-file", str(log)] if logged else []))
            client = await spawn(mounted(mount, adapters, command) if mount else command)
            client.adapters, client.log_path = adapters, log
            return client
        return start

    def raw(name: str, logged: bool = False):
        async def start():
            adapters, log = folders(name)
            server = RawServer(server_command(model_dir, adapters, *(["--log-file", str(log)] if logged else [])))
            server.adapters, server.log = adapters, log
            return server
        return start

    async def tcp():
        with socket.socket() as s:                       # a free port
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = server_command(model_dir, folders("tcp")[0], "--tcp", f"127.0.0.1:{port}")
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return SimpleNamespace(proc=proc, port=port)

    return {"shared": lsp("shared", logged=True), "plain_server": lsp("plain"), "settings_server": lsp("settings"),
            "shutdown_server": lsp("shutdown"), "raw_server": raw("raw", logged=True),
            "vanishing_server": raw("vanishing"), "tcp_server": tcp,
            "full_disk_server": lsp("full-disk", mount=FULL_DISK) if can_mount() else
            "needs `unshare -rm` (user and mount namespaces) for a real full disk"}


@pytest_asyncio.fixture(scope="session", loop_scope="session", autouse=True)
async def ahead(request, tiny_model_dir, tmp_path_factory):
    """The servers that the selected tests use, each started ahead of the test that takes it (lsp_harness.Ahead)."""
    starters = _starters(tiny_model_dir, tmp_path_factory)
    queue = [name for item in request.session.items for name in item.fixturenames if name in starters]
    servers = Ahead(starters, list(dict.fromkeys(queue)))
    await servers.fill()
    yield servers
    await servers.close()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def shared(ahead):
    """One real server on the tiny Llama, driven by pytest-lsp, for the LSP tests of every module (they run on
    the session's event loop: `on_shared`); it logs to `shared.log_path`."""
    async with serving(await ahead.take("shared")) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="session")
async def server(shared):
    """The shared server for a test that changes it (patches, settings) or reads its notifications."""
    async with cleaned(shared) as client:
        yield client


def _own(name: str):
    """The fixture `name`: that server of its own for one test, started ahead, not initialized (the test does
    that its way), killed after the test if it still runs."""

    @pytest_asyncio.fixture(name=name, loop_scope="session")
    async def fixture(ahead):
        async with ahead.own(name) as server:
            yield server

    return fixture


settings_server = _own("settings_server")
shutdown_server = _own("shutdown_server")
full_disk_server = _own("full_disk_server")       # its adapters folder is a tmpfs of 8 KiB
vanishing_server = _own("vanishing_server")        # over raw stdio
tcp_server = _own("tcp_server")                    # listening on `tcp_server.port` of 127.0.0.1


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def raw_server(ahead) -> RawServer:
    """One real server over raw stdio, initialized, for the framing and fuzz tests; it logs to `raw_server.log`."""
    s = await ahead.take("raw_server")
    s.request(0, "initialize", {"processId": None, "capabilities": {"window": {"workDoneProgress": True}}})
    s.send({"jsonrpc": "2.0", "method": "initialized", "params": {}})
    yield s
    s.stop()


@pytest.fixture(scope="session")
def default_lm():
    """The real embedded default model (SmolLM2-135M). Tests that change its weights must undo them."""
    return load_model()


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Two cores shared by many processes: one torch thread is ~10x faster than two fighting (session-wide,
    so that module- and session-scoped fixtures that repair a model get it too)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
