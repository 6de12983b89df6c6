"""A small Prometheus registry (counters, histograms, gauges) rendered in the text exposition format."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence

__all__ = [
    "CONNECTION_REJECTIONS",
    "CONTENT_TYPE",
    "STATE_KEY",
    "Counter",
    "Gauge",
    "Histogram",
    "Registry",
    "ServeMetrics",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

LabelValues = tuple[str, ...]

# The app's lifespan yields its ServeMetrics under this key: the ASGI server hands that "state" to every
# connection (uvicorn: the protocol's `app_state`), which is how serve.protocol, built by uvicorn per
# connection and never given the app, counts what it refuses into the metrics of the app it serves.
STATE_KEY = "clipengine.serve.metrics"

# What is refused or dropped before a request is routed: by the connection layer (serve.protocol), or
# by the app's outermost middleware (a connection over the cap, a server draining).
CONNECTION_REJECTIONS = (
    "head_timeout",  # 408: the request line and headers did not arrive in time
    "incomplete_body",  # 400: the client shut its side of the connection before its whole body
    "head_too_large",  # 431 (h11: its own 400): the request line and headers are over the size limit
    "invalid_request",  # uvicorn's own 400: the HTTP parser refused the request line or a header
    "no_request",  # closed without an answer: nothing of a request arrived in time
    "send_timeout",  # dropped: the client read none of its answer for the request timeout
    "too_many_connections",  # opened over max_connections: its request answered 503, or closed if it sent nothing within 1 s
    "shutting_down",  # 503 to an API request while the server drains (answered by the app, before routing)
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.labelnames, k)} {_number(v)}" for k, v in items]


class Histogram(_Metric):
    """Cumulative buckets plus _sum and _count per label set."""

    kind = "histogram"

    def __init__(
        self, name: str, help: str, labelnames: Sequence[str] = (), buckets: Iterable[float] = LATENCY_BUCKETS
    ) -> None:
        super().__init__(name, help, labelnames)
        self.buckets = (*tuple(sorted(float(b) for b in buckets)), math.inf)
        self._counts: dict[LabelValues, list[int]] = {}
        self._sums: dict[LabelValues, float] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            counts = self._counts.setdefault(key, [0] * len(self.buckets))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1  # stored per bucket, made cumulative when rendered
                    break
            self._sums[key] = self._sums.get(key, 0.0) + value

    def snapshot(self, **labels: str) -> tuple[list[tuple[float, int]], float, int]:
        """Cumulative (upper bound, count) pairs, sum and count for one label set."""
        key = self._key(labels)
        with self._lock:
            counts = list(self._counts.get(key, [0] * len(self.buckets)))
            total = self._sums.get(key, 0.0)
        cumulative, running = [], 0
        for bound, c in zip(self.buckets, counts, strict=True):
            running += c
            cumulative.append((bound, running))
        return cumulative, total, running

    def samples(self) -> list[str]:
        with self._lock:
            keys = sorted(self._counts)
        lines = []
        for key in keys:
            labels = dict(zip(self.labelnames, key, strict=True))
            cumulative, total, count = self.snapshot(**labels)
            for bound, c in cumulative:
                le = 'le="' + _number(bound) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {c}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_number(total)}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, key)} {count}")
        return lines


class Gauge(_Metric):
    """A value read at scrape time from a callback per label set (queue depth, in-flight requests)."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._sources: dict[LabelValues, Callable[[], float]] = {}

    def set_function(self, fn: Callable[[], float], **labels: str) -> None:
        with self._lock:
            self._sources[self._key(labels)] = fn

    def value(self, **labels: str) -> float:
        with self._lock:
            fn = self._sources.get(self._key(labels))
        return float(fn()) if fn is not None else 0.0

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._sources.items())
        return [f"{self.name}{_labels(self.labelnames, k)} {_number(float(fn()))}" for k, fn in items]


class Registry:
    """An ordered set of metrics rendered together."""

    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def register(self, metric: _Metric) -> None:
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"metric {metric.name!r} is already registered")
        self._metrics.append(metric)

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._metrics:
            lines += metric.header() + metric.samples()
        return "\n".join(lines) + "\n"


class ServeMetrics:
    """The metrics one app instance exports; each app gets its own registry (tests build many apps)."""

    def __init__(self) -> None:
        self.registry = Registry()
        self.requests = Counter(
            "clipengine_http_requests_total",
            "HTTP requests by route and status.",
            ("method", "route", "status"),
        )
        self.latency = Histogram(
            "clipengine_http_request_duration_seconds", "HTTP request latency by route.", ("method", "route")
        )
        self.batch_size = Histogram(
            "clipengine_batch_size", "Items per backend call, by queue.", ("queue",), BATCH_BUCKETS
        )
        self.batch_latency = Histogram(
            "clipengine_batch_duration_seconds", "Backend call time, by queue.", ("queue",)
        )
        self.queue_depth = Gauge("clipengine_queue_depth", "Items waiting for a backend call.", ("queue",))
        self.in_flight = Gauge("clipengine_requests_in_flight", "Inference requests being served.")
        self.rejected = Counter(
            "clipengine_rejected_total", "Items refused because a queue was full, by queue.", ("queue",)
        )
        self.http_rejected = Counter(
            "clipengine_http_rejected_total",
            "Requests and connections refused or dropped before routing, by reason.",
            ("reason",),
        )
        for reason in CONNECTION_REJECTIONS:  # every reason shows, at 0, from the first scrape
            self.http_rejected.inc(0, reason=reason)
        for metric in (
            self.requests,
            self.latency,
            self.batch_size,
            self.batch_latency,
            self.queue_depth,
            self.in_flight,
            self.rejected,
            self.http_rejected,
        ):
            self.registry.register(metric)

    def render(self) -> str:
        return self.registry.render()
