"""Shared by the test modules: a copy of the weights a patch changes and whether they are unchanged, a
stand-in tokenizer with FIM tokens, a writer process to kill -9, a command in a mount namespace of its own,
and the `star` command line in-process."""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import shutil
import signal
import subprocess
from pathlib import Path
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


def forked(target, *args):
    """`target(*args, ready)` in a forked copy of this process: a real process of its own, that starts at
    once (torch, the model and the test's objects are already loaded); the child sets the event `ready`
    when the parent may act. Returns the process and `ready`."""
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    proc = context.Process(target=target, args=(*args, ready), daemon=True)
    proc.start()
    return proc, ready


def kill_9(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()


# A real full disk (a tmpfs of 8 KiB) and a real read-only folder (a read-only bind mount) for `mounted`.
FULL_DISK = 'mount -t tmpfs -o size=8k tmpfs "$0"'
READ_ONLY = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0"'


def can_mount() -> bool:
    """Whether `unshare -rm` gives this user a private mount namespace (root, or user namespaces allowed)."""
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


def mounted(mount: str, folder: Path, command: list[str]) -> list[str]:
    """`command` in a private mount namespace where `folder` is mounted by the shell line `mount`."""
    folder.mkdir(parents=True, exist_ok=True)
    return ["unshare", "-rm", "sh", "-c", f'{mount} && exec "$@"', str(folder), *command]


def run_cli(*args) -> tuple[int, str, str]:
    """`star ARGS` run in this process: its exit code, stdout and stderr."""
    from star_engine.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()
