"""bench/serve_bench.py reads Prometheus histograms (serve's request time, the worker's end to
end) from scraped samples: the helpers it prints them with; and it says in one line when Kafka or
Redis does not answer, before the run."""

from __future__ import annotations

import socket

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


def closed_port() -> int:
    """A port nothing listens on (bound a moment, then let go): a connection there is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_without_kafka_and_redis_it_says_so_in_one_line_and_exits_2(monkeypatch, capsys):
    """Run without `make up`, it ended in redis-py's connection traceback (after a produce that failed)."""
    bench = load_bench("serve_bench")
    kafka, redis_port = closed_port(), closed_port()
    monkeypatch.setenv("STREAMREC_KAFKA_BOOTSTRAP", f"127.0.0.1:{kafka}")
    monkeypatch.setenv("STREAMREC_REDIS_URL", f"redis://127.0.0.1:{redis_port}/0")

    def started(*args, **kwargs):
        raise AssertionError(f"the run started without the services: {args}")

    monkeypatch.setattr(bench.subprocess, "run", started)
    monkeypatch.setattr(bench.subprocess, "Popen", started)
    assert bench.main(["--seconds", "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"serve_bench: Kafka at 127.0.0.1:{kafka} (") and \
        f"Redis at redis://127.0.0.1:{redis_port}/0 (" in err, err
    assert err.rstrip().endswith('do not answer: start them with `eval "$(make -s up)"` (or point '
                                 "STREAMREC_KAFKA_BOOTSTRAP and STREAMREC_REDIS_URL at running ones)"), err


def test_the_one_that_does_not_answer_is_named_alone(monkeypatch):
    bench = load_bench("serve_bench")
    port = closed_port()
    monkeypatch.setattr(bench, "probe", lambda kafka, timeout_s: None)  # Kafka answers
    settings = bench.Settings.from_env({"STREAMREC_REDIS_URL": f"redis://127.0.0.1:{port}/0"})
    said = bench.services_problem(settings)
    assert said.startswith(f"Redis at redis://127.0.0.1:{port}/0 (ConnectionError: ") and "Kafka at" not in said, said
    assert ") does not answer: start them with `eval" in said, said
