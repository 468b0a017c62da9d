"""``streamrec report``: read an experiment's per-variant counters and say which arm wins.

Registered by the stream's CLI as ``app.command("report")(stream.report.report)``. The counters
come from one source: the workers' ``/metrics`` (summed over several workers), the Prometheus
HTTP API (``sum by (variant)``), or the JSON a replay writes (``streamrec evaluate --variants``).

Per variant it prints the denominator (impressions where the site reported any, else the
published lists, labelled as such), CTR = clicked lists / denominator, conversion = purchased
lists / denominator, live HR@20 = hits{k="20"} / judged, each with a 95% Wilson score interval,
revenue per list = revenue / denominator, and each rate's relative lift against the control with
a 95% interval for the ratio of two proportions: the log-ratio (Katz) interval
``exp(log(r) +- z * sqrt(1/k1 - 1/n1 + 1/k2 - 1/n2))``, minus 1 (when a count is 0 or all of its
denominator: with 0.5 added to each cell, k + 0.5 of n + 1; a variant's count of 0 has -100% as its
lower bound). A control rate of 0 has no lift: "n/a"; nor has a CTR or conversion per impression
against one per list (impressions reported for some variants only).

Users, not lists, are what is split between arms, and one user's lists go together. So the workers
count again per group of users (``streamrec_experiment_groups_total``: 32 groups by a hash of the
user's id, stream/experiments.py), and both intervals use the effective counts ``k / deff`` of
``n / deff``, ``deff`` the design effect the groups' spread shows (:func:`design_effect`), with
Student's t of ``G - 1`` degrees of freedom (``G`` groups with counts) in place of z. That is the
delta-method (linearisation) interval with groups of users as the independent units; without the
groups' counters (older workers) each list is taken as independent, and the table says so.

The pure parts (parsing and the statistics) are functions apart from the I/O:

>>> p, lo, hi = wilson(81, 263)
>>> round(p, 4), round(lo, 4), round(hi, 4)
(0.308, 0.2553, 0.3662)
>>> lift, lo, hi = ratio_ci(10, 100, 5, 100)
>>> round(lift, 4), round(lo, 4), round(hi, 4)
(1.0, -0.291, 4.6421)
"""

from __future__ import annotations

import html
import http.client
import json
import math
import os
import re
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from statistics import NormalDist
from typing import Annotated, Any

import typer
from prometheus_client.parser import text_string_to_metric_families

from stream.errors import ServiceUnavailable, StreamrecError, clipped, resolved
from stream.experiments import GROUP_FIELDS, Experiment, load_experiment

#: the two-sided 95% normal quantile
Z95 = 1.959963984540054

#: counter field -> the worker's Prometheus counter (all labelled by ``variant``)
COUNTERS = {
    "lists": "streamrec_experiment_lists_total",
    "users": "streamrec_experiment_users_total",
    "impressions": "streamrec_experiment_impressions_total",
    "clicked_lists": "streamrec_experiment_clicked_lists_total",
    "clicks": "streamrec_experiment_clicks_total",
    "purchased_lists": "streamrec_experiment_purchased_lists_total",
    "purchases": "streamrec_experiment_purchases_total",
    "revenue": "streamrec_experiment_revenue_total",
    "judged": "streamrec_experiment_judged_total",
}
#: hits, labelled by ``variant`` and ``k``
HITS = "streamrec_experiment_hits_total"
#: the same counts per group of users, labelled by ``variant``, ``group`` and ``field`` (stream/experiments.py,
#: VARIANCE_GROUPS): the intervals take each user's lists together from them
GROUPS = "streamrec_experiment_groups_total"
HIT_KS = ("1", "5", "10", "20")
#: the gauge of a worker serving an experiment, labelled by ``experiment`` and ``digest`` (:attr:`Experiment.digest`)
INFO = "streamrec_experiment_info"
#: what a table says of intervals worked out without the groups' counts (an A/A split of one arm's users
#: excluded 0 % in 27-46 % of splits so, docs/operations.md): counters of workers before the groups were kept
INDEPENDENCE = ("the intervals take each list as independent ({why}); one user's lists are not, so they are too "
                "narrow where users have many lists each (docs/operations.md, \"What the intervals assume\")")
#: INDEPENDENCE's why: counters without groups, or groups that did not serve (a warning per rate says why)
NO_GROUPS = "the counters have no groups of users: workers of an older version"
GROUPS_UNUSED = "the counters' groups of users could not serve: the warnings say why"
#: the end of the warning of a rate whose groups could not serve
NOT_GROUPED = "its interval takes each list as independent, too narrow"
#: what a table says of intervals worked out from the groups
GROUPED = ("the intervals count each user's lists together: from the spread of up to {groups} groups of users per arm "
           "(a hash of the user's id), with Student's t (docs/operations.md, \"What the intervals assume\")")
#: a sample-ratio check's p-value below which the report warns that users are not split as the
#: shares say (a broken split or lost counts: the lifts are not to be read); 1 in 1,000, as is usual
SRM_ALPHA = 0.001
#: the fewest users an arm is expected to have for the check: below it the chi-square is no guide
SRM_MIN_EXPECTED = 5
#: what a table says when some rates' intervals are worked out from the groups and others (named in the warnings) not
PARTLY = ("some intervals count each user's lists together (from the spread of up to {groups} groups of users per arm); "
          "the others, named in the warnings, take each list as independent, too narrow (docs/operations.md, "
          "\"What the intervals assume\")")
#: the rates reported, in order: key, label
RATES = (("ctr", "CTR"), ("conversion", "conversion"), ("hr20", "HR@20"))
_NO_COUNTERS = ("no streamrec_experiment_* counters at {where}: is it a worker's (serve exports none), and has "
                "a worker published a list since it started? (without STREAMREC_VARIANTS they count under the "
                "variant \"default\")")


class ReportError(StreamrecError):
    """The source answered, but not with an experiment's counters (or the control is unknown)."""


# --------------------------------------------------------------------------- counters


def empty_counters() -> dict[str, Any]:
    """One variant's counters, all zero.

    >>> empty_counters()["hits"]
    {'1': 0, '5': 0, '10': 0, '20': 0}
    """
    out: dict[str, Any] = {field: 0 for field in COUNTERS}
    out["revenue"] = 0.0
    out["hits"] = {k: 0 for k in HIT_KS}
    out["groups"] = {}  # field -> {group: count}, from workers that keep them (GROUPS)
    return out


def _number(field: str, value: float, as_float: bool = False) -> int | float:
    """``value`` as a count (revenue, and ``as_float``: as a float); a ValueError unless it is a finite number >= 0.
    A whole number (a replay's JSON) stays exact: through a float, counts past 2**53 lost their last units.

    >>> _number("lists", 2**53 + 1) - 2**53
    1
    """
    shown = clipped(repr(value), 40)
    if isinstance(value, bool):  # JSON's true is no count
        raise ValueError(f"{field} is {shown}, not a number")
    try:
        x = float(value)
    except OverflowError:  # an integer too large for a float
        x = math.inf
    except (TypeError, ValueError):
        raise ValueError(f"{field} is {shown}, not a number") from None
    if not math.isfinite(x):
        raise ValueError(f"{field} is {shown}, not a finite number a float can hold")
    if x < 0:
        raise ValueError(f"{field} is {shown}, a count below 0 (counters only grow)")
    if field == "revenue" or as_float:
        return x
    return value if isinstance(value, int) else int(round(x))


