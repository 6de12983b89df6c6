"""`encode_images(path)` and `clipengine embed` decode and preprocess alike: the same pixels, so the
same embeddings, for the files where the two paths differ most (EXIF rotation, CMYK, progressive
JPEG, alpha, palette with transparency, 16-bit grey)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipengine.api import ClipModel
from clipengine.cli.app import main
from clipengine.pipeline.sinks import read_embeddings

_ROTATED = 6  # EXIF orientation: rotate 90 degrees to display


def _write_images(folder: Path) -> None:
    rng = np.random.default_rng(0)

    def pixels(height: int, width: int, channels: int = 3) -> np.ndarray:
        return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)

    exif = Image.Exif()
    exif[0x0112] = _ROTATED
    Image.fromarray(pixels(60, 80)).save(folder / "rotated.jpg", exif=exif.tobytes(), quality=92)
    Image.fromarray(pixels(50, 30)).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(pixels(90, 200)).save(folder / "progressive.jpg", progressive=True)
    Image.fromarray(pixels(50, 30, 4)).save(folder / "alpha.png")
    Image.fromarray(pixels(40, 40)).convert("P").save(folder / "palette.png", transparency=3)
    Image.fromarray(rng.integers(0, 65536, (40, 30)).astype(np.uint16)).save(folder / "grey16.png")


@pytest.mark.parametrize("workers", ["0", "1"])
def test_api_and_embed_give_the_same_embeddings(
    model: ClipModel, model_dir: Path, tmp_path: Path, workers: str
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    _write_images(folder)
    out = tmp_path / "out"
    args = ["embed", str(folder), "-o", str(out), "-m", str(model_dir), "--dtype", "float32"]
    assert main([*args, "--workers", workers, "--no-progress"]) == 0
    names, embedded, _ = read_embeddings(out)
    assert sorted(Path(name).name for name in names) == sorted(p.name for p in folder.iterdir())
    from_api = model.encode_images([folder / Path(name).name for name in names])
    np.testing.assert_allclose(embedded, from_api, rtol=0, atol=1e-6)
