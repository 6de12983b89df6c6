"""HTTP service: FastAPI app with dynamic micro-batching, limits, metrics and a web page."""

from __future__ import annotations

from .app import create_app
from .protocol import uvicorn_options
from .settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "uvicorn_options"]
