"""The FastAPI application: routes, lifespan (start batchers, drain on shutdown) and middleware stack."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles

from .engine import SearchableIndex, ServableModel, check_index
from .handlers import ApiHandlers
from .http_errors import install_error_handlers
from .metrics import CONTENT_TYPE
from .middleware import ApiKeyMiddleware, BodyLimitMiddleware, TrackingMiddleware
from .schemas import (
    ClassifyRequest,
    ClassifyResponse,
    EmbeddingsResponse,
    ErrorResponse,
    ImagesRequest,
    InfoResponse,
    SearchRequest,
    SearchResponse,
    TextsRequest,
)
from .settings import ServeSettings

__all__ = ["create_app"]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
API_PREFIX = "/v1/"
PUBLIC_PATHS = ("/", "/healthz", "/readyz", "/favicon.ico")

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 408, 413, 415, 422, 429, 503, 504)
}


def _body_doc(json_model: type[Any], multipart: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI requestBody for routes that take JSON or multipart (parsed by hand in the route)."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": json_model.model_json_schema()},
                "multipart/form-data": {"schema": {"type": "object", "properties": multipart}},
            },
        }
    }


_FILES = {"type": "array", "items": {"type": "string", "format": "binary"}}

_Endpoint = TypeVar("_Endpoint", bound=Callable[..., Any])


def create_app(
    model: ServableModel, index: SearchableIndex | None = None, settings: ServeSettings | None = None
) -> FastAPI:
    """Build the HTTP app around a loaded model (and optionally an index of image embeddings).

    Args:
        model: a `clipengine.api.ClipModel` (or anything with the same encode/preprocess surface).
        index: a `clipengine.index.Index` built with the same model; enables /v1/search and thumbnails.
        settings: limits and batching knobs; defaults are safe for a single-user local server.

    Raises:
        IndexMismatchError: the index was built with another model or embedding size.

    Example:
        >>> settings = ServeSettings()
        >>> app = create_app(clipengine.load("ViT-B-32", pretrained="openai"), None, settings)
        >>> uvicorn.run(app, host="127.0.0.1", port=8000, **uvicorn_options(settings))  # head limits
    """
    settings = settings or ServeSettings()
    if index is not None:
        check_index(model, index)
    state = ApiHandlers(model, index, settings)
    app = FastAPI(
        title="clipengine",
        summary="CLIP embeddings, zero-shot classification and image search over HTTP.",
        version="1",
        lifespan=state.lifespan,
    )
    app.state.clipengine = state
    if settings.api_key is not None:
        _document_api_key(app)
    install_error_handlers(app, settings.retry_after_s)
    _add_routes(app, state)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # Added innermost first: the body limit sits inside the key check, tracking wraps everything.
    app.add_middleware(
        BodyLimitMiddleware,
        limit=settings.max_upload_bytes,
        idle_s=settings.request_timeout_s,
        min_rate=settings.min_upload_rate,
    )
    # The schema and its docs pages are public like the page: a browser opening /docs cannot send the
    # key (it was a 401), the schema holds no secret, and Swagger UI's "Authorize" then takes the key.
    docs_paths = (app.openapi_url, app.docs_url, app.swagger_ui_oauth2_redirect_url, app.redoc_url)
    public = (*PUBLIC_PATHS, *(path for path in docs_paths if path))
    app.add_middleware(
        ApiKeyMiddleware, api_key=settings.api_key, public=public, public_prefixes=("/static/",)
    )
    app.add_middleware(
        TrackingMiddleware,
        metrics=state.metrics,
        tracker=state.tracker,
        retry_after_s=settings.retry_after_s,
        api_prefix=API_PREFIX,
    )
    return app


def _document_api_key(app: FastAPI) -> None:
    """Declare the two accepted key headers in the OpenAPI schema, on every non-public route."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes["bearer"] = {"type": "http", "scheme": "bearer"}
        schemes["apiKey"] = {"type": "apiKey", "in": "header", "name": "X-API-Key"}
        for path, operations in schema.get("paths", {}).items():
            if path not in PUBLIC_PATHS:
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}, {"apiKey": []}]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _get(app: FastAPI, path: str, **kwargs: Any) -> Callable[[_Endpoint], _Endpoint]:
    """`app.get` that answers HEAD too, as HTTP requires: same handler, status and headers.

    Starlette adds HEAD to its own GET routes, FastAPI's routes answer only the methods they name
    (HEAD was a 405). The HEAD twin stays out of the OpenAPI schema: one operation per path, and
    no duplicate operation ids. The server (uvicorn) sends no body in reply to HEAD.
    """

    def register(endpoint: _Endpoint) -> _Endpoint:
        app.head(path, **{**kwargs, "include_in_schema": False})(endpoint)
        return app.get(path, **kwargs)(endpoint)

    return register


