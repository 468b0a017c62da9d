"""``streamrec report``: the statistics against known values, the three sources (a real
/metrics over HTTP, a fake Prometheus API, a replay's JSON), the denominator rule, the chart
and the command line."""

from __future__ import annotations

import json
import math
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from typer.testing import CliRunner

from stream import cli
from stream import report as report_module
from stream.errors import ServiceUnavailable, StreamrecError
from stream.experiments import load_experiment
from stream.prometheus import Metrics
from stream.report import (
    ReportError,
    counters_from_json,
    counters_from_json_file,
    counters_from_metrics_text,
    counters_from_metrics_urls,
    counters_from_prometheus,
    display_width,
    format_table,
    merge_counters,
    ratio_ci,
    summarize,
    wilson,
    write_chart,
)

Z = 1.959963984540054
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- Wilson


@pytest.mark.parametrize(("k", "n", "lo", "hi"), [
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_matches_the_textbook_examples(k, n, lo, hi):
    p, got_lo, got_hi = wilson(k, n)
    assert p == pytest.approx(k / n)
    assert got_lo == pytest.approx(lo, abs=5e-5)
    assert got_hi == pytest.approx(hi, abs=5e-5)


def _score_test_bounds(k, n):
    """The Wilson interval by its definition, found by bisection: the p where the score test
    |k/n - p| = z * sqrt(p(1-p)/n) turns from rejecting to accepting."""
    phat = k / n

    def accepts(p):
        return (phat - p) ** 2 <= Z * Z * p * (1 - p) / n

    def edge(outside, inside):
        for _ in range(200):
            mid = (outside + inside) / 2
            if accepts(mid):
                inside = mid
            else:
                outside = mid
        return inside

    lo = 0.0 if k == 0 else edge(0.0, phat)
    hi = 1.0 if k == n else edge(1.0, phat)
    return lo, hi


@pytest.mark.parametrize(("k", "n"), [(1, 1), (0, 3), (3, 3), (7, 50), (500, 10_000), (9_999, 10_000), (123, 4567)])
def test_wilson_is_the_score_test_inversion(k, n):
    _, lo, hi = wilson(k, n)
    want_lo, want_hi = _score_test_bounds(k, n)
    assert lo == pytest.approx(want_lo, abs=1e-9)
    assert hi == pytest.approx(want_hi, abs=1e-9)


def test_wilson_refuses_an_empty_or_impossible_sample():
    with pytest.raises(ValueError):
        wilson(0, 0)
    with pytest.raises(ValueError):
        wilson(5, 4)


# --------------------------------------------------------------------------- Katz


def test_katz_interval_by_hand():
    # 10/100 against 5/100: r = 2, se(log r) = sqrt(1/10 - 1/100 + 1/5 - 1/100) = sqrt(0.28)
    lift, lo, hi = ratio_ci(10, 100, 5, 100)
    half = Z * math.sqrt(0.28)
    assert lift == pytest.approx(1.0)
    assert lo == pytest.approx(2 * math.exp(-half) - 1)  # 0.7090 - 1
    assert hi == pytest.approx(2 * math.exp(half) - 1)  # 5.6422 - 1
    assert (lo, hi) == pytest.approx((-0.2910, 4.6422), abs=1e-4)


@pytest.mark.parametrize(("k1", "n1", "k2", "n2"), [(30, 1000, 20, 1000), (5, 40, 9, 35), (250, 5000, 300, 4000)])
def test_katz_interval_matches_the_delta_method_form(k1, n1, k2, n2):
    # the same interval written the other way round: var(log r) = (1-p1)/(n1 p1) + (1-p2)/(n2 p2)
    p1, p2 = k1 / n1, k2 / n2
    se = math.sqrt((1 - p1) / (n1 * p1) + (1 - p2) / (n2 * p2))
    lift, lo, hi = ratio_ci(k1, n1, k2, n2)
    assert lift == pytest.approx(p1 / p2 - 1)
    assert lo == pytest.approx(p1 / p2 * math.exp(-Z * se) - 1)
    assert hi == pytest.approx(p1 / p2 * math.exp(Z * se) - 1)
    assert lo < lift < hi


def test_katz_without_a_control_rate_is_undefined_and_a_zero_variant_is_corrected():
    assert ratio_ci(3, 10, 0, 10) is None
    assert ratio_ci(3, 0, 1, 10) is None
    lift, lo, hi = ratio_ci(0, 100, 10, 100)
    assert lift == -1.0
    # Haldane-Anscombe: 0.5 added to each cell of the 2x2 table, clicked and not: k + 0.5 of n + 1
    r = (0.5 / 101) / (10.5 / 101)
    se = math.sqrt(1 / 0.5 - 1 / 101 + 1 / 10.5 - 1 / 101)
    assert lo == -1.0  # nothing observed: the ratio may be 0
    assert hi == pytest.approx(r * math.exp(Z * se) - 1)


@pytest.mark.parametrize(("k1", "n1", "k2", "n2"), [(1, 1, 1, 1), (5, 5, 3, 10), (3, 10, 5, 5), (20, 20, 20, 20)])
def test_katz_with_every_list_clicked_is_corrected_not_an_interval_of_width_zero(k1, n1, k2, n2):
    # k == n leaves 1/k - 1/n = 0: one list clicked of one in each arm was "+0.0% [+0.0%, +0.0%]",
    # certainty from two events; the corrected interval is that of k + 0.5 of n + 1 in both arms
    lift, lo, hi = ratio_ci(k1, n1, k2, n2)
    assert lift == pytest.approx((k1 / n1) / (k2 / n2) - 1)
    c1, m1, c2, m2 = k1 + 0.5, n1 + 1, k2 + 0.5, n2 + 1
    r = (c1 / m1) / (c2 / m2)
    se = math.sqrt(1 / c1 - 1 / m1 + 1 / c2 - 1 / m2)
    assert lo == pytest.approx(min(lift, r * math.exp(-Z * se) - 1))
    assert hi == pytest.approx(max(lift, r * math.exp(Z * se) - 1))
    assert lo < lift < hi  # a real width, holding the lift printed
    assert (lo, hi) != pytest.approx((lift, lift), abs=1e-3)


def test_one_list_clicked_in_each_arm_does_not_print_a_certain_lift():
    s = summarize({"control": {"lists": 1, "clicked_lists": 1}, "B": {"lists": 1, "clicked_lists": 1}})
    assert "+0.0% [+0.0%, +0.0%]" not in format_table(s)
    assert s["variants"]["B"]["lift"]["ctr"]["ci"] == pytest.approx([-0.6775, 2.1006], abs=1e-4)


# --------------------------------------------------------------------------- sources


def experiment_registry(variants: dict[str, dict], other_series: bool = True) -> CollectorRegistry:
    """The counters the worker exports, as prometheus_client writes them."""
    reg = CollectorRegistry()
    names = ["lists", "impressions", "clicked_lists", "clicks", "purchased_lists", "purchases", "revenue", "judged"]
    counters = {n: Counter(f"streamrec_experiment_{n}", n, ["variant"], registry=reg) for n in names}
    hits = Counter("streamrec_experiment_hits", "hits", ["variant", "k"], registry=reg)
    for variant, c in variants.items():
        for n in names:
            if n in c:
                counters[n].labels(variant=variant).inc(c[n])
        for k, v in c.get("hits", {}).items():
            hits.labels(variant=variant, k=k).inc(v)
    if other_series:  # the worker's other metrics: not the experiment's
        Counter("streamrec_events_total", "events", ["type"], registry=reg).labels(type="click").inc(99)
        Counter("streamrec_other_total", "other", ["variant"], registry=reg).labels(variant="A").inc(5)
    return reg


WORKER_1 = {
    "A": {"lists": 1000, "clicked_lists": 50, "clicks": 70, "purchased_lists": 10, "purchases": 12,
          "revenue": 250.5, "judged": 800, "hits": {"1": 40, "5": 100, "10": 150, "20": 200}},
    "B": {"lists": 900, "impressions": 600, "clicked_lists": 60, "clicks": 61, "purchased_lists": 9,
          "purchases": 9, "revenue": 99.0, "judged": 700, "hits": {"1": 50, "5": 120, "10": 160, "20": 210}},
}
WORKER_2 = {"A": {"lists": 10, "clicked_lists": 1, "judged": 5, "hits": {"20": 2}}}


def test_metrics_text_parses_every_counter_of_every_variant():
    text = generate_latest(experiment_registry(WORKER_1)).decode()
    assert "streamrec_experiment_lists_created" in text  # the _created samples are there, and ignored
    got = counters_from_metrics_text(text)
    assert set(got) == {"A", "B"}
    a, b = got["A"], got["B"]
    assert (a["lists"], a["impressions"], a["clicked_lists"], a["clicks"]) == (1000, 0, 50, 70)
    assert (a["purchased_lists"], a["purchases"], a["revenue"], a["judged"]) == (10, 12, 250.5, 800)
    assert a["hits"] == {"1": 40, "5": 100, "10": 150, "20": 200}
    assert (b["impressions"], b["hits"]["20"]) == (600, 210)


def test_metrics_text_without_experiment_counters_is_empty():
    assert counters_from_metrics_text(generate_latest(experiment_registry({})).decode()) == {}


def test_several_workers_are_summed():
    one = counters_from_metrics_text(generate_latest(experiment_registry(WORKER_1)).decode())
    two = counters_from_metrics_text(generate_latest(experiment_registry(WORKER_2)).decode())
    got = merge_counters([one, two])
    assert (got["A"]["lists"], got["A"]["clicked_lists"], got["A"]["judged"]) == (1010, 51, 805)
    assert got["A"]["hits"] == {"1": 40, "5": 100, "10": 150, "20": 202}
    assert got["B"] == one["B"]


def test_json_source_reads_counters_and_control():
    counters, control = counters_from_json({"control": "B", "variants": WORKER_1})
    assert control == "B"
    assert counters["A"]["revenue"] == 250.5 and counters["B"]["hits"]["10"] == 160
    assert counters["A"]["impressions"] == 0  # absent: 0
    with pytest.raises(ReportError, match="variants"):
        counters_from_json({"A": {}})
    with pytest.raises(ReportError, match="not a number"):
        counters_from_json({"variants": {"A": {"lists": "many"}}})
    for huge in (float("inf"), float("nan"), 10 ** 400):  # JSON's 1e400, NaN and a 400-digit count
        with pytest.raises(ReportError, match="not a finite number"):
            counters_from_json({"variants": {"A": {"lists": huge}}})
    with pytest.raises(ReportError, match="not a finite number"):
        counters_from_metrics_text('streamrec_experiment_lists_total{variant="A"} +Inf\n')
    with pytest.raises(ReportError, match="lists is True, not a number"):  # JSON's true counted as 1
        counters_from_json({"variants": {"A": {"lists": True}}})
    for field in ("lists", "revenue"):  # a counter never goes below 0 (a Wilson interval of it raised)
        with pytest.raises(ReportError, match=f"{field} is -3, a count below 0"):
            counters_from_json({"variants": {"A": {field: -3}}})


def test_counts_past_a_floats_exact_range_stay_exact_and_past_1e154_do_not_raise():
    big = 2 ** 53 + 1  # a float holds 2**53 + 1 as 2**53
    counters, _ = counters_from_json({"variants": {"A": {"lists": big, "clicked_lists": big - 1}}})
    assert counters["A"]["lists"] == big
    s = summarize(counters)
    assert s["variants"]["A"]["denominator"]["n"] == big and s["variants"]["A"]["ctr"]["k"] == big - 1
    assert s["variants"]["A"]["ctr"]["rate"] < 1  # 2**53 of 2**53 + 1, not 2**53 of 2**53
    # 4 * n * n of a whole n over 1e154 was an OverflowError (a traceback) in the Wilson interval
    huge = {"lists": 10 ** 300, "clicked_lists": 10 ** 299, "judged": 10 ** 300, "hits": {"20": 10 ** 299}}
    s = summarize(counters_from_json({"variants": {"A": huge, "B": huge}})[0])
    assert s["variants"]["B"]["ctr"]["rate"] == pytest.approx(0.1)
    assert s["variants"]["B"]["lift"]["ctr"]["lift"] == pytest.approx(0.0)
    format_table(s)


def test_cli_timeout_outside_a_millisecond_to_an_hour_is_a_usage_error():
    for bad in ("inf", "nan", "0", "-1", "3601"):
        result = runner.invoke(cli.app, ["report", "--metrics", "http://127.0.0.1:9/metrics", "--timeout", bad])
        assert result.exit_code == 2 and "--timeout" in result.output, (bad, result.output)


def test_a_json_file_nested_too_deeply_is_a_report_error(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    with pytest.raises(ReportError, match="too deeply"):
        counters_from_json_file(deep)


def test_an_evaluate_report_without_an_experiment_says_how_to_get_the_arms(tmp_path):
    """`streamrec evaluate --json-out` without --variants, read by `report --json`, said only that
    the JSON had no "variants" object, not what to run instead."""
    plain = tmp_path / "evaluate.json"
    plain.write_text(json.dumps({"protocol": "prequential", "models": {"served": {"HR@20": 0.1}}, "ks": [20]}))
    result = runner.invoke(cli.app, ["report", "--json", str(plain)])
    assert result.exit_code != 0 and isinstance(result.exception, ReportError), result.output
    assert "rehearsed no experiment: run it again with --variants FILE" in str(result.exception)


# --------------------------------------------------------------------------- summary


def test_the_denominator_is_impressions_when_reported_else_lists():
    s = summarize(counters_from_json({"variants": WORKER_1})[0])
    a, b = s["variants"]["A"], s["variants"]["B"]
    assert a["denominator"] == {"kind": "lists", "n": 1000}
    assert b["denominator"] == {"kind": "impressions", "n": 600}
    assert a["ctr"]["rate"] == pytest.approx(50 / 1000) and b["ctr"]["rate"] == pytest.approx(60 / 600)
    assert b["conversion"]["rate"] == pytest.approx(9 / 600)
    assert a["revenue_per_list"] == pytest.approx(0.2505) and b["revenue_per_list"] == pytest.approx(99 / 600)
    assert b["hr20"]["rate"] == pytest.approx(210 / 700)
    assert any("unlike" in w for w in s["warnings"])  # lists against impressions: said so


def test_a_rate_per_impression_against_one_per_list_has_no_lift():
    # B's site reported impressions, the control's none: 50% per impression against 10% per list
    # was "+400.0% [+140.1%, +941.0%]", with only a warning that the rates were unlike
    s = summarize({"control": {"lists": 100, "clicked_lists": 10, "purchased_lists": 2, "judged": 50, "hits": {"20": 5}},
                   "B": {"lists": 100, "impressions": 20, "clicked_lists": 10, "purchased_lists": 2, "judged": 50,
                         "hits": {"20": 10}}})
    lift = s["variants"]["B"]["lift"]
    assert lift["ctr"] is None and lift["conversion"] is None
    assert lift["hr20"]["lift"] == pytest.approx(1.0)  # per judged event in both: comparable
    table = format_table(s)
    assert "+400.0%" not in table
    assert any("lifts of B are n/a" in w and "per impression" in w for w in s["warnings"])
    # a variant without traffic is no unlike rate: no warning for it
    s = summarize({"control": {"lists": 100, "impressions": 90, "clicked_lists": 10}, "C": {}})
    assert s["warnings"] == []


def test_a_count_over_its_denominator_has_no_rate_and_no_lift():
    # 12 clicked lists of 10 (a worker's counters reset between the lists and their clicks) were
    # "capped at 1": a CTR of 100% [72.25%, 100%] and a lift of +900% over the control
    s = summarize({"control": {"lists": 100, "clicked_lists": 10}, "B": {"lists": 10, "clicked_lists": 12}})
    b = s["variants"]["B"]
    assert b["ctr"] is None and b["lift"]["ctr"] is None
    assert b["conversion"]["rate"] == 0.0  # the other rates stand
    assert any("B CTR: 12 exceeds its denominator 10" in w and "n/a" in w for w in s["warnings"])
    assert "100.00%" not in format_table(s) and "+900.0%" not in format_table(s)


def test_summary_rates_intervals_and_lifts():
    counters = {"control": {"lists": 2000, "clicked_lists": 100, "purchased_lists": 20, "judged": 1000, "hits": {"20": 300}},
                "treat": {"lists": 2000, "clicked_lists": 130, "purchased_lists": 0, "judged": 1000, "hits": {"20": 330}}}
    s = summarize(counters)
    assert s["control"] == "control"  # the variant named control, though "treat" would sort after anyway
    c, t = s["variants"]["control"], s["variants"]["treat"]
    assert c["lift"] is None
    assert c["ctr"]["ci"] == pytest.approx(list(wilson(100, 2000)[1:]))
    assert t["lift"]["ctr"]["lift"] == pytest.approx(0.3)
    assert t["lift"]["ctr"]["ci"] == pytest.approx(list(ratio_ci(130, 2000, 100, 2000)[1:]))
    assert t["lift"]["conversion"]["lift"] == -1.0
    assert t["lift"]["hr20"]["lift"] == pytest.approx(0.1)
    # the control's rate is 0: no lift
    s = summarize({"A": {"lists": 10}, "B": {"lists": 10, "clicked_lists": 2}}, control="A")
    assert s["variants"]["B"]["lift"]["ctr"] is None
    assert "n/a" in format_table(s)


def test_default_control_is_the_first_in_sorted_order_and_an_unknown_one_is_refused():
    assert summarize({"zeta": {"lists": 1}, "alpha": {"lists": 1}})["control"] == "alpha"
    with pytest.raises(ReportError, match="unknown control 'C'.*A, B"):
        summarize({"A": {"lists": 1}, "B": {"lists": 1}}, control="C")


def test_a_variant_without_lists_has_no_rates():
    s = summarize({"A": {"lists": 10, "clicked_lists": 1}, "B": {}})
    b = s["variants"]["B"]
    assert b["ctr"] is None and b["hr20"] is None and b["revenue_per_list"] is None
    assert b["lift"] == {"ctr": None, "conversion": None, "hr20": None}
    format_table(s)  # prints n/a, does not fail


def test_chart_is_a_png(tmp_path):
    path = tmp_path / "exp.png"
    write_chart(summarize(counters_from_json({"variants": WORKER_1})[0], "A"), path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    # rates of 0 and 1 (error bars of length 0) and a variant with no rates at all
    path = tmp_path / "edges.png"
    write_chart(summarize({"A": {"lists": 1000, "clicked_lists": 1000, "judged": 3}, "B": {"lists": 1000}, "C": {}}), path)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_wilson_edges_are_exact():
    assert wilson(0, 1000)[:2] == (0.0, 0.0)
    assert wilson(1000, 1000)[::2] == (1.0, 1.0)


# --------------------------------------------------------------------------- the command

runner = CliRunner()


def test_cli_json_source_table_and_chart(tmp_path):
    src = tmp_path / "replay.json"
    src.write_text(json.dumps({"control": "B", "variants": WORKER_1}))
    chart = tmp_path / "chart.png"
    result = runner.invoke(cli.app, ["report", "--json", str(src), "--chart", str(chart)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "B (control)" in out and "impressions 600" in out and "lists 1000" in out
    assert "5.00% [" in out  # A's CTR: 50 / 1000
    assert "lift vs B" in out and "Katz" in out
    assert chart.read_bytes()[:8] == PNG_MAGIC


def test_cli_json_output(tmp_path):
    src = tmp_path / "replay.json"
    src.write_text(json.dumps({"variants": WORKER_1}))
    result = runner.invoke(cli.app, ["report", "--json", str(src), "--json-output", "--control", "B"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["control"] == "B"
    assert summary["variants"]["A"]["ctr"]["rate"] == pytest.approx(0.05)
    # A's rates are per list, the control B's per impression: no CTR or conversion lift, HR@20's stays
    assert summary["variants"]["A"]["lift"]["ctr"] is None and summary["variants"]["A"]["lift"]["conversion"] is None
    assert summary["variants"]["A"]["lift"]["hr20"]["lift"] == pytest.approx((200 / 800) / (210 / 700) - 1)


def test_cli_json_output_is_json_when_an_interval_overflows(tmp_path):
    """A lift's upper bound past a float's largest was written as `Infinity`, which JSON has not."""
    src = tmp_path / "replay.json"
    src.write_text(json.dumps({"control": "B", "variants": {"A": {"lists": 10, "clicked_lists": 9},
                                                            "B": {"lists": 1e308, "clicked_lists": 1}}}))
    result = runner.invoke(cli.app, ["report", "--json", str(src), "--json-output"])
    assert result.exit_code == 0, result.output
    lift = json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"{c} is no JSON"))["variants"]["A"]["lift"]["ctr"]
    assert lift["ci"][1] is None and lift["lift"] > 1e300


def test_cli_an_empty_control_is_a_usage_error_not_the_default(tmp_path):
    src = tmp_path / "replay.json"
    src.write_text(json.dumps({"control": "B", "variants": WORKER_1}))
    for empty in ("", " "):
        result = runner.invoke(cli.app, ["report", "--json", str(src), "--control", empty])
        assert result.exit_code == 2 and "--control" in result.output, (empty, result.output)


def test_cli_wants_exactly_one_source(tmp_path):
    assert runner.invoke(cli.app, ["report"]).exit_code == 2
    src = tmp_path / "r.json"
    src.write_text("{}")
    assert runner.invoke(cli.app, ["report", "--json", str(src), "--prometheus", "http://x"]).exit_code == 2


def test_cli_unknown_control_is_a_streamrec_error_printed_without_traceback(tmp_path, monkeypatch, capsys):
    src = tmp_path / "replay.json"
    src.write_text(json.dumps({"variants": WORKER_1}))
    result = runner.invoke(cli.app, ["report", "--json", str(src), "--control", "Z"])
    assert isinstance(result.exception, StreamrecError)
    monkeypatch.setattr(sys, "argv", ["streamrec", "report", "--json", str(src), "--control", "Z"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unknown control 'Z'" in err and "Traceback" not in err


# --------------------------------------------------------------------------- over HTTP


class _Server:
    """A real HTTP server in a thread: ``routes`` maps a path to a function of the query string
    returning (status, content type, body)."""

    def __init__(self, routes):
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.requests.append(self.path)
                parts = urllib.parse.urlsplit(self.path)
                route = routes.get(parts.path)
                status, ctype, body = route(urllib.parse.parse_qs(parts.query)) if route else (404, "text/plain", b"no")
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _metrics_route(variants):
    body = generate_latest(experiment_registry(variants))
    return lambda _query: (200, "text/plain; version=0.0.4", body)


def test_cli_metrics_from_two_real_workers_are_summed():
    with _Server({"/metrics": _metrics_route(WORKER_1)}) as w1, _Server({"/metrics": _metrics_route(WORKER_2)}) as w2:
        result = runner.invoke(cli.app, ["report", "--metrics", f"{w1.url}/metrics", "--metrics", w2.url,
                                         "--json-output", "--control", "A"])
    assert result.exit_code == 0, result.output
    a = json.loads(result.stdout)["variants"]["A"]
    assert a["denominator"] == {"kind": "lists", "n": 1010}
    assert a["clicked_lists"] == 51 and a["hits"]["20"] == 202
    assert w2.requests == ["/metrics"]  # the bare address was given /metrics


TWO_ARMS_TOML = 'experiment = "x"\ncontrol = "pop"\n[[arms]]\nname = "pop"\nshare = 0.5\n' \
                '[[arms]]\nname = "blend"\nshare = 0.5\n'


def test_cli_an_arm_of_streamrec_variants_without_a_list_yet_is_shown_not_an_unknown_control(tmp_path, monkeypatch):
    # a worker exports a variant's counters from its first list on: the control "pop" has none
    # yet, and the report said "unknown control 'pop'" of the control it took from the file itself
    exp = tmp_path / "exp.toml"
    exp.write_text(TWO_ARMS_TOML)
    monkeypatch.setenv("STREAMREC_VARIANTS", str(exp))
    with _Server({"/metrics": _metrics_route({"blend": {"lists": 10, "clicked_lists": 2}})}) as w:
        result = runner.invoke(cli.app, ["report", "--metrics", w.url, "--json-output"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["control"] == "pop"
    pop, blend = summary["variants"]["pop"], summary["variants"]["blend"]
    assert pop["denominator"] == {"kind": "lists", "n": 0} and pop["ctr"] is None
    assert blend["ctr"]["rate"] == pytest.approx(0.2) and blend["lift"]["ctr"] is None
    assert summary["warnings"] == []


def test_cli_variants_that_are_not_arms_of_streamrec_variants_are_said(tmp_path, monkeypatch):
    # the workers run without the report's experiment file: their counters are "default"'s
    exp = tmp_path / "exp.toml"
    exp.write_text(TWO_ARMS_TOML)
    monkeypatch.setenv("STREAMREC_VARIANTS", str(exp))
    with _Server({"/metrics": _metrics_route({"default": {"lists": 10, "clicked_lists": 2}})}) as w:
        result = runner.invoke(cli.app, ["report", "--metrics", w.url])
    assert result.exit_code == 0, result.output
    assert "pop (control)" in result.output and "blend" in result.output
    assert "warning: variant(s) default are not arms of STREAMREC_VARIANTS's experiment 'x'" in result.output


def test_cli_metrics_without_experiment_counters_says_so():
    with _Server({"/metrics": _metrics_route({})}) as w:
        result = runner.invoke(cli.app, ["report", "--metrics", w.url])
    assert isinstance(result.exception, ReportError)
    assert "no streamrec_experiment_* counters at" in str(result.exception)
    assert "STREAMREC_VARIANTS" in str(result.exception)
    # it asked "is STREAMREC_VARIANTS set on the worker?", but a worker without it counts under
    # "default" all the same: what has none is serve's /metrics, or a worker that published no list yet
    assert "is STREAMREC_VARIANTS set" not in str(result.exception)
    assert "serve exports none" in str(result.exception) and "published a list" in str(result.exception)


def test_cli_unreachable_source_is_service_unavailable():
    with _Server({}) as w:
        url = w.url
    result = runner.invoke(cli.app, ["report", "--metrics", url, "--timeout", "2"])  # closed: refused
    assert isinstance(result.exception, ServiceUnavailable)
    assert url in str(result.exception)
    with _Server({}) as w:  # answers, but 404
        result = runner.invoke(cli.app, ["report", "--metrics", f"{w.url}/nothing"])
    assert isinstance(result.exception, ServiceUnavailable) and "404" in str(result.exception)


HTML_404 = (b'<!DOCTYPE HTML>\n<html lang="en">\n  <head><title>Error response</title>\n  <style>p { x: 1 }</style></head>\n'
            b"  <body>\n    <h1>Error response</h1>\n    <p>Message: File not found.</p>\n  </body>\n</html>\n")


@pytest.mark.parametrize("source", ["--metrics", "--prometheus"])
@pytest.mark.parametrize("body", [HTML_404, b'["a", "JSON", "list"]'])
def test_an_error_page_from_another_server_is_said_in_one_line(source, body):
    """--metrics or --prometheus at a port that is another web server: its HTML 404 page was
    quoted as it came, eleven lines of markup; Prometheus's JSON error read with .get raised
    AttributeError (a traceback) when the JSON was not an object."""
    with _Server({"/metrics": lambda q: (404, "text/html", body), "/api/v1/query": lambda q: (400, "text/html", body)}) as w:
        result = runner.invoke(cli.app, ["report", source, w.url])
    assert isinstance(result.exception, ServiceUnavailable), result.exception
    said = str(result.exception)
    assert "\n" not in said and "<" not in said and len(said) < 400, said
    if body is HTML_404:
        assert "Message: File not found." in said and "x: 1" not in said


def _vector(series):
    return json.dumps({"status": "success", "data": {"resultType": "vector", "result": series}}).encode()


def _prometheus_route(answers):
    """A fake /api/v1/query: ``answers`` maps the metric name inside the query to its series."""
    def route(query):
        q = query["query"][0]
        for name, series in answers.items():
            if f"({name})" in q:
                return 200, "application/json", _vector(series)
        return 200, "application/json", _vector([])
    return route


def _sample(value, **labels):
    return {"metric": labels, "value": [1700000000, str(value)]}


def test_cli_prometheus_api():
    answers = {
        "streamrec_experiment_lists_total": [_sample(1000, variant="A"), _sample(1000, variant="B")],
        "streamrec_experiment_clicked_lists_total": [_sample(40, variant="A"), _sample(60, variant="B")],
        "streamrec_experiment_judged_total": [_sample(500, variant="A"), _sample(500, variant="B")],
        "streamrec_experiment_hits_total": [_sample(100, variant="A", k="20"), _sample(120, variant="B", k="20"),
                                            _sample(30, variant="B", k="1")],
        "streamrec_experiment_revenue_total": [_sample(12.5, variant="A"), _sample("NaN", variant="B")],
    }
    with _Server({"/api/v1/query": _prometheus_route(answers)}) as prom:
        result = runner.invoke(cli.app, ["report", "--prometheus", prom.url + "/", "--json-output"])
        queries = [urllib.parse.parse_qs(urllib.parse.urlsplit(p).query)["query"][0] for p in prom.requests]
    assert result.exit_code == 0, result.output
    assert "sum by (variant) (streamrec_experiment_lists_total)" in queries
    assert "sum by (variant, k) (streamrec_experiment_hits_total)" in queries
    s = json.loads(result.stdout)
    assert s["control"] == "A"
    a, b = s["variants"]["A"], s["variants"]["B"]
    assert a["ctr"]["rate"] == pytest.approx(0.04) and b["ctr"]["rate"] == pytest.approx(0.06)
    assert b["hits"] == {"1": 30, "5": 0, "10": 0, "20": 120}
    assert a["revenue"] == 12.5 and b["revenue"] == 0.0
    assert b["lift"]["ctr"]["lift"] == pytest.approx(0.5)
    assert b["lift"]["hr20"]["lift"] == pytest.approx(0.2)


def test_cli_prometheus_window_asks_for_the_increase_over_it():
    answers = {"streamrec_experiment_lists_total[7d]": [_sample(10, variant="A")],
               "streamrec_experiment_clicked_lists_total[7d]": [_sample(2, variant="A")]}
    with _Server({"/api/v1/query": _prometheus_route(answers)}) as prom:
        result = runner.invoke(cli.app, ["report", "--prometheus", prom.url, "--window", "7d", "--json-output"])
        queries = [urllib.parse.parse_qs(urllib.parse.urlsplit(p).query)["query"][0] for p in prom.requests]
    assert result.exit_code == 0, result.output
    assert "sum by (variant) (increase(streamrec_experiment_lists_total[7d]))" in queries
    assert json.loads(result.stdout)["variants"]["A"]["ctr"]["rate"] == pytest.approx(0.2)
    assert runner.invoke(cli.app, ["report", "--metrics", "http://x", "--window", "7d"]).exit_code == 2
    assert runner.invoke(cli.app, ["report", "--prometheus", prom.url, "--window", "a week"]).exit_code == 2


def test_prometheus_without_counters_errors_and_a_refused_query_says_why():
    with _Server({"/api/v1/query": _prometheus_route({})}) as prom:
        with pytest.raises(ReportError, match="no streamrec_experiment_\\* counters at .*STREAMREC_VARIANTS"):
            counters_from_prometheus(prom.url)

    def bad(_query):
        return 400, "application/json", json.dumps({"status": "error", "errorType": "bad_data",
                                                    "error": "parse error"}).encode()
    with _Server({"/api/v1/query": bad}) as prom:
        with pytest.raises(ServiceUnavailable, match="parse error"):
            counters_from_prometheus(prom.url)
    with _Server({}) as prom:
        url = prom.url
    with pytest.raises(ServiceUnavailable, match="cannot reach Prometheus"):
        counters_from_prometheus(url, timeout=2)


def test_a_url_that_is_not_one_is_a_sentence():
    from stream.errors import ServiceUnavailable
    from stream.report import counters_from_metrics_urls, metrics_url

    with pytest.raises(ReportError, match="is not a URL"):
        metrics_url("http://[::1")
    for url in ("http://127.0.0.1:abc", "http://a b/"):  # http.client's InvalidURL, not an OSError
        with pytest.raises(ServiceUnavailable, match="cannot read"):
            counters_from_metrics_urls([url], timeout=1)


@pytest.mark.parametrize("address", ["127.0.0.1:9464", "localhost:9464", "ftp://w1:9464"])
def test_a_metrics_address_without_http_says_how_to_write_it(address):
    with pytest.raises(ReportError, match="http://HOST:PORT"):  # what `streamrec` prints as its sentence
        counters_from_metrics_urls([address], timeout=1)


@pytest.mark.parametrize("url", ["prom:9090", "127.0.0.1:9090", "ftp://prom:9090", "file:///etc/passwd", "http://",
                                 "http://[::1"])
def test_cli_prometheus_url_that_is_not_http_is_a_clear_error(url):
    result = runner.invoke(cli.app, ["report", "--prometheus", url, "--timeout", "1"])
    assert isinstance(result.exception, ReportError), result.output
    assert "--prometheus" in str(result.exception) and "http://" in str(result.exception)


@pytest.mark.parametrize("body", [
    {"status": "success", "data": []},
    {"status": "success", "data": {"resultType": "vector", "result": {"a": 1}}},
    {"status": "success", "data": {"resultType": "vector", "result": ["x"]}},
    {"status": "success", "data": {"resultType": "vector", "result": [{"metric": ["variant"], "value": [0, "1"]}]}},
])
def test_cli_prometheus_answer_of_an_unexpected_shape_is_a_report_error(body):
    raw = json.dumps(body).encode()
    with _Server({"/api/v1/query": lambda _q: (200, "application/json", raw)}) as prom:
        result = runner.invoke(cli.app, ["report", "--prometheus", prom.url])
    assert isinstance(result.exception, ReportError), result.exception
    assert "is --prometheus the Prometheus HTTP API?" in str(result.exception)


def test_cli_the_same_worker_twice_is_refused_before_reading_it():
    with _Server({"/metrics": _metrics_route(WORKER_1)}) as w:
        result = runner.invoke(cli.app, ["report", "--metrics", w.url, "--metrics", f"{w.url}/metrics"])
    assert isinstance(result.exception, ReportError)
    assert "give each worker's URL once" in str(result.exception)
    assert w.requests == []


def test_cli_chart_over_the_json_source_is_refused(tmp_path):
    src = tmp_path / "replay.json"
    text = json.dumps({"variants": WORKER_1})
    src.write_text(text)
    result = runner.invoke(cli.app, ["report", "--json", str(src), "--chart", str(tmp_path / "." / "replay.json")])
    assert result.exit_code == 2 and "overwrite" in result.output
    assert src.read_text() == text


def test_a_control_guessed_by_name_is_said_to_be_a_guess():
    """Read from the workers' metrics without STREAMREC_VARIANTS or --control, the report took the
    first arm by name as the control, silently, where the workers' file named another."""
    counters = {"blend": {"lists": 100, "clicked_lists": 10}, "popularity": {"lists": 100, "clicked_lists": 20}}
    guessed = summarize(counters)
    assert guessed["control"] == "blend"
    assert any("the first variant by name" in w and "--control" in w for w in guessed["warnings"]), guessed["warnings"]
    assert not any("first variant by name" in w for w in summarize(counters, "popularity")["warnings"])
    named = summarize({"control": {"lists": 10}, "b": {"lists": 10}})
    assert named["control"] == "control" and not any("first variant by name" in w for w in named["warnings"])


def test_a_wrong_experiment_file_is_said_before_any_source_is_read(monkeypatch, tmp_path):
    """STREAMREC_VARIANTS was read after the metrics: a wrong path waited for the source first."""
    monkeypatch.setenv("STREAMREC_VARIANTS", str(tmp_path / "missing.toml"))
    read = []
    monkeypatch.setattr(report_module, "counters_from_metrics_urls", lambda *a, **k: read.append(a) or {})
    result = runner.invoke(cli.app, ["report", "--metrics", "http://127.0.0.1:9/metrics"])
    assert result.exit_code != 0 and "STREAMREC_VARIANTS" in str(result.exception) + result.output, result.output
    assert read == []


def _worker_route(variants, experiment=None):
    """A worker's /metrics: its counters and, serving ``experiment``, streamrec_experiment_info."""
    reg = experiment_registry(variants)
    if experiment is not None:  # the gauge the worker's Metrics has (checked below)
        Gauge(report_module.INFO, "info", ["experiment", "digest"], registry=reg).labels(
            experiment.name, experiment.digest).set(1)
    body = generate_latest(reg)
    return lambda _query: (200, "text/plain; version=0.0.4", body)


def test_cli_workers_serving_different_experiment_files_are_said(tmp_path, monkeypatch):
    """Two workers on two files with the same arm names (a change restarted on one of them) put a
    third of the users in another arm, and the report summed them without a word."""
    old = tmp_path / "old.toml"
    old.write_text(TWO_ARMS_TOML)
    new = tmp_path / "new.toml"  # the arms' order changed: half the users change arm
    new.write_text('experiment = "x"\ncontrol = "pop"\n[[arms]]\nname = "blend"\nshare = 0.5\n'
                   '[[arms]]\nname = "pop"\nshare = 0.5\n')
    e_old, e_new = load_experiment(old), load_experiment(new)
    reg = CollectorRegistry()
    Metrics(reg).experiment_info.labels(e_old.name, e_old.digest).set(1)
    assert (e_old.name, e_old.digest) in report_module.experiments_in_metrics_text(generate_latest(reg).decode())
    assert e_old.digest != e_new.digest and e_old.digest == load_experiment(old).digest
    counts = {"pop": {"lists": 10, "clicked_lists": 1}, "blend": {"lists": 10, "clicked_lists": 2}}
    monkeypatch.setenv("STREAMREC_VARIANTS", str(old))
    with _Server({"/metrics": _worker_route(counts, e_old)}) as w1, \
            _Server({"/metrics": _worker_route(counts, e_new)}) as w2, \
            _Server({"/metrics": _worker_route(counts, e_old)}) as w3:
        mixed = runner.invoke(cli.app, ["report", "--metrics", w1.url, "--metrics", w2.url, "--json-output"])
        same = runner.invoke(cli.app, ["report", "--metrics", w1.url, "--metrics", w3.url, "--json-output"])
        monkeypatch.setenv("STREAMREC_VARIANTS", str(new))
        other = runner.invoke(cli.app, ["report", "--metrics", w1.url, "--metrics", w3.url])
    assert mixed.exit_code == 0, mixed.output
    warnings = json.loads(mixed.stdout)["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("the workers serve 2 different experiment files ('x' digest ")
    assert f"{w1.url}/metrics" in warnings[0] and f"{w2.url}/metrics" in warnings[0]
    assert json.loads(same.stdout)["warnings"] == []
    assert other.exit_code == 0, other.output
    assert f"warning: STREAMREC_VARIANTS here is experiment 'x' digest {e_new.digest}, which no worker serves" \
        in other.output


def test_cli_prometheus_says_when_its_workers_serve_different_experiment_files():
    answers = {"streamrec_experiment_lists_total": [_sample(10, variant="A")],
               "streamrec_experiment_info": [_sample(2, experiment="x", digest="0a0a0a0a"),
                                             _sample(1, experiment="x", digest="0b0b0b0b")]}
    with _Server({"/api/v1/query": _prometheus_route(answers)}) as prom:
        result = runner.invoke(cli.app, ["report", "--prometheus", prom.url, "--json-output", "--control", "A"])
        queries = [urllib.parse.parse_qs(urllib.parse.urlsplit(p).query)["query"][0] for p in prom.requests]
    assert result.exit_code == 0, result.output
    assert "count by (experiment, digest) (streamrec_experiment_info)" in queries
    assert json.loads(result.stdout)["warnings"] == [
        "the workers serve 2 different experiment files ('x' digest 0a0a0a0a on 2 worker(s); 'x' digest 0b0b0b0b on "
        "1 worker(s)): a user may be in one arm on one worker and in another on the next, and the counters summed "
        "here mix them; run every worker on the same file, restarted together"]


def test_columns_after_a_chinese_arm_name_line_up_in_a_terminal():
    # len() counted 对照组 as 3 columns; a terminal shows 6, so every column after it was 3 off
    table = format_table(summarize({"对照组": {"lists": 100, "clicked_lists": 10}, "B": {"lists": 100, "clicked_lists": 12}},
                                   "对照组"))
    head, b, zh = table.splitlines()[:3]
    assert display_width(zh[:zh.index("lists")]) == display_width(b[:b.index("lists")]) == head.index("denominator")
