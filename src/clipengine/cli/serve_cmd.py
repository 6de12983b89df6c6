"""`clipengine serve`: load a model (and optionally an index) and run the HTTP service with uvicorn."""

from __future__ import annotations

import errno
import ipaddress
import math
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from .model_options import ANY_BACKEND_PRECISIONS, BACKEND_CHOICES

if TYPE_CHECKING:
    from ..api import ClipModel
    from ..index import Index

__all__ = ["LOG_LEVELS", "register"]

LOOPBACK_HOSTS = ("localhost",)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's
_CHECKPOINT_OPT = typer.Option(None, "--checkpoint", exists=True, help="Checkpoint file.")
_ENGINE_OPT = typer.Option(
    None,
    "--engine",
    exists=True,
    file_okay=False,
    help="ONNX export folder (has manifest.json); run by onnx, or by openvino with --backend openvino.",
)
_INDEX_OPT = typer.Option(None, "--index", exists=True, help="Index folder to search (enables /v1/search).")


def _load_model(
    model: str | None,
    pretrained: str | None,
    checkpoint: Path | None,
    engine: Path | None,
    backend: str,
    device: str,
    precision: str,
    download: bool,
    index: Index | None,
) -> ClipModel:
    """Pick the model source (engine folder > checkpoint > name > the index's own model) and load it."""
    from ..api import load

    opts: dict[str, Any] = {}
    if engine is not None:
        source: str = str(engine)  # an export folder: api.load reads its manifest.json
    elif checkpoint is not None:
        source = str(checkpoint)
        if model:
            opts["arch"] = model
    elif model:
        source = model
    elif index is not None and index.model:
        source, pretrained = index.model, pretrained or getattr(index, "pretrained", None)
    else:
        raise typer.BadParameter(
            "give --model, --checkpoint or --engine (or --index to use the index's model)"
        )
    # The bar `clipengine download` draws; the load then finds the file cached. Torch checkpoints
    # only: onnx / openvino run export folders, never downloaded (`model_options.load_clip` agrees).
    if download and backend == "torch" and engine is None:
        from .downloads import check_before_download, fetch_with_progress

        check_before_download(source, pretrained, device, precision)
        fetch_with_progress(source, pretrained)
    return load(
        source,
        pretrained=pretrained,
        backend="onnx" if engine and backend == "torch" else backend,
        device=device,
        precision=precision,
        allow_download=download,
        **opts,
    )


def _check_sources(model: str | None, checkpoint: Path | None, engine: Path | None) -> None:
    """--engine names its model in its manifest: a --model or --checkpoint beside it was ignored."""
    if engine is not None and (model or checkpoint is not None):
        given = "--model" if model else "--checkpoint"
        raise typer.BadParameter(
            f"{given} and --engine both name the model to serve; an export folder holds its own: "
            f"drop {given}, or drop --engine to serve {given}'s model",
            param_hint="--engine",
        )


_NOT_HERE = "use an address of this machine, e.g. 127.0.0.1"
_BIND_FIXES = {
    errno.EADDRINUSE: ("pick another --port, or stop what holds it", "--port"),
    errno.EACCES: ("ports below 1024 need privileges: pick --port 1024 or above", "--port"),
}


