"""The server calls one ClipModel from several threads: 8 threads encoding images and texts at once
must get what the same calls give one after another, on the torch and the ONNX backend."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import clipengine
from clipengine.api import ClipModel
from clipengine.models.clip import CLIP

_THREADS = 8
_CALLS = 48


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory, tiny_model: CLIP) -> ClipModel:
    from clipengine.export.onnx import export_model

    out = tmp_path_factory.mktemp("api_threads") / "tiny"
    export_model(tiny_model, out, image_batches=(1, 4), text_batches=(1, 4), verify=False)
    return clipengine.load(out, backend="onnx")


def _call(model: ClipModel, k: int) -> np.ndarray:
    """Call k: images or texts (alternating), each call its own inputs and batch size."""
    rng = np.random.default_rng(k)
    if k % 2:
        images = [rng.integers(0, 256, (20 + k, 30 + i, 3), dtype=np.uint8) for i in range(1 + k % 5)]
        return model.encode_images(images, batch_size=1 + k % 3)
    texts = [f"a photo of {k} {word}" for word in ("cats", "dogs", "red circles")[: 1 + k % 3]]
    return model.encode_texts(texts, batch_size=1 + k % 2)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_concurrent_calls_give_the_sequential_results(
    backend: str, model: ClipModel, request: pytest.FixtureRequest
) -> None:
    clip = model if backend == "torch" else request.getfixturevalue("onnx_model")
    sequential = [_call(clip, k) for k in range(_CALLS)]
    with ThreadPoolExecutor(_THREADS) as pool:
        concurrent = list(pool.map(lambda k: _call(clip, k), range(_CALLS)))
    for k, (alone, together) in enumerate(zip(sequential, concurrent, strict=True)):
        np.testing.assert_allclose(together, alone, rtol=0, atol=1e-6, err_msg=f"call {k}")