def _add(counters: dict[str, dict[str, Any]], variant: str, field: str, value: float, k: str | None = None) -> None:
    c = counters.setdefault(variant, empty_counters())
    try:
        # a group's count stays a float: increase() of a --window gives fractions, and rounding
        # each of 32 groups moved their sum by up to 16 and their spread too
        number = _number(f"groups.{k}" if field == "groups" else field, value, as_float=field == "groups")
    except ValueError as exc:
        raise ReportError(f"variant {variant!r}: {exc}") from None
    if field == "hits":
        c["hits"][k] = c["hits"].get(k, 0) + number
    elif field == "groups":  # k: "FIELD/GROUP"
        name, _, group = str(k).partition("/")
        # ASCII digits only, and few: "²" passes isdigit() but not int(), and 5000 digits are past int()'s limit
        if name not in GROUP_FIELDS or not re.fullmatch(r"[0-9]{1,9}", group):
            return  # a field or group this version does not know: not used
        counts = c["groups"].setdefault(name, {})
        counts[int(group)] = counts.get(int(group), 0) + number
    else:
        c[field] += number


def counters_from_metrics_text(text: str) -> dict[str, dict[str, Any]]:
    """Per-variant counters from a worker's ``/metrics`` (Prometheus text format); ``{}`` when
    it exports none. Samples of one variant in several series (another label) are summed.

    >>> text = 'streamrec_experiment_lists_total{variant="A"} 7.0\\n'
    >>> counters_from_metrics_text(text)["A"]["lists"]
    7
    """
    by_name = {name: field for field, name in COUNTERS.items()}
    counters: dict[str, dict[str, Any]] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as exc:
        raise ReportError(f"not Prometheus text format: {exc}") from None
    for family in families:
        for sample in family.samples:
            variant = sample.labels.get("variant")
            if variant is None:
                continue
            if sample.name in by_name:
                _add(counters, variant, by_name[sample.name], sample.value)
            elif sample.name == HITS and "k" in sample.labels:
                _add(counters, variant, "hits", sample.value, sample.labels["k"])
            elif sample.name == GROUPS and "group" in sample.labels and "field" in sample.labels:
                _add(counters, variant, "groups", sample.value, f"{sample.labels['field']}/{sample.labels['group']}")
    return counters


def experiments_in_metrics_text(text: str) -> set[tuple[str, str]]:
    """The (experiment, digest) pairs of a worker's ``/metrics`` (``streamrec_experiment_info``):
    none from a worker without STREAMREC_VARIANTS, or of a version that did not export it.

    >>> experiments_in_metrics_text('streamrec_experiment_info{experiment="x",digest="0a1b2c3d"} 1.0\\n')
    {('x', '0a1b2c3d')}
    """
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError:
        return set()  # said by counters_from_metrics_text
    return {(s.labels["experiment"], s.labels["digest"]) for f in families for s in f.samples
            if s.name == INFO and "experiment" in s.labels and "digest" in s.labels and s.value > 0}


def experiment_warnings(seen: Mapping[tuple[str, str], list[str]], experiment: Experiment | None) -> list[str]:
    """Warnings when the workers serve more than one experiment file (their ``seen`` (experiment,
    digest) pairs, each with where it was seen), or one other than ``experiment`` (the report's
    STREAMREC_VARIANTS): a user is then in one arm on one worker and in another on the next, and
    the counters summed here mix the two splits.

    >>> print(*experiment_warnings({("x", "aa"): ["w1"], ("x", "bb"): ["w2"]}, None))
    the workers serve 2 different experiment files ('x' digest aa on w1; 'x' digest bb on w2): a user may be in one arm on one worker and in another on the next, and the counters summed here mix them; run every worker on the same file, restarted together
    """
    out = []
    if len(seen) > 1:
        parts = "; ".join(f"{name!r} digest {digest} on {', '.join(where)}" for (name, digest), where in sorted(seen.items()))
        out.append(f"the workers serve {len(seen)} different experiment files ({parts}): a user may be in one arm on "
                   "one worker and in another on the next, and the counters summed here mix them; run every worker "
                   "on the same file, restarted together")
    if experiment is not None and seen and (experiment.name, experiment.digest) not in seen:
        out.append(f"STREAMREC_VARIANTS here is experiment {experiment.name!r} digest {experiment.digest}, which no "
                   "worker serves: the arms and the control are taken from a file the workers do not run")
    return out


