"""The one JSON error shape of the API, `{"error": {"code", "message"}}`, and its exception handlers."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..errors import ClipEngineError, DecodeError, InputError, TextTooLongError
from .batcher import BatcherClosedError, QueueFullError

__all__ = ["ApiError", "error_body", "error_response", "install_error_handlers"]

log = logging.getLogger(__name__)

_CODES_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "queue_full",
    503: "unavailable",
    504: "timeout",
}


class ApiError(HTTPException):
    """An error the client caused or must know about; rendered as `{"error": {"code", "message"}}`.

    Subclasses FastAPI's HTTPException so that FastAPI re-raises it untouched when it happens while
    the body is being read (the upload size limit fires there).
    """

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code
        self.message = message


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    """Map every exception a request can raise onto the JSON error shape (never a bare 500 for bad input)."""
    retry = {"Retry-After": str(retry_after_s)}

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status_code, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _CODES_BY_STATUS.get(exc.status_code, "error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", _describe_validation(exc))

    @app.exception_handler(DecodeError)
    async def _decode_error(request: Request, exc: DecodeError) -> JSONResponse:
        return error_response(400, "invalid_image", str(exc))

    @app.exception_handler(TextTooLongError)
    async def _text_error(request: Request, exc: TextTooLongError) -> JSONResponse:
        return error_response(422, "text_too_long", str(exc))

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError) -> JSONResponse:
        # Arguments the model cannot take come from the request (its texts, labels, templates): the
        # request validation should have caught them, but they are still the client's to fix.
        return error_response(422, "invalid_input", str(exc))

    @app.exception_handler(QueueFullError)
    async def _queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
        return error_response(429, "queue_full", f"{exc}; retry later", retry)

    @app.exception_handler(BatcherClosedError)
    async def _closed(request: Request, exc: BatcherClosedError) -> JSONResponse:
        return error_response(503, "shutting_down", f"{exc}; the server is stopping", retry)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # The client hung up while its body streamed in: nobody reads this answer (the server drops
        # it), but the metrics count it as 499 (nginx's "client closed request"), not as a 500 with
        # a traceback in the log for something the server did not get wrong.
        log.info("client disconnected before sending the whole body of %s", request.url.path)
        return error_response(499, "client_disconnected", "the client closed the connection mid-request")

    @app.exception_handler(ClipEngineError)
    async def _engine_error(request: Request, exc: ClipEngineError) -> JSONResponse:
        log.error("backend failure on %s: %s", request.url.path, exc)
        return error_response(500, "backend_error", str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path, exc_info=exc)
        return error_response(500, "internal_error", "internal server error; see the server log")
