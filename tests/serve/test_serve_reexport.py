"""A server over an export folder opens every engine at start (ExportFolderBackend.open_engines): a
broken engine fails the start, and a re-export of the folder while it serves changes nothing it
answers. Before, engines opened on first use could be another export's (same names, other weights)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from reweighted import reweighted

from clipengine.api import load_export
from clipengine.export.manifest import read_manifest
from clipengine.export.onnx import export_model


@pytest.fixture(scope="module")
def first_export(tmp_path_factory: pytest.TempPathFactory, tiny_model: Any) -> Path:
    """The export each test starts from (each works on a copy): one torch.export for the module."""
    out = tmp_path_factory.mktemp("serve_reexport") / "export"
    export_model(tiny_model, out, image_batches=(1,), text_batches=(1, 4), verify=False)
    return out


def _texts(client: Any, texts: list[str]) -> np.ndarray:
    r = client.post("/v1/embeddings/texts", json={"texts": texts})
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)


def test_a_reexport_while_serving_changes_no_answer(
    tmp_path: Path, tiny_model: Any, make_client: Any, first_export: Path
) -> None:
    out = tmp_path / "export"
    shutil.copytree(first_export, out)
    texts = ["a dog", "a cat", "a bus", "a tree"]
    original = load_export(out)
    original.backend.open_engines()  # type: ignore[attr-defined]
    expected = original.encode_texts(texts)
    served = load_export(out)
    client = make_client(index=None, model=served)  # its warm-up embeds one text: engine b1
    for seed in (1, 2):  # the second re-export gives the engines their plain names back
        export_model(reweighted(tiny_model, seed), out, image_batches=(1,), text_batches=(1, 4), verify=False)
    # Four texts in one call run the b4 engine, which only the start can have opened (the server's
    # micro-batcher may cut a request into smaller calls, so the model is called directly too).
    np.testing.assert_allclose(served.encode_texts(texts), expected, atol=1e-6)
    np.testing.assert_allclose(_texts(client, texts), expected, atol=1e-6)
    assert float(load_export(out).encode_texts(["a dog"])[0] @ expected[0]) < 0.999  # the new export differs


def test_a_broken_engine_fails_the_start_not_a_request(tmp_path: Path, make_client: Any, first_export: Path) -> None:
    out = tmp_path / "export"
    shutil.copytree(first_export, out)
    manifest = read_manifest(out)
    b4 = next(e.file for e in manifest.engines if e.tower == "text" and e.batch == 4)
    (out / b4).write_bytes(b"not an onnx graph")
    with pytest.raises(Exception, match=b4.replace(".", r"\.")):
        make_client(index=None, model=load_export(out))
