"""open_clip's GitHub-release weights by NAME@TAG: their training-checkpoint layout, the QuickGELU flag
of the entry reaching the model, the 8-digit checksum prefix, and the offline messages (no network)."""

from __future__ import annotations

import urllib.error
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from clipengine.cli.app import app, main
from clipengine.errors import CheckpointError, DownloadNotAllowedError
from clipengine.models import registry
from clipengine.models.load import load_model
from clipengine.models.registry import WeightSource, get_source
from clipengine.models.weights import cache_path, cache_status, sha256_file

from .conftest import Checkpoint, _open_clip_model, open_clip_encode
from .parity import assert_parity
from .test_registry import GITHUB_RELEASE_KEYS

NEW_KEYS = sorted(
    GITHUB_RELEASE_KEYS
    | {
        "ViT-B-32@datacomp_xl_s13b_b90k",
        "ViT-B-16@datacomp_xl_s13b_b90k",
        "ViT-L-14@datacomp_xl_s13b_b90k",
        "ViT-g-14@laion2b_s12b_b42k",
    }
)


def _source(key: str) -> WeightSource:
    arch, _, tag = key.partition("@")
    return get_source(arch, tag)


def _place_training_checkpoint(src: WeightSource, model: Any) -> Path:
    """The file where the cache expects it, laid out as open_clip's training script saved its releases:
    epoch, run name, DataParallel's "module." on every key, and optimizer state (ints, floats, tuples)."""
    path = cache_path(src)
    path.parent.mkdir(parents=True)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    scale = torch.nn.Parameter(torch.ones(1))  # a tiny optimizer: its state's shape is what matters
    optimizer = torch.optim.AdamW([scale], lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    scale.grad = torch.ones(1)
    optimizer.step()
    torch.save({"epoch": 32, "name": "laion400m", "state_dict": state, "optimizer": optimizer.state_dict()}, path)
    return path


def _embed(loaded: Any, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return loaded.module.encode_image(pixels)


@pytest.mark.slow
def test_a_laion400m_release_loads_by_name_with_quickgelu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ViT-B-32@laion400m_e32 at full size: the training checkpoint in the cache loads by name, as
    QuickGELU (the flag reaches the module: a GELU build of the same weights embeds differently), equal
    to open_clip's ViT-B-32-quickgelu and to the same weights read from a plain state dict."""
    reference = _open_clip_model("ViT-B-32-quickgelu", seed=9)
    src = _source("ViT-B-32@laion400m_e32")
    path = _place_training_checkpoint(src, reference)

    # The registered prefix (46683a32) is checked for a hand-placed file: random weights fail it.
    with pytest.raises(CheckpointError, match="expected one starting with 46683a32"):
        load_model("ViT-B-32@laion400m_e32")
    placed = replace(src, sha256=sha256_file(path)[:8])  # the prefix these random weights would be named with
    monkeypatch.setitem(registry._BY_ARCH["ViT-B-32"], "laion400m_e32", placed)

    by_name = load_model("ViT-B/32-quickgelu@laion400m_e32")
    assert by_name.config.quick_gelu and (by_name.name, by_name.pretrained) == ("ViT-B-32", "laion400m_e32")
    assert by_name.source == str(path) and cache_status(placed) == "yes"
    assert_parity(Checkpoint(path, reference, open_clip_encode(reference), 224), by_name)
    without_suffix = load_model("ViT-B-32@laion400m_e32")  # the entry, not the name, says QuickGELU
    assert without_suffix.config.quick_gelu
    del without_suffix

    plain = tmp_path / "plain.bin"
    torch.save(reference.state_dict(), plain)
    del reference
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    expected = _embed(by_name, pixels)
    from_plain = load_model(plain, arch="ViT-B-32-quickgelu")
    assert torch.equal(_embed(from_plain, pixels), expected)
    del from_plain
    gelu = load_model(plain)  # a plain open_clip file says nothing: GELU, open_clip's default
    assert not gelu.config.quick_gelu
    assert (_embed(gelu, pixels) - expected).abs().max() > 1e-3


def test_models_lists_the_open_clip_weights() -> None:
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if "@" in line.split(" ")[0]}
    for key in NEW_KEYS:
        assert rows[key][:3] == ["open_clip", "no", str(cache_path(_source(key)))], key


def test_download_offline_names_the_github_url_and_the_cache_path(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    src = _source("ViT-B-32@laion400m_e32")
    assert main(["download", "ViT-B-32-quickgelu@laion400m_e32"]) == 1
    err_lines = capsys.readouterr().err.splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error: "), err_lines
    url = "https://github.com/mlfoundations/open_clip/releases/download/v0.2-weights/vit_b_32-quickgelu-laion400m_e32-46683a32.pt"
    assert url in err_lines[0] and str(cache_path(src)) in err_lines[0]
    assert cache_path(src).name == "vit_b_32-quickgelu-laion400m_e32-46683a32.pt"


@pytest.mark.parametrize("key", ["RN50@yfcc15m", "ViT-B-32@laion2b_e16", "ViT-L-14@datacomp_xl_s13b_b90k"])
def test_a_load_without_the_file_says_where_to_put_it(key: str) -> None:
    src = _source(key)
    with pytest.raises(DownloadNotAllowedError) as info:
        load_model(key)
    message = str(info.value)
    assert src.url is not None and src.url in message and str(cache_path(src)) in message
    assert f"clipengine download {key}" in message and "\n" not in message
