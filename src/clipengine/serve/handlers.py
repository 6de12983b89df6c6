"""Route handlers and lifecycle of one app instance: parse inputs, check limits, call the service."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Collection, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.requests import ClientDisconnect

from ..report import fidelity
from .engine import InferenceService, SearchableIndex, ServableModel
from .http_errors import ApiError
from .inputs import (
    NamedImage,
    decode_base64_image,
    parse_json_body,
    read_form,
    split_fields,
    uploads_to_images,
)
from .metrics import STATE_KEY, ServeMetrics
from .middleware import RequestTracker
from .schemas import ClassifyRequest, ImagesRequest, SearchRequest, TextsRequest
from .settings import ServeSettings
from .thumbnails import image_roots, make_thumbnail, resolve_image

__all__ = ["ApiHandlers"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class ApiHandlers:
    """Route handlers bound to one model, index and settings (one instance per create_app call)."""

    def __init__(self, model: ServableModel, index: SearchableIndex | None, settings: ServeSettings) -> None:
        self.model = model
        self.index = index
        self.settings = settings
        self.metrics = ServeMetrics()
        self.tracker = RequestTracker(self.metrics)
        self.service = InferenceService(
            model, settings, self.metrics, in_flight=lambda: self.tracker.in_flight
        )
        self.roots = image_roots(index.image_roots) if index is not None else []
        # (most items, error code) of the JSON list fields, checked before their items are validated
        self.image_limit = (settings.max_images, "too_many_images")
        self.text_limit = (settings.max_texts, "too_many_texts")
        self.ready = False
        backend = getattr(model, "backend", None)  # a ClipModel's; a bare ServableModel states none
        self.fidelity = fidelity(backend) if backend is not None else None

    # ---- helpers -------------------------------------------------------------------------------
    async def timed(self, work: Coroutine[Any, Any, T], request: Request) -> T:
        """Await `work` until it ends, the request timeout passes (504) or the client hangs up.

        A client that disconnects cancels its work: its items leave the batch queues at once instead
        of being computed for nobody while they crowd other clients out (429 queue_full).
        """
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait(
                {task, gone}, timeout=self.settings.request_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if task.done():
                return task.result()
            if gone.done():
                raise ClientDisconnect()
            raise ApiError(
                504, "timeout", f"the request took longer than {self.settings.request_timeout_s:g} s"
            )
        finally:
            for pending in (task, gone):
                pending.cancel()
            # Let the cancelled work unwind (the batcher drops its queued items) before answering.
            await asyncio.gather(task, gone, return_exceptions=True)

    def check_texts(self, texts: Sequence[str], field: str, limit: int) -> None:
        if len(texts) > limit:
            raise ApiError(422, "too_many_texts", f"{field}: {len(texts)} items, at most {limit} allowed")
        for i, text in enumerate(texts):
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as e:  # a lone surrogate: a valid JSON escape, not Unicode text
                    raise ApiError(
                        422, "invalid_request", f"{field}[{i}]: not valid Unicode text ({e.reason})"
                    ) from e
            if len(text) > self.settings.max_text_chars:
                raise ApiError(
                    422,
                    "text_too_long",
                    f"{field}[{i}]: {len(text)} characters, at most {self.settings.max_text_chars} allowed",
                )

    def check_prompts(self, labels: Sequence[str], templates: Sequence[str]) -> None:
        """Each prompt (a template, every '{}' filled with a label) is a text: at most max_text_chars.

        Why: each '{}' takes the whole label, so a template that repeats it multiplied the limits on
        labels and templates (500 of them made a 1000-character label a prompt of 500,000).
        Measured without building the prompts.
        """
        longest = max(range(len(labels)), key=lambda i: len(labels[i]))
        for i, template in enumerate(templates):
            slots = template.count("{}")
            length = len(template) - 2 * slots + slots * len(labels[longest])
            if length > self.settings.max_text_chars:
                raise ApiError(
                    422,
                    "text_too_long",
                    f"templates[{i}] with labels[{longest}]: the prompt is {length} characters, "
                    f"at most {self.settings.max_text_chars} allowed",
                )

    def check_images(self, images: Sequence[NamedImage]) -> None:
        if not images:
            raise ApiError(422, "invalid_request", "no image given: send file parts or base64 'images'")
        if len(images) > self.settings.max_images:
            raise ApiError(
                422,
                "too_many_images",
                f"{len(images)} images, at most {self.settings.max_images} per request",
            )

    async def read_images_and_fields(
        self, request: Request, text_fields: Collection[str] = ()
    ) -> tuple[list[NamedImage], dict[str, list[Any]]]:
        """Multipart body -> (file parts as images, the other fields by name).

        A file part named like one of the route's `text_fields` is refused: it is not an image, and
        taken as one it gave a message about something else ("give at least one label", or the
        bytes of `-F text=@query.txt` read as an image).
        """
        ctype = request.headers.get("content-type", "")
        # Media types are case-insensitive (RFC 9110), and Starlette's form parser reads them so.
        if not ctype.lower().startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            raise ApiError(
                415,
                "unsupported_media_type",
                f"content type {ctype or '(none)'!r}: send application/json or multipart/form-data",
            )
        async with read_form(request, self.settings.max_images) as form:  # closes the spooled files
            files: list[Any] = []
            fields: dict[str, list[Any]] = {}
            for key, value in form.multi_items():
                if isinstance(value, str) and key == "files":  # a part without a filename
                    raise ApiError(
                        422,
                        "invalid_request",
                        "files: expected a file upload (a part with a filename), got a text field",
                    )
                if isinstance(value, str):
                    fields.setdefault(key, []).append(value)
                elif key in text_fields:
                    raise ApiError(422, "invalid_request", f"{key}: expected a text field, got a file upload")
                else:
                    files.append(value)
            return await uploads_to_images(files, "files"), fields

    @staticmethod
    def is_json(request: Request) -> bool:
        return request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"

    @staticmethod
    def reject_unknown(fields: dict[str, list[Any]], allowed: set[str]) -> None:
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise ApiError(
                422, "invalid_request", f"unknown form field(s) {unknown}; expected {sorted(allowed)}"
            )

    # ---- routes --------------------------------------------------------------------------------
    async def embed_images(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        if self.is_json(request):
            body = await parse_json_body(request, ImagesRequest, {"images": self.image_limit})
            images = [decode_base64_image(s, f"images[{i}]") for i, s in enumerate(body.images)]
        else:
            images, fields = await self.read_images_and_fields(request)
            self.reject_unknown(fields, set())
        self.check_images(images)
        vectors = await self.timed(self.service.embed_images(images), request)
        data = [
            {"index": i, "name": img.name, "embedding": v.tolist()}
            for i, (img, v) in enumerate(zip(images, vectors, strict=True))
        ]
        return self._embeddings(data, started)

    async def embed_texts(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        if not self.is_json(request):
            ctype = request.headers.get("content-type", "")
            raise ApiError(
                415, "unsupported_media_type", f"content type {ctype or '(none)'!r}: send application/json"
            )
        body: TextsRequest = await parse_json_body(request, TextsRequest, {"texts": self.text_limit})
        self.check_texts(body.texts, "texts", self.settings.max_texts)
        vectors = await self.timed(self.service.embed_texts(body.texts), request)
        return self._embeddings(
            [{"index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)], started
        )

    def _embeddings(self, data: list[dict[str, Any]], started: float) -> JSONResponse:
        return JSONResponse(
            {
                "model": self.model.name,
                "dim": int(self.model.embed_dim),
                "data": data,
                "elapsed_ms": _ms(started),
            }
        )

    async def classify(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        if self.is_json(request):
            limits = {
                "images": self.image_limit,
                "labels": self.text_limit,
                "templates": (self.settings.max_templates, "too_many_texts"),
            }
            body = await parse_json_body(request, ClassifyRequest, limits)
            images = [decode_base64_image(s, f"images[{i}]") for i, s in enumerate(body.images)]
            labels, templates, top_k = [s.strip() for s in body.labels], body.templates, body.top_k
        else:
            images, fields = await self.read_images_and_fields(request, {"labels", "templates", "top_k"})
            self.reject_unknown(fields, {"labels", "templates", "top_k"})
            labels = split_fields(fields.get("labels", []), "labels", ",")
            templates = split_fields(fields.get("templates", []), "templates", "\n") or None
            top_k = _parse_top_k(fields.get("top_k", []))
        self.check_images(images)
        if not labels or any(not label for label in labels):
            raise ApiError(422, "invalid_request", "labels: give at least one non-empty label")
        if len(set(labels)) != len(labels):
            raise ApiError(422, "invalid_request", "labels: each label must appear once")
        self.check_texts(labels, "labels", self.settings.max_texts)
        if templates is not None:
            self.check_texts(templates, "templates", self.settings.max_templates)
            bad = [t for t in templates if "{}" not in t]
            if bad or not templates:
                raise ApiError(
                    422, "invalid_request", f"templates: each needs '{{}}' where the label goes: {bad}"
                )
            self.check_prompts(labels, templates)
        ranked = await self.timed(self.service.classify(images, labels, templates, top_k), request)
        results = [
            {"index": i, "name": img.name, "labels": [{"label": lab, "probability": p} for lab, p in row]}
            for i, (img, row) in enumerate(zip(images, ranked, strict=True))
        ]
        return JSONResponse({"model": self.model.name, "results": results, "elapsed_ms": _ms(started)})

    async def search(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        if self.is_json(request):
            body = await parse_json_body(request, SearchRequest)
            text, k = body.text, body.k
            image = decode_base64_image(body.image, "image") if body.image is not None else None
        else:
            images, fields = await self.read_images_and_fields(request, {"text", "k"})
            self.reject_unknown(fields, {"text", "k"})
            if len(images) > 1 or len(fields.get("text", [])) > 1 or len(fields.get("k", [])) > 1:
                raise ApiError(
                    422, "invalid_request", "search takes one query: one 'text' or one image, one 'k'"
                )
            text = fields["text"][0] if fields.get("text") else None
            image = images[0] if images else None
            k = _parse_int(fields.get("k", ["10"])[0], "k")
        index = self.index
        if index is None:
            raise ApiError(404, "no_index", "no index is loaded; start the server with --index PATH")
        if (text is None) == (image is None):
            raise ApiError(422, "invalid_request", "give exactly one query: 'text' or 'image'")
        if not 1 <= k <= self.settings.max_k:
            raise ApiError(422, "invalid_request", f"k: {k} is out of range 1..{self.settings.max_k}")
        if text is not None:
            self.check_texts([text], "text", 1)
            if not text.strip():  # "" would embed as a text and rank every image: a client's mistake
                raise ApiError(422, "invalid_request", "text: the query is empty")

        async def run() -> list[tuple[str, float]]:
            if text is not None:
                query = (await self.service.embed_texts([text]))[0]
            else:
                query = (await self.service.embed_images([image]))[0]  # type: ignore[list-item]
            return await self.service.search(index, query, k)

        hits = await self.timed(run(), request)
        # Under a Mount or uvicorn's --root-path the service's routes start at root_path (as url_for's).
        # Its trailing slash dropped, as FastAPI's /docs drops it ("/clip/" gave "/clip//v1/...").
        thumbnails = f"{request.scope.get('root_path', '').rstrip('/')}/v1/thumbnails/"
        results = [{"id": i, "score": s, "thumbnail_url": thumbnails + quote(i)} for i, s in hits]
        return JSONResponse(
            {"model": self.model.name, "k": k, "results": results, "elapsed_ms": _ms(started)}
        )

    async def thumbnail(self, image_id: str) -> Response:
        listed = self.index is not None and (
            not hasattr(self.index, "__contains__") or image_id in self.index
        )
        path = resolve_image(image_id, self.roots) if listed else None
        if path is None:
            raise ApiError(404, "not_found", f"no image {image_id!r} under the index's image roots")
        try:
            data = await self.service.run_in_pool(
                make_thumbnail, path, self.settings.thumbnail_size, self.settings.max_pixels
            )
        except (
            OSError,
            SyntaxError,
            ValueError,
            Image.DecompressionBombError,
            Image.DecompressionBombWarning,
        ) as e:
            raise ApiError(404, "not_found", f"{image_id!r} is not a readable image ({e})") from e
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    def info(self) -> dict[str, Any]:
        s = self.settings
        index = None
        if self.index is not None:
            index = {"model": self.index.model, "dim": int(self.index.dim), "size": _len_or_none(self.index)}
            kind = getattr(self.index, "kind", None)
            if kind is not None:  # a clipengine Index: approximate ones carry the recall `index build` measured
                index.update(kind=kind, recall=(getattr(self.index, "extra", None) or {}).get("recall"))
        return {
            "model": self.model.name,
            "embed_dim": int(self.model.embed_dim),
            "image_size": int(getattr(self.model, "image_size", 0)),
            "index": index,
            # A lower precision states its deviation from fp32: measured (export parity) or "unmeasured".
            "fidelity": self.fidelity,
            "limits": {
                "max_upload_bytes": s.max_upload_bytes,
                "max_pixels": s.max_pixels,
                "max_images": s.max_images,
                "max_texts": s.max_texts,
                "max_text_chars": s.max_text_chars,
                "max_templates": s.max_templates,
                "max_k": s.max_k,
                "request_timeout_s": s.request_timeout_s,
                "max_batch": s.max_batch,
                "max_wait_ms": s.max_wait_ms,
                "max_queue": s.max_queue,
            },
        }

    def readiness(self) -> JSONResponse:
        if self.tracker.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not self.ready or not (self.service.images.running and self.service.texts.running):
            return JSONResponse({"status": "starting"}, status_code=503)
        return JSONResponse({"status": "ready", "model": self.model.name})

    # ---- lifecycle -----------------------------------------------------------------------------
    async def warm_up(self) -> None:
        """One tiny call per tower so the first real request does not pay for lazy initialisation."""
        # An export folder's engines open on first use: open them all now, so a broken one fails the
        # start, not a request, and a re-export of the folder while serving changes nothing served
        # (the backend refuses to open another export's engines then).
        open_engines = getattr(getattr(self.model, "backend", None), "open_engines", None)
        if callable(open_engines):
            await asyncio.to_thread(open_engines)
        size = int(getattr(self.model, "image_size", 0))
        if size > 0:
            await asyncio.to_thread(self.model.encode_images, np.zeros((1, 3, size, size), np.float32))
        await asyncio.to_thread(self.model.encode_texts, ["warm-up"])

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        """Start the batchers, serve, then drain; the yielded state reaches every connection (STATE_KEY)."""
        self.tracker.draining = False
        self.service.start()
        await self.warm_up()
        self.ready = True
        log.info("serving %s (index: %s)", self.model.name, "yes" if self.index is not None else "no")
        try:
            yield {STATE_KEY: self.metrics}
        finally:
            self.ready = False
            if not await self.tracker.drain(self.settings.drain_timeout_s):
                log.warning(
                    "shutdown: %d request(s) still in flight after %.0f s",
                    self.tracker.in_flight,
                    self.settings.drain_timeout_s,
                )
            await self.service.stop()


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects (the body is read by now: what comes next is the hang-up)."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # a connection that cannot be watched: never report a hang-up
        log.debug("cannot watch %s for a disconnect", request.url.path, exc_info=True)
        await asyncio.Event().wait()


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)


_INT = re.compile(r"[+-]?[0-9]+")


def _parse_int(value: Any, field: str) -> int:
    """A form field -> int: ASCII digits only (int() also took "1_0" and "٥", and echoed 4000 digits)."""
    text = value.strip() if isinstance(value, str) else ""
    shown = value if not isinstance(value, str) or len(value) <= 20 else value[:20] + "..."
    if not _INT.fullmatch(text):
        raise ApiError(422, "invalid_request", f"{field}: {shown!r} is not an integer")
    if len(text) > 18:  # past any limit; int() of over 4300 digits would raise
        raise ApiError(422, "invalid_request", f"{field}: {shown!r} is out of range")
    return int(text)


def _parse_top_k(values: list[Any]) -> int | None:
    """classify's optional form field `top_k` -> None (absent: every label) or an int >= 1."""
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(422, "invalid_request", f"top_k: give it once, got {len(values)} values")
    top_k = _parse_int(values[0], "top_k")
    if top_k < 1:
        raise ApiError(
            422, "invalid_request", f"top_k: {top_k} is not >= 1 (leave top_k out to get every label)"
        )
    return top_k


def _len_or_none(obj: Any) -> int | None:
    try:
        return len(obj)
    except TypeError:
        return None
