#!/usr/bin/env bash
# The test command: set-up (idempotent) then the whole suite. .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_browser.sh || echo "setup_browser: Chromium not installed; browser tests will skip"
bash scripts/setup_triton_interp.sh || echo "setup_triton_interp: triton not installed; its interpreter tests will skip"
exec .venv/bin/python -m pytest "$@"
