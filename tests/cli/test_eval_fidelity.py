"""`clipengine eval` at a lower precision states its deviation from fp32 (as predict does)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipengine.cli.app import app
from clipengine.eval import synthetic

TINY_SYNTH = Path(__file__).resolve().parents[2] / "src" / "clipengine" / "weights" / "tiny-synth"

pytestmark = pytest.mark.skipif(
    not (TINY_SYNTH / "model.safetensors").is_file(), reason="tiny-synth weights not generated"
)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_zeroshot_at_bf16_states_its_deviation(tmp_path: Path, precision: str) -> None:
    synthetic.write_flat_folder(tmp_path / "flat", synthetic.generate(12, seed=3, task="shape"))
    args = ["eval", "zeroshot", "-d", "folder", "--root", str(tmp_path / "flat"), "-m", str(TINY_SYNTH),
            "--labels", "labels.txt", "--out", str(tmp_path / "r"), "--precision", precision]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    note = "note: torch bf16 is not fp32: deviation from fp32 unmeasured for this model [docs/performance.md"
    assert (note in result.stderr) == (precision == "bf16")
