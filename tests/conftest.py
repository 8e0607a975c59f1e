"""Shared fixtures: tiny random models built from configs with a tokenizer trained here (nothing to install or
download), and the real default model (slow tests only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, CodeGenConfig, GPT2Config, LlamaConfig, Qwen2Config

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
