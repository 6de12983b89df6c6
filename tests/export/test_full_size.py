"""A full-size ViT-B/32 (random weights) through export, verification and the ONNX backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.mark.slow
def test_vit_b32_export_verifies_and_round_trips(tmp_path: Path, clip_png: Path) -> None:
    import torch

    from clipengine.api import load_export
    from clipengine.export.onnx import export_model
    from clipengine.models.clip import build_model
    from clipengine.models.config import get_config

    torch.manual_seed(0)
    model = build_model(get_config("ViT-B-32"))
    out = tmp_path / "ViT-B-32"
    manifest = export_model(model, out, precisions=("fp32", "int8"), image_batches=None, text_batches=None,
                            sample_images_from=[clip_png])
    assert {e.file for e in manifest.engines} == {
        "image_fp32_dyn.onnx", "image_int8_dyn.onnx", "text_fp32_dyn.onnx", "text_int8_dyn.onnx"
    }
    for engine in manifest.engines:
        assert engine.parity is not None and engine.parity.passed, engine
        assert engine.external_data is None  # 350 MB: well under the 2 GB protobuf limit
    assert manifest.embed_dim == 512 and manifest.image_size == 224
    clip = load_export(out, precision="int8")
    with torch.no_grad():
        ref = model.encode_image(torch.from_numpy(clip.preprocess(clip_png))[None]).numpy()
    got = clip.encode_images([clip_png])
    assert float((got * ref / np.linalg.norm(ref)).sum()) >= 0.99
