"""Reading request inputs: images from multipart or base64 JSON, with size, pixel and format checks."""

from __future__ import annotations

import base64
import binascii
import heapq
import io
import re
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from ..image.decode import EMPTY_FILE, EXTERNAL_DECODERS, MAX_JPEG_SCANS, _quiet_pil, jpeg_scan_count
from .http_errors import ApiError

__all__ = [
    "NamedImage",
    "check_image_header",
    "decode_base64_image",
    "parse_json_body",
    "read_form",
    "split_fields",
    "uploads_to_images",
]


@dataclass(frozen=True)
class NamedImage:
    """Encoded image bytes and the name the client gave them (file name, or `images[i]`)."""

    name: str
    data: bytes


def decode_base64_image(value: str, name: str) -> NamedImage:
    """Decode a base64 string (a `data:image/...;base64,` URL prefix is allowed) -> NamedImage."""
    payload = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(422, "invalid_base64", f"{name}: not valid base64 ({e})") from e
    return NamedImage(name, data)


_BOMB_SIZE = re.compile(r"Image size \((\d+) pixels\)")  # in Pillow's DecompressionBomb messages


def check_image_header(image: NamedImage, max_pixels: int) -> None:
    """Refuse empty, unreadable and oversized images from their header alone (no pixels decoded).

    Raises:
        ApiError: 400 `invalid_image` for empty or unidentifiable bytes, 413 `image_too_large` when
            width * height exceeds `max_pixels` (decompression bombs included).
    """
    if not image.data:
        raise ApiError(400, "invalid_image", f"{image.name}: {EMPTY_FILE}")
    try:
        # Quiet as the decoder is: Pillow's "Corrupt EXIF data" UserWarning from the JPEG header must
        # not fail the request under -W error (the pixels are fine); bombs are judged by size below.
        with _quiet_pil(), Image.open(io.BytesIO(image.data)) as probe:
            width, height, kind = *probe.size, probe.format
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own guard fired first (the warning arrives as an exception when warnings are
        # errors). Its message quotes Pillow's limit, not the one this server enforces: say ours.
        size = _BOMB_SIZE.search(str(e))
        pixels = f"{size[1]} pixels" if size else "more pixels than that"
        raise ApiError(413, "image_too_large", f"{image.name}: {pixels} exceeds the limit of {max_pixels}") from e
    except UnidentifiedImageError as e:  # its message is Pillow's repr of our BytesIO: say it plainly
        raise ApiError(400, "invalid_image", f"{image.name}: not a readable image (unrecognised format)") from e
    except (OSError, SyntaxError, ValueError) as e:
        # Pillow raises these for bytes that are not an image it can read.
        raise ApiError(400, "invalid_image", f"{image.name}: not a readable image ({e})") from e
    if kind in EXTERNAL_DECODERS:  # refused by the decoder too; said here before the upload queues
        why = EXTERNAL_DECODERS[kind]
        raise ApiError(400, "invalid_image", f"{image.name}: {kind} images are not accepted ({why})")
    if kind in ("JPEG", "MPO"):
        _check_jpeg_scans(image)
    if width * height > max_pixels:
        raise ApiError(
            413,
            "image_too_large",
            f"{image.name}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}",
        )


def _check_jpeg_scans(image: NamedImage) -> None:
    """Refuse a JPEG with more scans than any encoder writes, before it reaches the decoder.

    Why: libjpeg makes a pass over every block of the image for each scan, even one that holds no
    data (14 bytes): 10,000 of them in a 6000x6000 JPEG of 350 KB took 60 s to decode, and a decode
    thread cannot be stopped. Markers inside metadata (an EXIF thumbnail) count too: an upper bound.
    """
    scans = jpeg_scan_count(image.data)
    if scans > MAX_JPEG_SCANS:
        raise ApiError(
            400,
            "invalid_image",
            f"{image.name}: a JPEG of {scans} scans, at most {MAX_JPEG_SCANS} accepted (each scan is a "
            "pass over every block: such files take minutes to decode)",
        )


@asynccontextmanager
async def read_form(request: Request, max_files: int) -> AsyncIterator[Any]:
    """`async with read_form(...) as form`: parse a multipart/urlencoded body, closing its files after.

    The upload size limit applies while the body streams in (BodyLimitMiddleware).

    Raises:
        ApiError: 400 `invalid_multipart` for a multipart body that is malformed, has no boundary, or
            ends before its closing boundary (a cut-off upload); 422 `too_many_images`.
    """
    try:
        form = await _parse_form(request, max_files)
    except ApiError:  # the upload size limit, raised while the body streamed in
        raise
    except (StarletteHTTPException, MultiPartException) as e:  # urlencoded, multipart problems
        detail = str(e.detail) if isinstance(e, StarletteHTTPException) else e.message
        if "too many files" in detail.lower():
            raise ApiError(422, "too_many_images", f"more than {max_files} images in one request") from e
        raise ApiError(400, "invalid_multipart", _multipart_problem(detail, e.__cause__)) from e
    try:
        yield form
    finally:
        await form.close()


_MISSING_BOUNDARY = (
    "the Content-Type multipart/form-data has no boundary parameter: let the HTTP client write the "
    "header (curl -F, requests' files=, a browser's FormData) rather than setting it by hand"
)


def _multipart_problem(detail: str, cause: BaseException | None) -> str:
    """Starlette's terse multipart message -> one that says what is wrong with the body and how to fix it."""
    if detail == "Missing boundary in multipart.":
        return _MISSING_BOUNDARY
    if detail == "Invalid multipart data.":  # python-multipart's parse error is the cause
        why = f" ({cause})" if cause is not None else ""
        return (
            f"malformed multipart body{why}: its parts must be delimited by '--' and the boundary "
            "named in the Content-Type header"
        )
    return detail


async def _parse_form(request: Request, max_files: int) -> FormData:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "multipart/form-data":
        return await request.form(max_files=max_files, max_fields=1000)
    async with aclosing(request.stream()) as stream:  # as Starlette's request.form() reads it
        parser = _WholeMultiPartParser(request.headers, stream, max_files=max_files, max_fields=1000)
        return await parser.parse()


def _incomplete(received: int) -> str:
    if not received:
        return "empty multipart body: a multipart/form-data body holds at least its closing boundary"
    return (
        f"incomplete multipart body: it ended after {received} bytes, before its closing boundary; "
        "the upload was cut off (send the whole body)"
    )


class _WholeMultiPartParser(MultiPartParser):
    """Starlette's multipart parser, which also refuses a body that ends before its closing boundary.

    Why: python-multipart's `finalize()` does not check that the parser reached the end, so a body
    cut off mid-upload parsed as a shorter form (a part dropped, or none at all): the client was told
    a field was missing ("no image given") instead of that its upload was incomplete.
    """

    def __init__(self, headers: Headers, stream: AsyncIterator[bytes], **limits: Any) -> None:
        super().__init__(headers, self._checked(stream), **limits)
        self.complete = False
        self.received = 0

    def on_end(self) -> None:  # python-multipart calls it at the closing boundary, only there
        self.complete = True

    async def _checked(self, stream: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
        """The body's chunks; at its end, an error if the parser has not met the closing boundary.

        Raised from inside the stream so that the parser closes the files of the parts it began.
        """
        async for chunk in stream:
            self.received += len(chunk)
            yield chunk
        if not self.complete:
            raise MultiPartException(_incomplete(self.received))


async def uploads_to_images(values: list[Any], field: str) -> list[NamedImage]:
    """Turn multipart `UploadFile`s into NamedImages; a plain text value where a file belongs is a 422."""
    images = []
    for i, value in enumerate(values):
        if not isinstance(value, UploadFile):
            raise ApiError(422, "invalid_request", f"{field}[{i}]: expected a file upload, got a text field")
        images.append(NamedImage(value.filename or f"{field}[{i}]", await value.read()))
    return images


def split_fields(values: list[Any], field: str, sep: str) -> list[str]:
    """Text form fields -> items: each value is split on `sep`, stripped, empty items dropped."""
    items: list[str] = []
    for value in values:
        if not isinstance(value, str):
            raise ApiError(422, "invalid_request", f"{field}: expected text, got a file upload")
        items += [part.strip() for part in value.split(sep) if part.strip()]
    return items


async def parse_json_body(
    request: Request, model: type[BaseModel], max_items: Mapping[str, tuple[int, str]] | None = None
) -> Any:
    """Read a JSON body and validate it against `model`, reporting problems as 422s.

    Args:
        max_items: per list field, (most items, error code): longer lists are refused before validation.
    """
    try:
        payload = await request.json()
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError
        raise ApiError(422, "invalid_json", f"request body is not valid JSON ({e})") from e
    except RecursionError as e:  # "[[[[...": nested deeper than the JSON decoder can recurse
        raise ApiError(422, "invalid_json", "request body is not valid JSON (nested too deeply)") from e
    if isinstance(payload, dict):
        _check_fields(payload, model, max_items or {})
    try:
        return model.model_validate(payload)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from e


def _check_fields(
    payload: dict[str, Any], model: type[BaseModel], max_items: Mapping[str, tuple[int, str]]
) -> None:
    """Refuse unknown fields and over-long lists before pydantic sees them.

    Why: pydantic validates every key and list item before any length limit, with one error each: a
    16 MB body of 4 million numbers held the event loop (every route, /healthz too) for 46 s.
    """
    unknown = payload.keys() - model.model_fields.keys()
    if unknown:
        shown = ", ".join(repr(name) for name in heapq.nsmallest(5, unknown))
        more = f", ...] ({len(unknown)} in all)" if len(unknown) > 5 else "]"
        expected = sorted(model.model_fields)
        raise ApiError(422, "invalid_request", f"unknown field(s) [{shown}{more}; expected {expected}")
    for field, (limit, code) in max_items.items():
        items = payload.get(field)
        if isinstance(items, list) and len(items) > limit:
            raise ApiError(422, code, f"{field}: {len(items)} items, at most {limit} allowed")
