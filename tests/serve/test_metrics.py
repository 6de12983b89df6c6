"""The hand-written Prometheus registry renders valid text exposition format."""

from __future__ import annotations

import pytest

from clipengine.serve.metrics import (
    CONNECTION_REJECTIONS,
    Counter,
    Gauge,
    Histogram,
    Registry,
    ServeMetrics,
)


def test_counter_renders_labels_and_escapes_values() -> None:
    c = Counter("x_total", "Things.", ("route",))
    c.inc(route='/a"b')
    c.inc(2, route='/a"b')
    reg = Registry()
    reg.register(c)
    text = reg.render()
    assert "# HELP x_total Things.\n# TYPE x_total counter\n" in text
    assert 'x_total{route="/a\\"b"} 3\n' in text
    assert c.value(route='/a"b') == 3


def test_histogram_buckets_are_cumulative_with_inf_sum_and_count() -> None:
    h = Histogram("lat_seconds", "Latency.", ("q",), buckets=(1, 2, 4))
    for v in (0.5, 1.5, 3, 10):
        h.observe(v, q="a")
    lines = Histogram.samples(h)
    assert 'lat_seconds_bucket{q="a",le="1"} 1' in lines
    assert 'lat_seconds_bucket{q="a",le="2"} 2' in lines
    assert 'lat_seconds_bucket{q="a",le="4"} 3' in lines
    assert 'lat_seconds_bucket{q="a",le="+Inf"} 4' in lines
    assert 'lat_seconds_sum{q="a"} 15' in lines
    assert 'lat_seconds_count{q="a"} 4' in lines


def test_gauge_reads_its_callback_at_scrape_time() -> None:
    depth = [3]
    g = Gauge("depth", "Depth.", ("queue",))
    g.set_function(lambda: depth[0], queue="text")
    assert g.samples() == ['depth{queue="text"} 3']
    depth[0] = 0
    assert g.value(queue="text") == 0


def test_wrong_labels_and_duplicate_names_are_refused() -> None:
    c = Counter("y_total", "Y.", ("a",))
    with pytest.raises(ValueError, match="takes labels"):
        c.inc(b="1")
    reg = Registry()
    reg.register(c)
    with pytest.raises(ValueError, match="already registered"):
        reg.register(Counter("y_total", "again"))


def test_serve_metrics_has_every_family_the_issue_asks_for() -> None:
    text = ServeMetrics().render()
    for family in (
        "clipengine_http_requests_total counter",
        "clipengine_http_request_duration_seconds histogram",
        "clipengine_batch_size histogram",
        "clipengine_queue_depth gauge",
        "clipengine_http_rejected_total counter",
    ):
        assert f"# TYPE {family}" in text
    # The connection layer's reasons show at 0 before the first refusal, so rate() has a series.
    for reason in CONNECTION_REJECTIONS:
        assert f'clipengine_http_rejected_total{{reason="{reason}"}} 0\n' in text
