"""ruff's lint rules (pyproject [tool.ruff]) hold over the whole tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_ruff_check_is_clean() -> None:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("ruff (a [dev] dependency) is not installed")
    result = subprocess.run(
        [exe, "check", "--no-cache", "src", "tests", "benchmarks", "scripts"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:]
