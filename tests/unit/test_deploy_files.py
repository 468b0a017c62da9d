"""The shipped deployment files are valid and agree with the code, checked with nothing but
the project's own dependencies (the unit tier installs nothing).

- Grafana: the dashboard parses and every metric it names is one the worker exports (read
  from the metric bundles on a fresh registry, not from a list here).
- The image: its Dockerfile copies only sources its dockerignore lets through, and every package.
- The deploy scripts parse (`bash -n`).

The checks that need promtool, check-jsonschema and kubernetes-validate (which deploy/tools.sh
installs with apt-get and pip) are in tests/integration/test_deploy_checkers.py.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from metric_names import exported_metric_names, metric_names_in

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "streamrec.json"


# ---------------------------------------------------------------------------- Grafana


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_parses_and_only_names_exported_metrics():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "streamrec"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    exprs = dashboard_exprs()
    known = exported_metric_names()
    for title, expr in exprs:
        unknown = metric_names_in(expr) - known
        assert not unknown, f"panel {title!r} names metrics the worker does not export: {unknown}"
    used = set().union(*(metric_names_in(e) for _, e in exprs))
    for wanted in ("streamrec_events_consumed_total", "streamrec_stage_seconds_bucket", "streamrec_end_to_end_seconds_bucket",
                   "streamrec_events_invalid_total", "streamrec_consumer_lag", "streamrec_scorer_info", "streamrec_model_info",
                   "streamrec_live_hits_total", "streamrec_live_judged_total", "streamrec_live_reciprocal_rank_sum_total"):
        assert wanted in used, f"the dashboard shows nothing of {wanted}"


# ---------------------------------------------------------------------------- the image and the scripts


def test_the_image_copies_sources_its_dockerignore_lets_through():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    allowed = {line[1:].rstrip("/") for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")}
    copied = [src for line in dockerfile.splitlines() if line.startswith("COPY ") for src in line.split()[1:-1]]
    assert copied and set(copied) <= allowed, f"COPY {set(copied) - allowed}: excluded from the build context"
    assert all((ROOT / src).exists() for src in copied)
    packages = re.search(r'include = \[([^\]]*)\]', (ROOT / "pyproject.toml").read_text()).group(1)
    for package in re.findall(r'"([a-z_]+)\*"', packages):
        assert package in copied, f"the image does not copy the package {package}"
    assert 'EXPOSE 9464' in dockerfile and '/healthz' in dockerfile


def test_the_scripts_parse():
    for script in (DEPLOY / "tools.sh", PROM / "install.sh", DEPLOY / "common" / "daemon.sh",
                   DEPLOY / "kafka" / "kafka.sh", DEPLOY / "redis" / "redis.sh"):
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
