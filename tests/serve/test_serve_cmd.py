"""`clipengine serve`: options become ServeSettings, the key comes from the env, the model source is picked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from clipengine.cli import serve_cmd
from clipengine.cli.app import app

from .conftest import FakeIndex, FakeModel


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch, fake_model: FakeModel, fake_index: FakeIndex) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def load_model(*args: Any) -> FakeModel:
        seen["load_args"] = args
        return fake_model

    def run_server(
        web_app: Any, host: str, port: int, log_level: str, graceful_s: float, root_path: str = ""
    ) -> None:
        seen.update(app=web_app, host=host, port=port, graceful_s=graceful_s, root_path=root_path)

    monkeypatch.setattr(serve_cmd, "_load_model", load_model)
    monkeypatch.setattr(serve_cmd, "_load_index", lambda path: fake_index)
    monkeypatch.setattr(serve_cmd, "_run_server", run_server)
    # The real check binds the port: these tests are about the options, on ports another test may hold.
    monkeypatch.setattr(serve_cmd, "_check_bindable", lambda host, port: seen.update(checked=(host, port)))
    return seen


def test_serve_builds_the_app_from_options(captured: dict[str, Any], tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "serve",
            "--model",
            "tiny",
            "--index",
            str(tmp_path),
            "--port",
            "8123",
            "--max-batch",
            "7",
            "--max-wait-ms",
            "2",
            "--max-queue",
            "9",
            "--max-texts",
            "5",
            "--api-key",
            "k1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "serving fake-clip on http://127.0.0.1:8123" in result.output and "7 images" in result.output
    state = captured["app"].state.clipengine
    s = state.settings
    assert (s.max_batch, s.max_wait_ms, s.max_queue, s.max_texts, s.api_key) == (7, 2.0, 9, 5, "k1")
    assert captured["load_args"][0] == "tiny" and state.index is not None
    with TestClient(captured["app"]) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/v1/info").status_code == 401


def test_api_key_can_come_from_the_environment(
    captured: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLIPENGINE_API_KEY", "from-env")
    result = CliRunner().invoke(app, ["serve", "--model", "tiny"])
    assert result.exit_code == 0, result.output
    assert captured["app"].state.clipengine.settings.api_key == "from-env"
    assert captured["app"].state.clipengine.index is None


def test_public_host_without_key_warns(captured: dict[str, Any]) -> None:
    result = CliRunner().invoke(app, ["serve", "--model", "tiny", "--host", "0.0.0.0"])
    assert result.exit_code == 0
    assert "without --api-key" in result.output


def test_bad_backend_is_a_usage_error(captured: dict[str, Any]) -> None:
    result = CliRunner().invoke(app, ["serve", "--model", "tiny", "--backend", "tpu"])
    assert result.exit_code == 2
    assert "one of torch, onnx, openvino, got 'tpu'" in " ".join(result.output.split())  # as every command says


def test_model_source_defaults_to_the_index_model(
    monkeypatch: pytest.MonkeyPatch, fake_index: FakeIndex
) -> None:
    api = pytest.importorskip("clipengine.api", reason="clipengine.api is not built yet")
    calls: list[Any] = []
    monkeypatch.setattr(api, "load", lambda *a, **k: calls.append((a, k)) or "model")
    serve_cmd._load_model(None, None, None, None, "torch", "cpu", "fp32", False, fake_index)  # type: ignore[arg-type]
    assert calls[0][0] == ("fake-clip",)
    serve_cmd._load_model(None, None, None, tmp := Path("export"), "torch", "cpu", "fp32", False, None)
    assert calls[1][0] == (str(tmp),) and calls[1][1]["backend"] == "onnx"
    with pytest.raises(typer.BadParameter, match="--model"):
        serve_cmd._load_model(None, None, None, None, "torch", "cpu", "fp32", False, None)


@pytest.mark.parametrize(("backend", "engine"), [("onnx", None), ("openvino", None), ("torch", Path("export"))])
def test_download_fetches_torch_weights_only(
    monkeypatch: pytest.MonkeyPatch, backend: str, engine: Path | None
) -> None:
    """`serve --backend onnx --model ViT-L-14 --download` fetched the 890 MB torch checkpoint, then
    failed: onnx / openvino (and --engine) run export folders, which are never downloaded."""
    from clipengine import api
    from clipengine.cli import downloads

    fetched: list[Any] = []
    monkeypatch.setattr(downloads, "fetch_with_progress", lambda *a, **k: fetched.append(a))
    monkeypatch.setattr(api, "load", lambda *a, **k: "model")
    serve_cmd._load_model("ViT-L-14", "openai", None, engine, backend, "cpu", "fp32", True, None)
    assert fetched == []
    serve_cmd._load_model("ViT-L-14", "openai", None, None, "torch", "cpu", "fp32", True, None)
    assert fetched == [("ViT-L-14", "openai")]  # the torch backend still gets its progress bar


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "tiny", "--log-level", "loud"], "'loud': use one of critical, error, warning, info"),
        (["--model", "tiny", "--engine", "FOLDER"], "--model and --engine both name the model to serve"),
        (["--checkpoint", "FILE", "--engine", "FOLDER"], "--checkpoint and --engine both name the model"),
        # Were: an OverflowError traceback; a batcher that could wait for company forever; and for a
        # blank key, a ValueError traceback.
        (["--model", "tiny", "--max-upload-mb", "inf"], "--max-upload-mb: inf: give a finite number"),
        (["--model", "tiny", "--max-wait-ms", "inf"], "--max-wait-ms: inf: give a finite number"),
        (["--model", "tiny", "--request-timeout", "inf"], "--request-timeout: inf: give a finite number"),
        (["--model", "tiny", "--api-key", "  "], "--api-key: the key is blank"),
    ],
)
def test_options_that_cannot_work_are_refused_before_the_model_loads(
    captured: dict[str, Any], tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "model.pt").write_bytes(b"")
    paths = {"FOLDER": str(tmp_path), "FILE": str(tmp_path / "model.pt")}
    result = CliRunner().invoke(app, ["serve", *[paths.get(a, a) for a in args]])
    # --log-level loud was uvicorn's KeyError traceback after the load; --engine silently won.
    assert result.exit_code == 2 and message in " ".join(result.output.split())
    assert "load_args" not in captured


def test_a_port_in_use_is_refused_before_the_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    loads: list[object] = []
    monkeypatch.setattr(serve_cmd, "_load_model", lambda *args: loads.append(args))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "--model", "tiny", "--port", str(port)])
    # It was uvicorn's "address already in use" among its log lines (exit 3), after the model load
    # and a "serving on" line.
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert f"cannot listen on 127.0.0.1:{port} (Address already in use)" in text and "--port" in text
    assert loads == [] and "serving" not in result.output


@pytest.mark.parametrize(
    "name", ["max_wait_ms", "request_timeout_s", "drain_timeout_s", "head_timeout_s", "min_upload_rate"]
)
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_settings_refuse_non_finite_times(name: str, value: float) -> None:
    from clipengine.serve import ServeSettings

    with pytest.raises(ValueError, match=f"ServeSettings.{name} must be a finite number"):
        ServeSettings(**{name: value})


@pytest.mark.parametrize(
    ("name", "value"), [("head_timeout_s", 0), ("min_upload_rate", -1), ("max_head_bytes", 0)]
)
def test_settings_refuse_connection_limits_that_cannot_work(name: str, value: float) -> None:
    from clipengine.serve import ServeSettings

    with pytest.raises(ValueError, match=name):
        ServeSettings(**{name: value})


def test_the_server_runs_with_the_request_head_limits(
    monkeypatch: pytest.MonkeyPatch, fake_model: FakeModel
) -> None:
    import uvicorn

    from clipengine.serve import ServeSettings, create_app

    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: seen.update(options))
    settings = ServeSettings(head_timeout_s=3, max_head_bytes=5000, request_timeout_s=4)
    serve_cmd._run_server(create_app(fake_model, None, settings), "127.0.0.1", 8123, "info", 7)
    # Was uvicorn's own protocol: a client that never finished its headers held its connection for ever.
    protocol = seen["http"]
    assert (protocol.head_timeout_s, protocol.max_head_bytes, protocol.send_timeout_s) == (3, 5000, 4)
    assert seen["h11_max_incomplete_event_size"] == 5000
    assert (seen["port"], seen["timeout_graceful_shutdown"]) == (8123, 7)


def test_the_server_does_not_log_each_malformed_multipart_body(
    monkeypatch: pytest.MonkeyPatch, fake_model: FakeModel
) -> None:
    """python-multipart logged every malformed body as a WARNING line naming no request ("Expected
    boundary character 88, got 65 at index 4"): any client could fill the server's log. The client
    gets the reason in its 400 (tests/serve/test_truncated_uploads.py)."""
    import logging

    import uvicorn

    from clipengine.serve import ServeSettings, create_app

    parser_log, package_log = logging.getLogger("python_multipart.multipart"), logging.getLogger("python_multipart")
    level = package_log.level
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: None)
    try:
        package_log.setLevel(logging.NOTSET)  # setLevel, not setattr: it clears the loggers' cached answers
        assert parser_log.isEnabledFor(logging.WARNING)
        serve_cmd._run_server(create_app(fake_model, None, ServeSettings()), "127.0.0.1", 8123, "info", 7)
        assert not parser_log.isEnabledFor(logging.WARNING)
        assert parser_log.isEnabledFor(logging.ERROR)
    finally:
        package_log.setLevel(level)


def test_an_index_whose_model_files_changed_is_refused_before_the_model_loads(
    captured: dict[str, Any], fake_model: FakeModel, fake_index: FakeIndex, tmp_path: Path
) -> None:
    """`search` and `index add` refuse an index's own model path once its files change (weights
    saved over it); `serve --index` ranked the old embeddings by the new model's queries."""
    from clipengine.pipeline.run_settings import model_files

    weights = tmp_path / "model.pt"
    weights.write_bytes(b"weights the index was built with")
    fake_index.model = fake_model.name = str(weights)
    fake_index.extra["model_files"] = model_files(str(weights))
    args = ["serve", "--index", str(tmp_path), "--port", "8123"]
    result = CliRunner().invoke(app, args)  # unchanged: served
    assert result.exit_code == 0, result.output
    assert captured["load_args"][0] is None  # no --model: the index's model is loaded
    captured.clear()
    weights.write_bytes(b"fine-tuned weights saved over them")
    result = CliRunner().invoke(app, args)  # main() prints it as one "error:" line
    assert result.exit_code == 1
    assert "whose files have changed since (model.pt differs)" in str(result.exception)
    assert "load_args" not in captured
