"""Limits and batching knobs of the HTTP service, in one frozen dataclass."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ServeSettings"]


@dataclass(frozen=True)
class ServeSettings:
    """Everything `create_app` can be tuned with; the CLI maps its options onto these fields."""

    max_batch: int = 32  # most items one backend call receives
    max_wait_ms: float = 5.0  # how long the first queued item waits for company
    max_queue: int = 256  # items waiting per queue (image, text) before 429
    max_upload_bytes: int = 20 * 1024 * 1024  # whole request body
    max_pixels: int = 40_000_000  # width * height of one decoded image
    max_images: int = 16  # images per request
    max_texts: int = 256  # texts (or labels) per request
    max_text_chars: int = 1000  # characters per text, label or template
    max_templates: int = 32  # templates per classify request
    max_k: int = 100  # most search results
    request_timeout_s: float = 30.0  # inference routes answer 504 after this
    drain_timeout_s: float = 30.0  # shutdown waits this long for in-flight requests
    head_timeout_s: float = 10.0  # request line + headers must arrive within this (408, then closed)
    max_head_bytes: int = 64 * 1024  # request line + headers (431 above; 400 with uvicorn's h11 parser)
    min_upload_rate: float = 500.0  # bytes/s a body must average past its first request_timeout_s (408)
    max_connections: int = 1000  # open connections; one over it gets a 503 (or closes within 1 s if idle)
    retry_after_s: int = 1  # Retry-After on 429/503
    preprocess_threads: int = 4  # thread pool for decode + preprocess
    thumbnail_size: int = 256  # longest side of a thumbnail, pixels
    label_cache_size: int = 1024  # label/template embeddings kept between classify requests
    api_key: str | None = None  # when set, every route needs it but /, /static, /healthz, /readyz, /docs, /redoc, /openapi.json

    def __post_init__(self) -> None:
        for name in (
            "max_batch",
            "max_queue",
            "max_upload_bytes",
            "max_pixels",
            "max_images",
            "max_texts",
            "max_text_chars",
            "max_templates",
            "max_k",
            "preprocess_threads",
            "thumbnail_size",
            "max_head_bytes",
            "max_connections",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ServeSettings.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_wait_ms < 0 or self.request_timeout_s <= 0 or self.drain_timeout_s < 0:
            raise ValueError("max_wait_ms and drain_timeout_s must be >= 0, request_timeout_s > 0")
        if self.head_timeout_s <= 0 or self.min_upload_rate <= 0:
            raise ValueError("head_timeout_s and min_upload_rate must be > 0")
        # NaN passes the comparisons above; with an infinite max_wait_ms a batch can wait forever.
        for name in (
            "max_wait_ms",
            "request_timeout_s",
            "drain_timeout_s",
            "head_timeout_s",
            "min_upload_rate",
        ):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"ServeSettings.{name} must be a finite number, got {getattr(self, name)!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty; pass None to disable authentication")
