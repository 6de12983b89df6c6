#!/usr/bin/env bash
# Creates ./.venv and installs clipengine with every extra plus the test tooling.
# Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch is pinned to the CPU wheel (2.13.0) in the same command as everything that depends on it,
# so pip never swaps in a multi-GB CUDA build. torchvision 0.28.0 pairs with torch 2.13.
.venv/bin/python -m pip install -q --disable-pip-version-check \
  "torch==2.13.0" "torchvision==0.28.0" -e ".[all,dev]"
# open_clip is a parity reference only; --no-deps keeps pip from touching torch.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "open_clip_torch==3.3.0"