def merge_counters(parts: Iterable[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Sum several sources' per-variant counters (several workers).

    >>> a = {"A": {**empty_counters(), "lists": 2}}
    >>> merge_counters([a, a])["A"]["lists"]
    4
    """
    out: dict[str, dict[str, Any]] = {}
    for part in parts:
        for variant, c in part.items():
            for field in COUNTERS:
                _add(out, variant, field, c.get(field, 0))
            for k, v in c.get("hits", {}).items():
                _add(out, variant, "hits", v, str(k))
            for name, counts in (c.get("groups") or {}).items():
                for g, v in counts.items():
                    _add(out, variant, "groups", v, f"{name}/{g}")
    return out


def counters_from_json(data: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], str | None]:
    """The counters of a replay's JSON (``{"control": "A", "variants": {"A": {...}}}``) and its
    control (None when it names none). Missing counters are 0.

    >>> counters, control = counters_from_json({"control": "A", "variants": {"A": {"lists": 3, "hits": {"20": 1}}}})
    >>> control, counters["A"]["lists"], counters["A"]["hits"]["20"], counters["A"]["clicks"]
    ('A', 3, 1, 0)
    """
    if not isinstance(data, Mapping) or not isinstance(data.get("variants"), Mapping):
        raise ReportError('the JSON has no "variants" object: expected {"control": ..., "variants": {NAME: {...}}}')
    control = data.get("control")
    if control is not None and not isinstance(control, str):
        raise ReportError(f'"control" must be a variant name, not {control!r}')
    counters: dict[str, dict[str, Any]] = {}
    for variant, c in data["variants"].items():
        if not isinstance(c, Mapping):
            raise ReportError(f"variant {variant!r}: expected an object of counters, got {c!r}")
        counters[str(variant)] = empty_counters()
        try:
            for field in COUNTERS:
                _add(counters, str(variant), field, c.get(field, 0) or 0)
            hits = c.get("hits", {}) or {}
            if not isinstance(hits, Mapping):
                raise TypeError(f'"hits" must be an object keyed by k, got {hits!r}')
            for k, v in hits.items():
                _add(counters, str(variant), "hits", v, str(k))
            groups = c.get("groups", {}) or {}
            if not isinstance(groups, Mapping):
                raise TypeError(f'"groups" must be an object keyed by field, got {clipped(repr(groups), 60)}')
            for name, counts in groups.items():
                if isinstance(counts, list):  # as the replay writes them: one count per group, in order
                    counts = dict(enumerate(counts))
                if not isinstance(counts, Mapping):
                    raise TypeError(f'"groups"."{name}" must be a list of counts, got {clipped(repr(counts), 60)}')
                for g, v in counts.items():
                    _add(counters, str(variant), "groups", v, f"{name}/{g}")
        except (TypeError, ValueError) as exc:
            raise ReportError(f"variant {variant!r}: a counter is not a number ({exc})") from None
    return counters, control


def with_arms(counters: Mapping[str, Mapping[str, Any]], arms: Iterable[str], experiment: str
              ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """``counters`` with every arm of the workers' experiment (``STREAMREC_VARIANTS``): a worker
    exports a variant's counters from its first list on, so an arm without one yet is added with
    zeros (its rates n/a), not missing (a control without traffic was "unknown control"); and
    warnings naming the counters' variants that are not arms of it (workers that run another
    experiment file, or none: "default").

    >>> counters, warnings = with_arms({"blend": {"lists": 5}, "default": {"lists": 2}}, ["pop", "blend"], "x")
    >>> sorted(counters), counters["pop"]["lists"]
    (['blend', 'default', 'pop'], 0)
    >>> print(*warnings)
    variant(s) default are not arms of STREAMREC_VARIANTS's experiment 'x' (pop, blend): counted by workers that run another experiment file, or none ("default")
    """
    arms = list(arms)
    out = {name: dict(c) for name, c in counters.items()}
    for name in arms:
        out.setdefault(name, empty_counters())
    strangers = sorted(set(counters) - set(arms))
    warnings = [f"variant(s) {', '.join(strangers)} are not arms of STREAMREC_VARIANTS's experiment {experiment!r} "
                f"({', '.join(arms)}): counted by workers that run another experiment file, or none (\"default\")"
                ] if strangers else []
    return out, warnings


# --------------------------------------------------------------------------- statistics


def wilson(k: float, n: float, z: float = Z95) -> tuple[float, float, float]:
    """The rate ``k/n`` and its Wilson score interval (95% by default): the ``p`` whose score
    test ``|k/n - p| <= z * sqrt(p(1-p)/n)`` does not reject. ``n`` must be positive and
    ``0 <= k <= n``.

    >>> [round(x, 4) for x in wilson(0, 10)]
    [0.0, 0.0, 0.2775]
    """
    if n <= 0:
        raise ValueError(f"wilson: n must be positive, got {n}")
    if not 0 <= k <= n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    p = k / n  # exact for whole numbers of any size
    nf = float(n)  # and the rest in floats: 4 * n * n of a whole n past 1e154 was an OverflowError
    z2 = z * z
    denom = 1 + z2 / nf
    center = (p + z2 / (2 * nf)) / denom
    half = z * math.sqrt(p * (1 - p) / nf + z2 / (4 * nf * nf)) / denom
    lo = 0.0 if k == 0 else min(p, max(0.0, center - half))  # exact at the edges, not 1e-18 off
    hi = 1.0 if k == n else max(p, min(1.0, center + half))
    return p, lo, hi


def t_quantile(df: int, p: float = 0.975) -> float:
    """Student's t quantile with ``df`` degrees of freedom: exact for 1 and 2, else the
    Cornish-Fisher expansion (Abramowitz & Stegun 26.7.5, to 1/df^4), within 0.2% from 3 on.

    >>> [round(t_quantile(df), 3) for df in (1, 2, 5, 10, 31)]
    [12.706, 4.303, 2.57, 2.228, 2.04]
    """
    if df < 1:
        raise ValueError(f"t_quantile: df must be at least 1, got {df}")
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3 + g4 / df ** 4


def _adds_up(groups: Mapping[int, float], total: float) -> bool:
    """The groups' counts sum to ``total``, give or take what rounding (half a count per group)
    and Prometheus's ``increase()`` (extrapolated per series) move."""
    return abs(sum(groups.values()) - total) <= max(0.5 * len(groups), 0.01 * total)


def grouped_variance(y: float, n: float, y_groups: Mapping[int, float], n_groups: Mapping[int, float]
                     ) -> tuple[float, int]:
    """The variance of the ratio ``y / n`` (a rate, or revenue per list) when whole groups of
    users are the independent units, and how many groups ``G`` hold any count: the linearisation
    (delta method) estimate over the groups, ``G / (G - 1) * sum_g (y_g - r n_g)^2 / n^2``. A
    ValueError when fewer than 2 groups hold counts, or the groups do not add up to ``y`` and
    ``n`` (counters from workers of an older version, which kept no groups, among them).

    >>> var, g = grouped_variance(3, 6, {0: 0, 1: 3}, {0: 3, 1: 3})
    >>> round(var, 4), g
    (0.25, 2)
    """
    groups = [g for g in set(y_groups) | set(n_groups) if y_groups.get(g, 0) or n_groups.get(g, 0)]
    if n <= 0:
        raise ValueError("no denominator")
    if not (_adds_up(y_groups, y) and _adds_up(n_groups, n)):
        raise ValueError(f"its groups' counts add up to {sum(y_groups.values()):g} of {sum(n_groups.values()):g}, not "
                         f"the totals' {y:g} of {n:g} (workers of an older version, which keep no groups, among them?)")
    if len(groups) < 2:
        raise ValueError(f"its counts are in {len(groups)} group of users, too few to measure their spread")
    r, nf = y / n, float(n)
    try:  # each residual over n before it is squared: n * n, and a residual squared, overflowed past 1e154
        ss = math.fsum(((y_groups.get(g, 0) - r * n_groups.get(g, 0)) / nf) ** 2 for g in groups)
    except OverflowError:
        ss = math.inf
    var = len(groups) / (len(groups) - 1) * ss
    if not math.isfinite(var):
        raise ValueError("its counts are too large for a float to measure their spread")
    return var, len(groups)


def design_effect(k: float, n: float, k_groups: Mapping[int, float], n_groups: Mapping[int, float]
                  ) -> tuple[float, int]:
    """How many times the variance of the rate ``k / n`` with whole groups of users as the units
    (:func:`grouped_variance`) exceeds the binomial one, ``p (1 - p) / n``, of ``n`` independent
    trials, at least 1 (an estimate below it is taken as noise, not as users less alike than
    coin flips); 1 for a rate of 0 or 1, whose groups do not vary. With ``G``, the groups: the
    intervals use ``k / deff`` of ``n / deff`` and Student's t with ``G - 1`` degrees of freedom.

    >>> deff, g = design_effect(50, 100, {0: 25, 1: 0, 2: 25}, {0: 25, 1: 50, 2: 25})
    >>> round(deff, 2), g
    (56.25, 3)
    """
    var, groups = grouped_variance(k, n, k_groups, n_groups)
    p = k / n
    if p <= 0 or p >= 1:
        return 1.0, groups
    deff = max(1.0, var * float(n) / (p * (1 - p)))  # not var / (p (1 - p) / n): that underflowed to 0 past n = 1e154
    if not (math.isfinite(deff) and n / deff > 0):
        raise ValueError("its counts are too large for a float to measure their spread")
    return deff, groups


def ratio_ci(k1: float, n1: float, k2: float, n2: float, z: float = Z95) -> tuple[float, float, float] | None:
    """Relative lift of rate ``k1/n1`` over ``k2/n2`` (the control), ``r - 1`` with ``r`` the
    ratio of the two rates, and its 95% log-ratio (Katz) interval, for two independent
    proportions: ``exp(log r +- z * sqrt(1/k1 - 1/n1 + 1/k2 - 1/n2)) - 1``. When a cell of the
    two arms' 2x2 table is 0 (a count of 0, or a count equal to its ``n``: every list clicked,
    where the formula's variance term vanishes and 1 of 1 against 1 of 1 was "+0.0% [+0.0%,
    +0.0%]") the interval is that of the Haldane-Anscombe correction, 0.5 added to each cell
    (``k + 0.5`` of ``n + 1``), widened to hold the lift; when ``k1`` is 0 the lift is -100%,
    and the lower bound too. None when the control's rate is 0 (or either ``n`` is 0): a lift
    over nothing is undefined.

    >>> ratio_ci(3, 10, 0, 10) is None
    True
    >>> ratio_ci(0, 10, 3, 10)[:2]
    (-1.0, -1.0)
    >>> [round(x, 4) for x in ratio_ci(1, 1, 1, 1)]
    [0.0, -0.6775, 2.1006]
    >>> ratio_ci(0, 2, 2, 1.7e308)[2]
    inf
    """
    if n1 <= 0 or n2 <= 0 or k2 <= 0:
        return None
    lift = (k1 / n1) / (k2 / n2) - 1
    corrected = k1 == 0 or k1 >= n1 or k2 >= n2  # a cell of 0: log(0) and 1/0, or a variance of 0
    if corrected:
        k1, n1, k2, n2 = k1 + 0.5, n1 + 1, k2 + 0.5, n2 + 1
    log_r = math.log((k1 / n1) / (k2 / n2))
    se = math.sqrt(max(0.0, 1 / k1 - 1 / n1 + 1 / k2 - 1 / n2))
    # counts no experiment reaches (1e308 lists) put a bound past a float: infinite, not an OverflowError
    lo, hi = (math.exp(x) - 1 if x < 709.0 else math.inf for x in (log_r - z * se, log_r + z * se))
    if corrected:  # the corrected ratio is not the lift itself: the interval holds it
        lo, hi = min(lo, lift), max(hi, lift)
    return lift, lo, hi


def _rate(k: int, n: int, warnings: list[str], what: str, k_groups: Mapping[int, float] | None = None,
          n_groups: Mapping[int, float] | None = None) -> dict[str, Any] | None:
    """The rate ``k / n`` and its interval: with the groups' counts, of ``k / deff`` of ``n / deff``
    (:func:`design_effect`) with Student's t; without them (or when they do not serve), of each
    trial as independent (``design_effect`` None)."""
    if n <= 0:
        return None
    if k > n:  # a rate "capped at 1" was a 100% no experiment showed, and a lift from it
        warnings.append(f"{what}: {k} exceeds its denominator {n}, so it has no rate (n/a): the counters cover "
                        "different periods (a worker restarted after publishing lists later clicked: read "
                        "--prometheus with --window) or the site reported impressions for only some lists")
        return None
    deff, groups, z = None, None, Z95
    if k_groups or n_groups:
        try:
            deff, groups = design_effect(k, n, k_groups or {}, n_groups or {})
            z = t_quantile(groups - 1)
        except ValueError as exc:
            warnings.append(f"{what}: {exc}; {NOT_GROUPED}")
    p, lo, hi = wilson(k / deff, n / deff, z) if deff is not None else wilson(k, n)
    return {"k": k, "n": n, "rate": k / n, "ci": [lo, hi], "design_effect": deff, "groups": groups}


def _revenue_ci(revenue: float, n: int, groups: Mapping[str, Mapping[int, float]], kind: str) -> list[float] | None:
    """The 95% interval of revenue per list (or impression) from the groups' counts (None without
    them, or without revenue: nothing varies): mean +- t * its grouped standard error, from 0 up."""
    if n <= 0 or not revenue or "revenue" not in groups:
        return None
    try:
        var, g = grouped_variance(revenue, n, groups.get("revenue", {}), groups.get(kind, {}))
    except ValueError:
        return None
    half = t_quantile(g - 1) * math.sqrt(var)
    mean = revenue / n
    return [max(0.0, mean - half), mean + half]


def _lift(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[float, float, float] | None:
    """:func:`ratio_ci` of rate ``a`` over rate ``b``: of their effective counts with Student's t
    (the fewer groups') when both have a design effect, else of the counts as independent."""
    if a["design_effect"] is not None and b["design_effect"] is not None:
        da, db = a["design_effect"], b["design_effect"]
        got = ratio_ci(a["k"] / da, a["n"] / da, b["k"] / db, b["n"] / db, t_quantile(min(a["groups"], b["groups"]) - 1))
        if got is not None:
            return (a["k"] / a["n"]) / (b["k"] / b["n"]) - 1, got[1], got[2]
        return None
    return ratio_ci(a["k"], a["n"], b["k"], b["n"])


def summarize(counters: Mapping[str, Mapping[str, Any]], control: str | None = None,
              shares: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Each variant's rates with Wilson intervals and their lift against ``control``.

    ``control`` defaults to a variant named "control", else the first in sorted order; an
    unknown one raises :class:`ReportError`. The denominator of a variant's CTR, conversion and
    revenue per list is its impressions when it has any, else its published lists
    (``denominator.kind`` says which); the CTR and conversion lifts of a variant whose kind is
    not the control's are None (a warning says why).

    >>> s = summarize({"A": {"lists": 100, "clicked_lists": 10}, "B": {"lists": 100, "clicked_lists": 20}})
    >>> s["control"], round(s["variants"]["B"]["lift"]["ctr"]["lift"], 6)
    ('A', 1.0)
    >>> s = summarize({"A": {"lists": 100, "clicked_lists": 10}, "B": {"lists": 100, "impressions": 50, "clicked_lists": 10}})
    >>> s["variants"]["A"]["denominator"], s["variants"]["B"]["denominator"], s["variants"]["B"]["lift"]["ctr"]
    ({'kind': 'lists', 'n': 100}, {'kind': 'impressions', 'n': 50}, None)
    """
    if not counters:
        raise ReportError("no variants in the counters")
    names = sorted(counters)
    warnings: list[str] = []
    if control is None:
        control = "control" if "control" in counters else names[0]
        if control != "control" and len(names) > 1:  # a guess: the workers' file may name another
            warnings.append(f"the control is {control}, the first variant by name: the experiment's own `control` "
                            "is not known here. Give --control NAME, or set STREAMREC_VARIANTS to the workers' "
                            "experiment file")
    if control not in counters:
        raise ReportError(f"unknown control {control!r}: the variants are {', '.join(names)} (a variant that has "
                          "published no list yet has no counters)")
    variants: dict[str, Any] = {}
    for name in names:
        c = {**empty_counters(), **counters[name]}
        hits = {str(k): v for k, v in (c.get("hits") or {}).items()}
        kind = "impressions" if c["impressions"] > 0 else "lists"
        n = c[kind]
        g = c.get("groups") or {}
        variants[name] = {
            "denominator": {"kind": kind, "n": n},
            "users": c["users"], "lists": c["lists"], "impressions": c["impressions"],
            "clicked_lists": c["clicked_lists"], "clicks": c["clicks"],
            "purchased_lists": c["purchased_lists"], "purchases": c["purchases"],
            "revenue": c["revenue"], "judged": c["judged"], "hits": hits,
            "ctr": _rate(c["clicked_lists"], n, warnings, f"{name} CTR", g.get("clicked_lists"), g.get(kind)),
            "conversion": _rate(c["purchased_lists"], n, warnings, f"{name} conversion", g.get("purchased_lists"),
                                g.get(kind)),
            "hr20": _rate(hits.get("20", 0), c["judged"], warnings, f"{name} HR@20", g.get("hits20"), g.get("judged")),
            "revenue_per_list": c["revenue"] / n if n > 0 else None,
            "revenue_per_list_ci": _revenue_ci(c["revenue"], n, g, kind),
        }
    base = variants[control]
    base_kind = base["denominator"]["kind"]
    unlike = [name for name in names if name != control and base["denominator"]["n"] > 0
              and variants[name]["denominator"]["n"] > 0 and variants[name]["denominator"]["kind"] != base_kind]
    if unlike:  # a rate per impression over one per list is no lift: n/a, not a number
        other = "list" if base_kind == "impressions" else "impression"
        warnings.append(f"the CTR and conversion lifts of {', '.join(unlike)} are n/a: their rates are per {other}, "
                        f"the control's ({control}) per {base_kind.rstrip('s')} (the site reported impressions for "
                        "only some variants), and a lift would compare unlike rates")
    for name in names:
        v = variants[name]
        if name == control:
            v["lift"] = None
            continue
        v["lift"] = {}
        for key, _ in RATES:
            a, b = v[key], base[key]
            comparable = key == "hr20" or name not in unlike  # HR@20 is per judged event in every variant
            got = _lift(a, b) if a and b and comparable else None
            v["lift"][key] = None if got is None else {"lift": got[0], "ci": [got[1], got[2]]}
    rates = [v[key] for v in variants.values() for key, _ in RATES if v[key] is not None]
    grouped = sorted({r["groups"] for r in rates if r["design_effect"] is not None})
    independent = any(r["design_effect"] is None for r in rates)
    how = "95% Wilson score; lift: 95% log-ratio (Katz)"
    if grouped:
        how += (f"; of the effective counts (count / design effect, from {'/'.join(map(str, grouped))} groups of "
                "users) with Student's t" + ("; some each list as independent" if independent else ""))
    ratio = sample_ratio({name: c.get("users", 0) for name, c in counters.items()}, shares) if shares else None
    if ratio is not None and ratio["p"] < SRM_ALPHA:
        parts = ", ".join(f"{name} {n:,} (expected {ratio['expected'][name]:,.0f})" for name, n in ratio["users"].items())
        warnings.append(f"sample ratio mismatch: users per arm {parts}; chi-square p = {ratio['p']:.2g} against the "
                        "arms' shares. Users are not split as the experiment says (workers on different files, an "
                        "arm whose lists fail, lost counts): find why before reading the lifts")
    return {"control": control, "interval": how, "grouped": bool(grouped) and not independent,
            "groups": max(grouped) if grouped else None, "sample_ratio": ratio, "variants": variants,
            "warnings": warnings}


def chi2_sf(x: float, df: int) -> float:
    """The chi-square distribution's upper tail, ``P(X > x)`` with ``df`` degrees of freedom: the
    regularised upper incomplete gamma ``Q(df/2, x/2)`` (its series below ``a + 1``, else its
    continued fraction, as in Numerical Recipes' ``gammq``).

    >>> [round(chi2_sf(x, df), 4) for x, df in ((3.841459, 1), (5.991465, 2), (0.0, 3), (20.0, 1))]
    [0.05, 0.05, 1.0, 0.0]
    """
    if x <= 0:
        return 1.0
    a, z = df / 2, x / 2
    lg = math.lgamma(a)
    if z < a + 1:  # the series of P, then 1 - P
        term = total = 1 / a
        n = a
        for _ in range(10_000):
            n += 1
            term *= z / n
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1 - total * math.exp(-z + a * math.log(z) - lg))
    b = z + 1 - a  # Lentz's continued fraction of Q
    c, d = 1 / 1e-300, 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return min(1.0, math.exp(-z + a * math.log(z) - lg) * h)


def sample_ratio(users: Mapping[str, float], shares: Mapping[str, float]) -> dict[str, Any] | None:
    """The sample-ratio check: the users each arm served (``streamrec_experiment_users_total``)
    against the split its shares ask for, by Pearson's chi-square with (arms - 1) degrees of
    freedom. Only the arms in ``shares`` count (the shares renormalised over those), and None
    when there are fewer than 2, or an arm is expected to have fewer than
    :data:`SRM_MIN_EXPECTED` users (the test is then no guide; counters without users, from
    workers of an older version, give none either).

    >>> r = sample_ratio({"A": 5_000, "B": 5_300}, {"A": 0.5, "B": 0.5})
    >>> round(r["chi2"], 2), r["p"] < 0.01
    (8.74, True)
    """
    arms = [name for name in shares if name in users]
    total = sum(users[name] for name in arms)
    weight = sum(shares[name] for name in arms)
    if len(arms) < 2 or total <= 0 or weight <= 0:
        return None
    expected = {name: total * shares[name] / weight for name in arms}
    if min(expected.values()) < SRM_MIN_EXPECTED:
        return None
    chi2 = sum((users[name] - expected[name]) ** 2 / expected[name] for name in arms)
    return {"users": {name: users[name] for name in arms}, "expected": expected, "chi2": chi2,
            "df": len(arms) - 1, "p": chi2_sf(chi2, len(arms) - 1)}


def summarize_experiment(counters: Mapping[str, Mapping[str, Any]], experiment: Experiment) -> dict[str, Any]:
    """:func:`summarize` of the workers' ``experiment`` (``STREAMREC_VARIANTS``): every arm
    shown (:func:`with_arms`), its control the control, the warnings of both."""
    counters, warnings = with_arms(counters, experiment.names, experiment.name)
    summary = summarize(counters, experiment.control, {arm.name: arm.share for arm in experiment.arms})
    summary["warnings"][:0] = warnings
    return summary


# --------------------------------------------------------------------------- output


def finite(value: Any) -> Any:
    """``value`` with every float that is not finite as None: JSON has no Infinity (an interval's
    bound overflows on counts near a float's largest), and a reader's parser refuses it.

    >>> finite({"lift": [0.5, float("inf")], "n": 3})
    {'lift': [0.5, None], 'n': 3}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _rate_text(r: Mapping[str, Any] | None) -> str:
    if r is None:
        return "n/a"
    return f"{_pct(r['rate'])} [{_pct(r['ci'][0])}, {_pct(r['ci'][1])}]"


def _lift_text(lift: Mapping[str, Any] | None) -> str:
    if lift is None:
        return "n/a"
    return f"{100 * lift['lift']:+.1f}% [{100 * lift['ci'][0]:+.1f}%, {100 * lift['ci'][1]:+.1f}%]"


def _revenue_text(mean: float | None, ci: list[float] | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.2f}" if ci is None else f"{mean:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def display_width(text: str) -> int:
    """The columns ``text`` takes in a terminal: 2 for a wide (CJK) character, 0 for a combining
    one, else 1 (arm names are any text: ``len`` put the columns after a Chinese name out of line).

    >>> display_width("对照组"), display_width("control"), display_width("é")
    (6, 7, 1)
    """
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _columns(rows: list[list[str]]) -> list[str]:
    widths = [max(display_width(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell + " " * (w - display_width(cell)) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def format_table(summary: Mapping[str, Any]) -> str:
    """The summary as text: one row per variant, then each variant's lift against the control.

    >>> print(format_table(summarize({"A": {"users": 4, "lists": 10, "clicked_lists": 1}})))  # doctest: +NORMALIZE_WHITESPACE
    variant      users  denominator  CTR [95% CI]            conversion [95% CI]    HR@20 [95% CI]  revenue/list
    A (control)  4      lists 10     10.00% [1.79%, 40.42%]  0.00% [0.00%, 27.75%]  n/a             0.00
    <BLANKLINE>
    the intervals take each list as independent (the counters have no groups of users: workers of an older version); one user's lists are not, so they are too narrow where users have many lists each (docs/operations.md, "What the intervals assume")
    """
    control = summary["control"]
    rows = [["variant", "users", "denominator", "CTR [95% CI]", "conversion [95% CI]", "HR@20 [95% CI]", "revenue/list"]]
    for name, v in summary["variants"].items():
        d = v["denominator"]
        rpl = v["revenue_per_list"]
        users = v.get("users", 0)  # none with lists: counters of workers before users were counted
        rows.append([f"{name} (control)" if name == control else name,
                     f"{users:,}" if users or not v["lists"] else "n/a", f"{d['kind']} {d['n']}",
                     _rate_text(v["ctr"]), _rate_text(v["conversion"]), _rate_text(v["hr20"]),
                     _revenue_text(rpl, v.get("revenue_per_list_ci"))])
    lines = _columns(rows)
    others = [name for name in summary["variants"] if name != control]
    if others:
        lines += ["", f"lift vs {control} [95% CI, log-ratio (Katz)]"]
        rows = [["variant"] + [label for _, label in RATES]]
        for name in others:
            lift = summary["variants"][name]["lift"]
            rows.append([name] + [_lift_text(lift[key]) for key, _ in RATES])
        lines += _columns(rows)
    if summary.get("grouped"):
        lines += ["", GROUPED.format(groups=summary["groups"])]
    else:  # groups: the most of any rate worked out from them (None: none was)
        # a fresh deployment's few users fill fewer than 2 groups: not workers of an older version
        unused = any(w.endswith(NOT_GROUPED) for w in summary.get("warnings", []))
        lines += ["", PARTLY.format(groups=summary["groups"]) if summary.get("groups")
                  else INDEPENDENCE.format(why=GROUPS_UNUSED if unused else NO_GROUPS)]
    for warning in summary.get("warnings", []):
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def write_chart(summary: Mapping[str, Any], path: Path) -> None:
    """One grouped bar chart, CTR, conversion and HR@20 per variant, with 95% Wilson error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["variants"])
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 2.0 + 1.2 * len(names) * len(RATES) * 0.5), 4.5))
    try:
        for i, name in enumerate(names):
            v = summary["variants"][name]
            heights, lows, highs = [], [], []
            for key, _ in RATES:
                r = v[key]
                rate = 100 * r["rate"] if r else 0.0
                heights.append(rate)
                lows.append(max(0.0, rate - 100 * r["ci"][0]) if r else 0.0)
                highs.append(max(0.0, 100 * r["ci"][1] - rate) if r else 0.0)
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(RATES))]
            label = f"{name} (control)" if name == summary["control"] else name
            ax.bar(xs, heights, width, yerr=[lows, highs], capsize=3, label=label)
        ax.set_xticks(range(len(RATES)), [label for _, label in RATES])
        ax.set_ylabel("% (bars: 95% CI)")
        kinds = sorted({v["denominator"]["kind"] for v in summary["variants"].values()})
        ax.set_title(f"experiment by variant (CTR, conversion per {' / '.join(k.rstrip('s') for k in kinds)})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- sources (I/O)


def error_text(body: bytes, reason: object) -> str:
    """What an HTTP error's body says, on one line of at most 200 characters: its words without
    markup when it is an HTML page (a URL that reached another server: a proxy, Grafana), else
    ``reason`` when it says nothing.

    >>> error_text(b"<!DOCTYPE HTML><html><head><title>Error</title></head>\\n<body><p>Message: File not found.</p></body></html>", "Not Found")
    'Error Message: File not found.'
    >>> error_text(b"", "Not Found"), error_text(b"bad query\\n", "Bad Request")
    ('Not Found', 'bad query')
    """
    text = body.decode("utf-8", "replace")
    if re.search(r"<\s*(!doctype|html|head|body)\b", text, re.IGNORECASE):
        text = re.sub(r"<(script|style)\b.*?</\1\s*>", " ", text, flags=re.IGNORECASE | re.DOTALL)
        text = html.unescape(re.sub(r"<[^>]*>", " ", text))
    return clipped(" ".join(text.split()), 200) or str(reason)


def _get(url: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (the user's URL)
            return resp.read()
    except urllib.error.HTTPError as exc:  # its body was quoted as it came: an HTML page over 11 lines
        raise ServiceUnavailable(f"{url} answered HTTP {exc.code}: {error_text(exc.read(), exc.reason)}") from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:  # HTTPException: a bad URL, not HTTP
        reason = getattr(exc, "reason", exc)
        raise ServiceUnavailable(f"cannot read {url}: {reason}") from None


def metrics_url(url: str) -> str:
    """A worker's address as its metrics URL: ``/metrics`` is added when the URL has no path.

    >>> metrics_url("http://w1:9464"), metrics_url("http://w1:9464/metrics")
    ('http://w1:9464/metrics', 'http://w1:9464/metrics')
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:  # an unclosed [ of an IPv6 address
        raise ReportError(f"{url!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https"):  # 127.0.0.1:9464 was "unknown url type: 127.0.0.1"
        raise ReportError(f"{url!r} is not an http:// URL: a worker's metrics are at http://HOST:PORT, e.g. "
                          f"http://{url.split('://', 1)[-1]}")
    if parts.path in ("", "/"):
        parts = parts._replace(path="/metrics")
    return urllib.parse.urlunsplit(parts)


def counters_from_metrics_urls(urls: list[str], timeout: float = 10.0,
                               experiments: dict[tuple[str, str], list[str]] | None = None) -> dict[str, dict[str, Any]]:
    """The counters of several workers' ``/metrics``, summed; each must export some. The
    experiments the workers serve are added to ``experiments`` (pair -> the URLs)."""
    parts = []
    seen: dict[str, str] = {}
    for given in urls:
        url = metrics_url(given)
        if url in seen:  # its counters would count twice
            raise ReportError(f"--metrics {given} is the worker {seen[url]} already names ({url}): give each worker's "
                              "URL once (their counters are summed)")
        seen[url] = given
    for url in seen:
        text = _get(url, timeout).decode("utf-8", "replace")
        counters = counters_from_metrics_text(text)
        if not counters:
            raise ReportError(_NO_COUNTERS.format(where=url))
        parts.append(counters)
        if experiments is not None:
            for pair in sorted(experiments_in_metrics_text(text)):
                experiments.setdefault(pair, []).append(url)
    return merge_counters(parts)


def prometheus_base(url: str) -> str:
    """``--prometheus``'s URL, checked: an http(s) URL with a host (``prom:9090`` alone was
    "unknown url type: prom", ``ftp://`` a DNS error and ``file://`` a read of a local file).

    >>> prometheus_base("http://prom:9090/")
    'http://prom:9090/'
    >>> prometheus_base("prom:9090")
    Traceback (most recent call last):
    ...
    stream.report.ReportError: --prometheus 'prom:9090' is not an http:// or https:// URL: the Prometheus HTTP API is at http://HOST:PORT, e.g. http://prom:9090
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:  # an unclosed [ of an IPv6 address
        raise ReportError(f"--prometheus {url!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ReportError(f"--prometheus {url!r} is not an http:// or https:// URL: the Prometheus HTTP API is at "
                          f"http://HOST:PORT, e.g. http://{url.split('://', 1)[-1].lstrip('/') or 'prometheus:9090'}")
    return url


def prometheus_query_url(base: str, query: str) -> str:
    """The instant-query URL of a Prometheus at ``base`` (with or without ``/api/v1/query``).

    >>> prometheus_query_url("http://prom:9090/", "up")
    'http://prom:9090/api/v1/query?query=up'
    """
    base = base.rstrip("/")
    if base.endswith("/api/v1/query"):
        base = base[: -len("/api/v1/query")]
    return f"{base}/api/v1/query?{urllib.parse.urlencode({'query': query})}"


def _prometheus_vector(base: str, query: str, timeout: float) -> list[dict[str, Any]]:
    url = prometheus_query_url(base, query)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (the user's URL)
            raw = resp.read()
    except urllib.error.HTTPError as exc:  # Prometheus says why in a JSON body (bad query: 400)
        raw = exc.read()
        try:
            why = str(json.loads(raw).get("error", ""))
        except (ValueError, AttributeError, RecursionError):  # AttributeError: JSON, not an object
            why = error_text(raw, exc.reason)
        raise ServiceUnavailable(f"Prometheus at {base} answered HTTP {exc.code} to {query!r}: {why}") from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:  # HTTPException: a bad URL, not HTTP
        raise ServiceUnavailable(f"cannot reach Prometheus at {base}: {getattr(exc, 'reason', exc)}") from None
    try:
        body = json.loads(raw)
    except ValueError:
        raise ReportError(f"{base} did not answer with JSON: is it the Prometheus HTTP API?") from None
    if not isinstance(body, dict) or body.get("status") != "success":
        why = body.get("error", body) if isinstance(body, dict) else body
        raise ReportError(f"Prometheus at {base} refused {query!r}: {clipped(str(why), 300)}")
    data = body.get("data") or {}
    if not isinstance(data, dict) or data.get("resultType") != "vector":
        kind = data.get("resultType") if isinstance(data, dict) else type(data).__name__
        raise ReportError(f"Prometheus at {base} answered {query!r} with a {kind}, not a vector: "
                          "is --prometheus the Prometheus HTTP API?")
    result = data.get("result") or []
    if not isinstance(result, list) or not all(isinstance(s, dict) and isinstance(s.get("metric") or {}, dict)
                                               for s in result):
        raise ReportError(f"Prometheus at {base} answered {query!r} with a vector that is not a list of series "
                          f"({{\"metric\": {{...}}, \"value\": [...]}}): {clipped(str(result), 200)}; "
                          "is --prometheus the Prometheus HTTP API?")
    return result


def counters_from_prometheus(base: str, timeout: float = 10.0, window: str | None = None) -> dict[str, dict[str, Any]]:
    """Per-variant counters summed over every worker Prometheus scrapes: one instant query per
    counter, ``sum by (variant) (NAME)`` (``sum by (variant, k)`` for the hits, ``sum by (variant,
    group, field)`` for the groups' counts); with ``window``
    (a PromQL duration such as ``7d``) what they counted over it,
    ``sum by (variant) (increase(NAME[window]))``, which a worker's restart does not reset."""
    counters: dict[str, dict[str, Any]] = {}

    def of(name: str) -> str:
        return f"increase({name}[{window}])" if window else name

    queries = [(field, f"sum by (variant) ({of(name)})") for field, name in COUNTERS.items()]
    queries.append(("hits", f"sum by (variant, k) ({of(HITS)})"))
    queries.append(("groups", f"sum by (variant, group, field) ({of(GROUPS)})"))
    for field, query in queries:
        for series in _prometheus_vector(base, query, timeout):
            labels = series.get("metric") or {}
            variant = labels.get("variant")
            if variant is None or (field == "hits" and "k" not in labels) or \
                    (field == "groups" and ("group" not in labels or "field" not in labels)):
                continue
            try:
                value = float(series["value"][1])
            except (KeyError, IndexError, TypeError, ValueError):
                raise ReportError(f"Prometheus at {base}: a sample of {query!r} has no value: {series}") from None
            if math.isnan(value):
                continue
            _add(counters, variant, field, value,
                 f"{labels['field']}/{labels['group']}" if field == "groups" else labels.get("k"))
    if not counters:
        raise ReportError(_NO_COUNTERS.format(where=base))
    return counters


def experiments_from_prometheus(base: str, timeout: float = 10.0, window: str | None = None
                                ) -> dict[tuple[str, str], list[str]]:
    """The (experiment, digest) pairs the workers Prometheus scrapes serve (over ``window`` too,
    when given: the files whose counters the window's increase sums), each with how many workers."""
    of = f"max_over_time({INFO}[{window}])" if window else INFO
    out: dict[tuple[str, str], list[str]] = {}
    for series in _prometheus_vector(base, f"count by (experiment, digest) ({of})", timeout):
        labels = series.get("metric") or {}
        if "experiment" in labels and "digest" in labels:
            try:
                n = int(float(series["value"][1]))
            except (KeyError, IndexError, TypeError, ValueError):
                n = 0
            out[(str(labels["experiment"]), str(labels["digest"]))] = [f"{n} worker(s)"]
    return out


def shares_from_json(data: Mapping[str, Any]) -> dict[str, float] | None:
    """The arms' traffic shares a replay's JSON names (``"shares"``, as ``streamrec evaluate
    --variants`` writes them), for the sample-ratio check; None when it names none or they are
    not positive numbers.

    >>> shares_from_json({"shares": {"A": 0.5, "B": 0.5}}), shares_from_json({"shares": {"A": "half"}})
    ({'A': 0.5, 'B': 0.5}, None)
    """
    shares = data.get("shares") if isinstance(data, Mapping) else None
    if not isinstance(shares, Mapping) or not shares:
        return None
    out = {}
    for name, share in shares.items():
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            return None
        out[str(name)] = float(share)
    return out


def counters_from_json_file(path: Path) -> tuple[dict[str, dict[str, Any]], str | None, dict[str, float] | None]:
    """The counters, control and arms' shares of a replay's JSON file."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ReportError(f"{path} is not JSON: {exc}") from None
    except RecursionError:
        raise ReportError(f"{path} nests its JSON too deeply to be a replay's report") from None
    if isinstance(data, Mapping) and "variants" not in data and "protocol" in data:  # said only what it lacked
        raise ReportError(f"{path} is the report of a `streamrec evaluate` that rehearsed no experiment: run it again "
                          "with --variants FILE (the experiment file) and --json-out, whose JSON has the arms' counters")
    counters, control = counters_from_json(data)
    if not counters:
        raise ReportError(f"{path} has no variants")
    return counters, control, shares_from_json(data)


# --------------------------------------------------------------------------- the command


def report(
    metrics: Annotated[list[str] | None, typer.Option(
        "--metrics", metavar="URL",
        help="A worker's /metrics URL (http://host:9464 is enough). Repeat for several workers: their counters are summed.",
        show_default=False)] = None,
    prometheus: Annotated[str | None, typer.Option(
        "--prometheus", metavar="URL",
        help="The Prometheus HTTP API (e.g. http://prometheus:9090): sums every scraped worker's counters.",
        show_default=False)] = None,
    window: Annotated[str | None, typer.Option(
        "--window", metavar="DURATION",
        help="With --prometheus: what the counters counted over this PromQL duration (e.g. 7d, 12h), "
             "increase() over it, so a worker's restart does not reset the totals.", show_default=False)] = None,
    json_file: Annotated[Path | None, typer.Option(
        "--json", metavar="FILE",
        help="A replay's counters, as `streamrec evaluate --variants` writes them.", show_default=False)] = None,
    control: Annotated[str | None, typer.Option(
        "--control", metavar="NAME",
        help="The variant the others are compared with (default: the JSON's control, else the control of "
             "the experiment file STREAMREC_VARIANTS names, else a variant named 'control', else the first in "
             "sorted order).", show_default=False)] = None,
    json_output: Annotated[bool, typer.Option(
        "--json-output",
        help="Print the summary as JSON instead of the table (--json is the replay source).")] = False,
    chart: Annotated[Path | None, typer.Option(
        "--chart", metavar="PATH.png",
        help="Also write a PNG: CTR, conversion and HR@20 per variant with 95% CI error bars.",
        show_default=False)] = None,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=0.001, max=3600, help="Seconds to wait for each HTTP answer.")] = 10.0,
) -> None:
    """Per-variant CTR, conversion and live HR@20 of an experiment, and each variant's lift over the control.

    Reads exactly one source: --metrics, --prometheus or --json. The denominator of a variant's CTR (lists with a click), conversion (lists with a purchase) and revenue per list is its impressions when the site reported any, else its published lists (the table says which). HR@20 = hits within the top 20 / judged events.

    Intervals are 95%: the Wilson score interval for each rate; for the relative lift (variant rate / control rate - 1) the log-ratio (Katz) interval (a count of 0, or all of its denominator: with 0.5 added to each cell, k + 0.5 of n + 1; a variant count of 0: from -100%). A control rate of 0 gives "n/a", and so does a CTR or conversion per impression against one per list.

    A user's lists are not independent trials, so the workers also count per group of users (32 groups, by a hash of the user's id): the intervals use each count divided by its design effect (how much more the groups' rates vary than independent lists would) and Student's t with one degree of freedom fewer than the groups; revenue per list gets a t interval from them too. Counters without the groups (workers of an older version) give intervals that take each list as independent, too narrow, and the table says so.

    Where the arms' shares are known (STREAMREC_VARIANTS here, or the shares in a replay's JSON) the users each arm served are tested against them (Pearson's chi-square): below p = 0.001 a warning says the split is off (sample ratio mismatch), and no lift should be read until it is found.
    """
    if math.isnan(timeout):  # click's range lets NaN through: no comparison with it holds
        raise typer.BadParameter("nan is not a number of seconds", param_hint="--timeout")
    if control is not None and not control.strip():  # "" was taken for no --control: another variant compared
        raise typer.BadParameter("empty: give the name of the variant the others are compared with",
                                 param_hint="--control")
    sources = [s for s in (metrics, prometheus, json_file) if s]
    if len(sources) != 1:
        raise typer.BadParameter("give exactly one source: --metrics URL (repeatable), --prometheus URL or --json FILE")
    if window is not None and not prometheus:
        raise typer.BadParameter("--window needs --prometheus (a worker's /metrics has no history)", param_hint="--window")
    if window is not None and not re.fullmatch(r"(\d+(ms|s|m|h|d|w|y))+", window):
        raise typer.BadParameter(f"{window!r} is not a PromQL duration (e.g. 7d, 12h, 90m)", param_hint="--window")
    if chart is not None and json_file is not None and resolved(chart) == resolved(json_file):
        raise typer.BadParameter(f"{chart} is the --json source: writing the chart there would overwrite the replay's "
                                 "counters; give another PATH.png", param_hint="--chart")
    # the workers' experiment file, read before any source is: a wrong path is said before a network wait
    experiment = load_experiment(os.environ["STREAMREC_VARIANTS"]) \
        if control is None and os.environ.get("STREAMREC_VARIANTS") else None
    default_control, shares = None, None  # a replay's JSON names its control and its arms' shares
    seen: dict[tuple[str, str], list[str]] = {}  # the experiments the workers serve
    if metrics:
        counters = counters_from_metrics_urls(metrics, timeout, seen)
    elif prometheus:
        counters = counters_from_prometheus(prometheus_base(prometheus), timeout, window)
        seen = experiments_from_prometheus(prometheus_base(prometheus), timeout, window)
    else:
        assert json_file is not None
        counters, default_control, shares = counters_from_json_file(json_file)
    if experiment is not None and default_control is None:
        summary = summarize_experiment(counters, experiment)  # the workers'
    else:
        summary = summarize(counters, control or default_control, shares)
    summary["warnings"].extend(experiment_warnings(seen, experiment))
    if chart is not None:
        try:
            write_chart(summary, chart)
        except OSError as exc:
            raise ReportError(f"cannot write the chart {chart}: {exc.strerror or exc}") from None
    if json_output:
        typer.echo(json.dumps(finite(summary), indent=2, allow_nan=False))
    else:
        typer.echo(format_table(summary))
    if chart is not None:
        typer.echo(f"chart written to {chart}", err=json_output)
