"""bench/serve_bench.py reads Prometheus histograms (serve's request time, the worker's end to
end) from scraped samples: the helpers it prints them with."""

from __future__ import annotations

from bench_scripts import load_bench

SAMPLES = {
    'streamrec_http_request_seconds_bucket{le="0.02",route="/v1/search"}': 90.0,
    'streamrec_http_request_seconds_bucket{le="0.035",route="/v1/search"}': 99.0,
    'streamrec_http_request_seconds_bucket{le="0.05",route="/v1/search"}': 100.0,
    'streamrec_http_request_seconds_bucket{le="+Inf",route="/v1/search"}': 100.0,
    'streamrec_http_request_seconds_bucket{le="+Inf",route="/v1/items/{item_id}/similar"}': 7.0,
    "streamrec_http_request_seconds_count": 107.0,
}


def test_the_99th_percentile_bucket_and_the_shares_within_20_and_35_ms():
    bench = load_bench("serve_bench")
    assert bench.served_latency(SAMPLES) == (35.0, 0.9, 0.99)
    assert bench.served_latency({}) is None


def test_a_histogram_less_its_counts_before_the_run():
    bench = load_bench("serve_bench")
    before = {'streamrec_http_request_seconds_bucket{le="0.02",route="/v1/search"}': 90.0,
              'streamrec_http_request_seconds_bucket{le="0.035",route="/v1/search"}': 90.0,
              'streamrec_http_request_seconds_bucket{le="0.05",route="/v1/search"}': 90.0,
              'streamrec_http_request_seconds_bucket{le="+Inf",route="/v1/search"}': 90.0}
    buckets = bench.histogram(SAMPLES, "streamrec_http_request_seconds", 'route="/v1/search"', before)
    assert buckets == [(0.02, 0.0), (0.035, 9.0), (0.05, 10.0), (float("inf"), 10.0)]
    assert bench.p99_bound_ms(buckets) == 50.0
    assert bench.p99_bound_ms(bench.histogram(before, "streamrec_http_request_seconds", before=before)) is None
