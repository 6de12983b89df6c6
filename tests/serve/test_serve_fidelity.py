"""`clipengine serve` states a lower precision's deviation from fp32 when it starts (and in /v1/info)."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from clipengine.cli import serve_cmd
from clipengine.cli.app import app

from .conftest import FakeModel


class _Bf16Backend:
    name, device, precision = "torch", "cpu", "bf16"


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_serve_prints_the_deviation_note_at_start(
    monkeypatch: pytest.MonkeyPatch, fake_model: FakeModel, precision: str
) -> None:
    backend = _Bf16Backend()
    backend.precision = precision
    fake_model.backend = backend  # type: ignore[attr-defined]
    seen: dict[str, Any] = {}
    monkeypatch.setattr(serve_cmd, "_load_model", lambda *args: fake_model)
    monkeypatch.setattr(serve_cmd, "_run_server", lambda web_app, *a: seen.update(app=web_app))
    monkeypatch.setattr(serve_cmd, "_check_bindable", lambda host, port: None)
    result = CliRunner().invoke(app, ["serve", "--model", "tiny"])
    assert result.exit_code == 0, result.output
    note = "note: torch bf16 is not fp32: deviation from fp32 unmeasured for this model [docs/performance.md"
    assert (note in result.stderr) == (precision == "bf16")
    assert (seen["app"].state.clipengine.fidelity is None) == (precision == "fp32")


def test_info_states_an_approximate_indexs_measured_recall(make_client: Any, fake_model: FakeModel) -> None:
    import numpy as np

    pytest.importorskip("faiss")
    from clipengine.index import Index
    from clipengine.report import index_recall

    from .conftest import DIM

    vectors = np.random.default_rng(0).standard_normal((300, DIM)).astype(np.float32)
    ids = [f"{i}.png" for i in range(300)]
    index = Index.build(ids, vectors, model=fake_model.name, kind="ivf", nlist=8, nprobe=1)
    index.extra["recall"] = index_recall(index, vectors, ids)
    info = make_client(index=index).get("/v1/info").json()["index"]
    assert info["kind"] == "ivf" and info["recall"] == index.extra["recall"] and info["recall"]["recall"] < 1.0
    del index.extra["recall"]  # an index whose recall nobody measured says so: null
    assert make_client(index=index).get("/v1/info").json()["index"]["recall"] is None
