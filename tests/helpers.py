"""Shared by the test modules: a copy of the weights a patch changes and whether they are unchanged, and a
stand-in tokenizer with FIM tokens."""

from __future__ import annotations

from types import SimpleNamespace

import torch


def snapshot(lm) -> list[torch.Tensor]:
    """A copy of every layer's FFN output projection, in the (d, d_ff) layout patches change."""
    return [lm.arch.columns(l).detach().clone() for l in range(lm.arch.n_layers)]


def same_weights(lm, snap: list[torch.Tensor]) -> bool:
    """Whether every output projection holds exactly (bit for bit) the snapshot's values."""
    return all(torch.equal(lm.arch.columns(l), w) for l, w in enumerate(snap))


def as_loaded(model, tokenizer):
    """A model that is not a LoadedModel (vanilla peft's PeftModel) in the shape generation takes: the
    modules, the tokenizer and a cache of its own."""
    return SimpleNamespace(model=model, tokenizer=tokenizer, cache={})


class FimTokenizer:
    """One 'token' per character, plus Qwen2.5-Coder's three FIM tokens."""

    all_special_ids = []

    def get_vocab(self):
        return {"<|fim_prefix|>": 1, "<|fim_suffix|>": 2, "<|fim_middle|>": 3}

    def __call__(self, text, add_special_tokens=False):
        if isinstance(text, list):
            return {"input_ids": [list(t) for t in text]}
        return {"input_ids": list(text)}

    def decode(self, ids):
        return "".join(ids)
