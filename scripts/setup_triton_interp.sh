#!/usr/bin/env bash
# Triton, for the CPU tests that run the GPU preprocessing's kernels (src/clipengine/image/gpu_triton.py)
# in its interpreter (TRITON_INTERPRET=1, numpy on the CPU): there is no GPU in CI.
# Installed beside the venv's packages, not among them (.venv/triton-interp, ~640 MB), so that nothing
# but those tests, which put it on PYTHONPATH in a subprocess, ever imports it here.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.venv/triton-interp
if [ -f "$DEST/triton/__init__.py" ]; then exit 0; fi
rm -rf "$DEST.tmp"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --target "$DEST.tmp" "triton==3.6.0"
# An incomplete $DEST (no triton/__init__.py) goes first: mv would put the new one inside it.
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
