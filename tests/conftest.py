"""Shared fixtures: tiny random models built from configs with a tokenizer trained here (nothing to install or
download), the real servers on the tiny Llama that the server tests share (starting one takes seconds), and
the real default model (slow tests only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_asyncio
import torch
from transformers import AutoModelForCausalLM, CodeGenConfig, GPT2Config, LlamaConfig, Qwen2Config

from lsp_harness import RawServer, cleaned, server_command, tiny_server
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


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def shared(tiny_model_dir, tmp_path_factory):
    """One real server on the tiny Llama, driven by pytest-lsp, for the LSP tests of every module (they run on
    the session's event loop: `on_shared`); it logs to `shared.log_path`."""
    root = tmp_path_factory.mktemp("shared-server")
    async with tiny_server(tiny_model_dir, root / "adapters", "--log-file", str(root / "server.log")) as client:
        client.log_path = root / "server.log"
        yield client


@pytest_asyncio.fixture(loop_scope="session")
async def server(shared):
    """The shared server for a test that changes it (patches, settings) or reads its notifications."""
    async with cleaned(shared) as client:
        yield client


@pytest.fixture(scope="session")
def raw_server(tiny_model_dir, tmp_path_factory) -> RawServer:
    """One real server over raw stdio, initialized, for the framing and fuzz tests; it logs to `raw_server.log`."""
    root = tmp_path_factory.mktemp("raw-server")
    s = RawServer(server_command(tiny_model_dir, root / "adapters", "--log-file", str(root / "server.log")))
    s.log = root / "server.log"
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