def _add_routes(app: FastAPI, s: ApiHandlers) -> None:
    multipart_images = {"files": _FILES}

    @_get(app, "/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @_get(app, "/healthz", tags=["ops"], summary="Liveness: the process answers.")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @_get(
        app, "/readyz", tags=["ops"], summary="Readiness: model loaded and batchers running (503 otherwise)."
    )
    async def readyz() -> JSONResponse:
        return s.readiness()

    @_get(app, "/metrics", tags=["ops"], summary="Prometheus metrics.", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(s.metrics.render(), media_type=CONTENT_TYPE)

    @_get(app, "/v1/info", tags=["v1"], response_model=InfoResponse, summary="Model, index and limits.")
    async def info() -> dict[str, Any]:
        return s.info()

    @app.post(
        "/v1/embeddings/images",
        tags=["v1"],
        response_model=EmbeddingsResponse,
        responses=_ERRORS,
        summary="Embed images (multipart files or base64 JSON).",
        openapi_extra=_body_doc(ImagesRequest, multipart_images),
    )
    async def embed_images(request: Request) -> JSONResponse:
        return await s.embed_images(request)

    @app.post(
        "/v1/embeddings/texts",
        tags=["v1"],
        response_model=EmbeddingsResponse,
        responses=_ERRORS,
        summary="Embed texts.",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": TextsRequest.model_json_schema()}},
            }
        },
    )
    async def embed_texts(request: Request) -> JSONResponse:
        return await s.embed_texts(request)

    @app.post(
        "/v1/classify",
        tags=["v1"],
        response_model=ClassifyResponse,
        responses=_ERRORS,
        summary="Zero-shot classification: labels sorted by probability, per image.",
        openapi_extra=_body_doc(
            ClassifyRequest,
            {
                **multipart_images,
                "labels": {"type": "string", "description": "Comma-separated labels (field may repeat)."},
                "templates": {
                    "type": "string",
                    "description": "Templates with '{}', one per line (optional).",
                },
                "top_k": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "Only the top_k most probable labels per image (optional; default: "
                    "all). Probabilities stay the softmax over all the labels.",
                },
            },
        ),
    )
    async def classify(request: Request) -> JSONResponse:
        return await s.classify(request)

    @app.post(
        "/v1/search",
        tags=["v1"],
        response_model=SearchResponse,
        responses={**_ERRORS, 404: {"model": ErrorResponse}},
        summary="Top-k index images for a text or image query.",
        openapi_extra=_body_doc(
            SearchRequest,
            {
                "text": {"type": "string"},
                "files": _FILES,
                "k": {"type": "integer", "default": 10},
            },
        ),
    )
    async def search(request: Request) -> JSONResponse:
        return await s.search(request)

    @_get(
        app,
        "/v1/thumbnails/{image_id:path}",
        tags=["v1"],
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, 404: {"model": ErrorResponse}},
        summary="JPEG thumbnail of an index image.",
    )
    async def thumbnail(image_id: str) -> Response:
        return await s.thumbnail(image_id)

    @_get(app, "/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)