def _check_bindable(host: str, port: int) -> None:
    """Bind the address and let it go before the model loads: a port in use or a host that is not
    this machine's is then one line at once, not uvicorn's log lines (exit 3) after a long load and
    a "serving on" line that was not true."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise typer.BadParameter(f"cannot resolve {host!r} ({e.strerror})", param_hint="--host") from e
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(address)
        except OSError as e:
            fix, option = _BIND_FIXES.get(e.errno or 0, (_NOT_HERE, "--host"))
            raise typer.BadParameter(
                f"cannot listen on {host}:{port} ({e.strerror}); {fix}", param_hint=option
            ) from e


def _check_limits(
    max_upload_mb: float, max_wait_ms: float, request_timeout: float, api_key: str | None
) -> None:
    """Refuse values typer's min= lets through: `inf` (an OverflowError traceback for the upload limit,
    a batcher that waits for company forever) and a blank key (a ValueError traceback from settings)."""
    for option, value in (
        ("--max-upload-mb", max_upload_mb),
        ("--max-wait-ms", max_wait_ms),
        ("--request-timeout", request_timeout),
    ):
        if not math.isfinite(value):
            raise typer.BadParameter(f"{value}: give a finite number", param_hint=option)
    if api_key and not api_key.strip():
        raise typer.BadParameter(
            "the key is blank (from the option or CLIPENGINE_API_KEY); give a real key",
            param_hint="--api-key",
        )


def _check_index_model_files(
    index: Index, index_path: Path, model: str | None, checkpoint: Path | None, engine: Path | None
) -> None:
    """The model path the index was built with must still hold the same files (as `search` and
    `index add` check): weights saved over it would embed queries the indexed vectors do not match."""
    from ..pipeline.run_settings import model_files
    from .index_models import check_model_files

    source = engine or checkpoint or model or index.model  # the source `_load_model` picks
    if source:
        check_model_files(index, index_path, str(source), model_files(str(source)))


def _load_index(path: Path) -> Index:
    from ..index import Index

    return Index.load(path)


# Descriptors the process keeps for itself beside its connections: model and index files, thumbnails
# being read, the event loop, thread pools and libraries.
_OWN_FDS = 100


def _fit_fd_limit(max_connections: int) -> str | None:
    """Raise the soft file-descriptor limit (up to the hard one) to hold `max_connections` connections.

    Why: each connection is a descriptor; with the common soft limit of 1024 the default cap of 1000
    was never reached: accept() and file opens failed first. Returns a warning when it cannot fit.
    """
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    need = max_connections + _OWN_FDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return None
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        target = soft
    if target >= need:
        return None
    return (
        f"warning: --max-connections {max_connections} needs about {need} file descriptors, the limit "
        f"is {target} (ulimit -n): raise it, or lower --max-connections to {max(1, target - _OWN_FDS)}"
    )


def _run_server(
    app: Any, host: str, port: int, log_level: str, graceful_s: float, root_path: str = ""
) -> None:
    """Run uvicorn until SIGINT/SIGTERM; it stops accepting, waits for in-flight requests, then drains.

    The app's settings also bound each request head in time and size (serve.protocol). `root_path`
    is uvicorn's: each request's path gets it in front, as a prefix-stripping proxy took it off.
    """
    import logging

    import uvicorn

    from ..serve import uvicorn_options

    # The multipart parser logs each malformed body it meets as a WARNING line with no request in it:
    # any client could fill the log. The client gets that reason in its 400 (`invalid_multipart`),
    # and the rejection is counted in the metrics.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    options = {**uvicorn_options(app.state.clipengine.settings), "timeout_graceful_shutdown": int(graceful_s)}
    uvicorn.run(app, host=host, port=port, log_level=log_level, root_path=root_path, **options)


# What a --root-path may hold: uvicorn writes it into each request's raw path as ASCII (anything
# else failed every request), and it is the decoded path, so no '%' escapes; '?' and '#' end a path.
_ROOT_PATH_CHARS = frozenset(string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/")


def _check_root_path(root_path: str) -> str:
    """--root-path as uvicorn wants it: "" for none, else "/" and segments, with no trailing slash.

    Why: a value without the leading slash made the URLs /docs and thumbnail_url give relative
    ("clip/openapi.json": under /clip/docs, /clip/clip/openapi.json); a non-ASCII one made uvicorn
    refuse every request (400); a trailing slash is dropped, as FastAPI drops it.
    """
    stripped = root_path.rstrip("/")
    if not stripped:
        return ""
    problem = None
    if not stripped.startswith("/"):
        problem = "it must start with '/', e.g. /clip"
    elif bad := sorted(set(stripped) - _ROOT_PATH_CHARS):
        problem = f"{''.join(bad)!r} cannot be in it: give the path as the proxy sends it, e.g. /clip"
    elif any(part in ("", ".", "..") for part in stripped[1:].split("/")):
        problem = "it has an empty, '.' or '..' segment"
    if problem:
        raise typer.BadParameter(f"{root_path!r}: {problem}", param_hint="--root-path")
    return stripped


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def register(app: typer.Typer) -> None:
    """Add the `serve` command to the root app."""

    @app.command("serve")
    def serve(
        model: str | None = typer.Option(
            None, "--model", "-m", help="Model name (e.g. ViT-B-32), or the architecture of --checkpoint."
        ),
        pretrained: str | None = typer.Option(
            None, "--pretrained", help="Pretrained weights tag, e.g. openai."
        ),
        checkpoint: Path | None = _CHECKPOINT_OPT,
        engine: Path | None = _ENGINE_OPT,
        backend: str = typer.Option(
            "torch", "--backend", help="torch, onnx or openvino (onnx / openvino: an export folder)."
        ),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1 ..."),
        precision: str = typer.Option(
            "fp32", "--precision", help="fp32, fp16, bf16, int8, int8w (onnx/openvino) or fp8 (torch, FP8 GPUs); backend dependent."
        ),
        download: bool = typer.Option(
            False, "--download", help="Allow downloading weights that are not cached."
        ),
        index_path: Path | None = _INDEX_OPT,
        host: str = typer.Option(
            "127.0.0.1", "--host", help="Address to bind; keep 127.0.0.1 unless --api-key is set."
        ),
        port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to bind."),
        max_batch: int = typer.Option(32, "--max-batch", min=1, help="Most items per backend call."),
        max_wait_ms: float = typer.Option(
            5.0, "--max-wait-ms", min=0, help="How long a request waits for batch company."
        ),
        max_queue: int = typer.Option(256, "--max-queue", min=1, help="Items waiting per queue before 429."),
        max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", min=0.001, help="Largest request body."),
        max_pixels: int = typer.Option(
            40_000_000, "--max-pixels", min=1, help="Largest image (width x height)."
        ),
        max_texts: int = typer.Option(256, "--max-texts", min=1, help="Most texts or labels per request."),
        request_timeout: float = typer.Option(
            30.0,
            "--request-timeout",
            min=0.001,
            help="Seconds before a 504; also before a 408 for a body that stops arriving or trickles "
            "(under 500 bytes/s), and before a client that reads none of its answer is cut off.",
        ),
        api_key: str | None = typer.Option(
            None,
            "--api-key",
            envvar="CLIPENGINE_API_KEY",
            help="Require this key (Bearer or X-API-Key).",
            show_default=False,
        ),
        max_connections: int = typer.Option(
            1000,
            "--max-connections",
            min=1,
            help="Most open connections; one over it is answered 503 (too_many_connections) and closed.",
        ),
        root_path: str = typer.Option(
            "",
            "--root-path",
            help="The path a reverse proxy serves this under and strips (e.g. /clip for nginx's "
            "location /clip/ { proxy_pass http://127.0.0.1:8000/; }): /docs, the OpenAPI servers "
            "and thumbnail_url then name it.",
            show_default=False,
        ),
        log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
    ) -> None:
        """Serve embeddings, zero-shot classification and image search over HTTP, with a web page at /."""
        from ..serve import ServeSettings, create_app

        if backend not in BACKEND_CHOICES:
            raise typer.BadParameter(f"--backend must be one of {', '.join(BACKEND_CHOICES)}, got {backend!r}")
        if precision not in ANY_BACKEND_PRECISIONS:
            raise typer.BadParameter(f"--precision must be one of {', '.join(ANY_BACKEND_PRECISIONS)}, got {precision!r}")
        if log_level.lower() not in LOG_LEVELS:  # uvicorn's KeyError traceback, after the model load
            raise typer.BadParameter(
                f"{log_level!r}: use one of {', '.join(LOG_LEVELS)}", param_hint="--log-level"
            )
        _check_sources(model, checkpoint, engine)
        _check_limits(max_upload_mb, max_wait_ms, request_timeout, api_key)
        root_path = _check_root_path(root_path)
        if port:  # 0: the OS picks a free one
            _check_bindable(host, port)
        settings = ServeSettings(
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
            max_upload_bytes=int(max_upload_mb * 1024 * 1024),
            max_pixels=max_pixels,
            max_texts=max_texts,
            request_timeout_s=request_timeout,
            max_connections=max_connections,
            api_key=api_key or None,
        )
        index = _load_index(index_path) if index_path is not None else None
        if index is not None and index_path is not None:
            _check_index_model_files(index, index_path, model, checkpoint, engine)
        clip = _load_model(model, pretrained, checkpoint, engine, backend, device, precision, download, index)
        web_app = create_app(clip, index, settings)
        if not _is_loopback(host) and settings.api_key is None:
            typer.echo(
                f"warning: serving on {host} without --api-key: anyone who can reach it can use it", err=True
            )
        fd_warning = _fit_fd_limit(max_connections)
        if fd_warning:
            typer.echo(fd_warning, err=True)
        from ..report import fidelity_line

        note = fidelity_line(web_app.state.clipengine.fidelity)  # a lower precision's deviation (/v1/info too)
        if note:
            typer.echo(note, err=True)
        where = f"{len(index)} images" if index is not None else "none"
        docs = f"{root_path}/docs through the proxy" if root_path else "/docs"  # its page fetches from there
        typer.echo(f"serving {clip.name} on http://{host}:{port}  (index: {where}; docs: {docs})")
        _run_server(web_app, host, port, log_level, settings.drain_timeout_s, root_path)
