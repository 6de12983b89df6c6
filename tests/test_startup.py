"""Start-up work before a command's real work: a device or precision the torch backend refuses is
refused before the checkpoint is read or downloaded (it came after the whole model had loaded:
0.5 s for ViT-B/32 on this CPU, tens of seconds for the largest, minutes with a download)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import clipengine
from clipengine.errors import BackendError
from clipengine.models import load as models_load

# (device, precision, message): what TorchBackend says for each, on a machine without CUDA.
_REFUSED = [
    ("cuda", "fp32", r"CUDA is not available; use device .cpu."),
    ("cpu", "fp16", "fp16 needs a CUDA device"),
    ("cpu", "fp8", "fp8 needs a CUDA GPU"),
]


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without CUDA, also where the tests run on a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every checkpoint load `api.load` starts, recorded instead of run."""
    calls: list[Any] = []

    def load_model(*args: Any, **kwargs: Any) -> None:
        calls.append(args)
        raise AssertionError("the checkpoint was read before the device and precision were checked")

    monkeypatch.setattr(models_load, "load_model", load_model)
    return calls


@pytest.mark.usefixtures("no_cuda")
@pytest.mark.parametrize(("device", "precision", "message"), _REFUSED)
def test_load_refuses_device_and_precision_before_reading_the_checkpoint(
    loads: list[Any], device: str, precision: str, message: str
) -> None:
    with pytest.raises(BackendError, match=message):
        clipengine.load("tiny-synth", device=device, precision=precision)
    assert loads == []


@pytest.mark.usefixtures("no_cuda")
def test_load_with_a_good_device_still_reads_the_checkpoint(loads: list[Any]) -> None:
    """The check comes before the load, not instead of it."""
    with pytest.raises(AssertionError, match="checkpoint was read"):
        clipengine.load("tiny-synth", device="cpu", precision="bf16")
    assert len(loads) == 1


@pytest.mark.usefixtures("no_cuda")
@pytest.mark.parametrize(("device", "precision", "message"), _REFUSED)
def test_cli_download_refuses_device_and_precision_before_downloading(
    monkeypatch: pytest.MonkeyPatch, loads: list[Any], device: str, precision: str, message: str
) -> None:
    """`predict --download --device cuda` (and every command through `load_clip`, and `serve`)
    downloaded the whole checkpoint, then said CUDA is not available."""
    from clipengine.cli import downloads, serve_cmd
    from clipengine.cli.model_options import load_clip, parse_model_options

    fetched: list[Any] = []
    monkeypatch.setattr(downloads, "fetch_with_progress", lambda *a, **k: fetched.append(a))
    opts = parse_model_options("ViT-L-14", "openai", None, "torch", precision, device, True)
    with pytest.raises(BackendError, match=message):
        load_clip(opts)
    with pytest.raises(BackendError, match=message):
        serve_cmd._load_model("ViT-L-14", "openai", None, None, "torch", device, precision, True, None)
    assert fetched == [] and loads == []


@pytest.mark.usefixtures("no_cuda")
def test_cli_download_check_leaves_local_paths_to_their_load(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A local path is never downloaded, and an export folder run by ONNX Runtime may use CUDA
    where torch cannot: the check before a download does not judge it."""
    from clipengine import api
    from clipengine.cli import downloads
    from clipengine.cli.model_options import load_clip, parse_model_options

    asked: list[Any] = []
    monkeypatch.setattr(api, "load", lambda *a, **k: asked.append((a, k)) or "model")
    downloads.check_before_download(str(tmp_path), None, "cuda", "fp16")  # no error
    opts = parse_model_options(str(tmp_path), None, None, "torch", "fp32", "cuda", True)
    assert load_clip(opts) == "model"  # type: ignore[comparison-overlap]
    assert asked[0][1]["device"] == "cuda"


def test_export_usage_errors_come_before_torch_is_imported(tmp_path: Path) -> None:
    """`export` imported torch and torch.export (1.3 s on this CPU) before checking its options: a
    mistyped precision or batch list, or an empty calibration folder, waited for them."""
    import subprocess
    import sys

    (tmp_path / "empty").mkdir()
    code = (
        "import sys\n"
        "from clipengine.cli.app import main\n"
        "out = sys.argv[1]\n"
        "for args in (['--precision', 'fp64'], ['--image-batch', 'a'],\n"
        "             ['--precision', 'int8', '--calibration-dir', out + '/empty']):\n"
        "    assert main(['export', 'ViT-B-32', '-o', out + '/export', *args]) != 0, args\n"
        "leaked = [m for m in ('torch', 'clipengine.export.onnx') if m in sys.modules]\n"
        "assert not leaked, leaked\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "'fp64': use a comma list of fp32, fp16, int8, int8w" in done.stderr
    assert "--calibration-dir" in done.stderr and not (tmp_path / "export").exists()
