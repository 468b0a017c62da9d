"""The shipped deployment files pass the tools made to check them, and agree with the code.

- Prometheus: `promtool check config`, `check rules` and `test rules` (alerts_test.yml); every
  alert says what to do, is unit-tested and names only metrics the worker exports.
- Grafana: the provisioning points at the dashboard and the datasource.
- Compose: the Compose Specification schema (check-jsonschema's vendored copy), and every
  file and setting it refers to exists.
- Kubernetes: the schemas of a Kubernetes release (kubernetes-validate, strict: unknown
  fields fail), and probes, ports and replicas agree with the worker.

The tools come from deploy/tools.sh (Debian's prometheus package for promtool, with apt-get,
and a small venv under .run/deploy-tools for the rest, from PyPI); the session fixture runs
it when they are missing. That installs software, so these checks live in the integration
tier (the unit tier installs nothing; tests/unit/test_deploy_files.py keeps the checks that
need no tool). A tool that cannot be installed fails these tests with the script's output:
they are never skipped.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest
from metric_names import exported_metric_names, metric_names_in

from stream.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"


# ---------------------------------------------------------------------------- tools


class Tools:
    def __init__(self, venv: Path) -> None:
        self.promtool = shutil.which("promtool") or "/usr/bin/promtool"
        self.python = venv / "bin" / "python"
        self.check_jsonschema = venv / "bin" / "check-jsonschema"
        self.kubernetes_validate = venv / "bin" / "kubernetes-validate"

    def ready(self) -> bool:
        return all(Path(p).exists() for p in (self.promtool, self.check_jsonschema, self.kubernetes_validate))

    def run(self, *args, ok: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        if ok:
            assert done.returncode == 0, f"{' '.join(map(str, args))} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        return done

    def load_yaml(self, path: Path) -> list:
        """Every document in a YAML file (PyYAML from the tools venv)."""
        code = "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))"
        return json.loads(self.run(self.python, "-c", code, path).stdout)


@pytest.fixture(scope="session")
def tools() -> Tools:
    venv = Path(subprocess.run(["bash", str(DEPLOY / "tools.sh"), "--print"], capture_output=True, text=True, check=True).stdout.strip())
    found = Tools(venv)
    if not found.ready():
        done = subprocess.run(["bash", str(DEPLOY / "tools.sh")], cwd=ROOT, capture_output=True, text=True, timeout=900,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0 or not found.ready():
            pytest.fail(f"the deployment-file checkers are missing and deploy/tools.sh could not install them "
                        f"(exit {done.returncode}); run it by hand (`make test` runs it first):\n{done.stdout}{done.stderr}",
                        pytrace=False)
    return found


# ---------------------------------------------------------------------------- Prometheus


def test_promtool_accepts_the_scrape_configs(tools):
    out = tools.run(tools.promtool, "check", "config", PROM / "prometheus.yml", PROM / "prometheus-compose.yml").stdout
    assert out.count("SUCCESS") >= 2


def test_promtool_accepts_the_alert_rules(tools):
    assert "SUCCESS" in tools.run(tools.promtool, "check", "rules", PROM / "alerts.yml").stdout


def test_alert_rules_pass_their_unit_tests(tools):
    assert "SUCCESS" in tools.run(tools.promtool, "test", "rules", PROM / "alerts_test.yml").stdout


def test_every_alert_says_what_to_do_and_is_unit_tested(tools):
    (rules,) = tools.load_yaml(PROM / "alerts.yml")
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    tested = (PROM / "alerts_test.yml").read_text()
    assert len(alerts) >= 10
    for rule in alerts:
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 80, name
        assert f"alertname: {name}\n" in tested, f"{name} has no case in alerts_test.yml"
    known = exported_metric_names()
    for r in (r for g in rules["groups"] for r in g["rules"]):
        assert metric_names_in(r["expr"]) <= known, f"{r.get('alert') or r['record']} names metrics the worker does not export: {metric_names_in(r['expr']) - known}"


def test_the_operations_guide_covers_every_alert(tools):
    (rules,) = tools.load_yaml(PROM / "alerts.yml")
    guide = (ROOT / "docs" / "operations.md").read_text()
    for rule in (r for g in rules["groups"] for r in g["rules"] if "alert" in r):
        assert rule["alert"] in guide, f"docs/operations.md does not say what to do about {rule['alert']}"


# ---------------------------------------------------------------------------- Grafana


def test_grafana_provisioning_points_at_the_dashboard_and_datasource(tools):
    (datasources,) = tools.load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")
    (providers,) = tools.load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "streamrec.yaml")
    assert datasources["datasources"][0]["type"] == "prometheus"
    path = providers["providers"][0]["options"]["path"]
    (compose,) = tools.load_yaml(DEPLOY / "compose.yaml")
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{path}:ro" in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


# ---------------------------------------------------------------------------- compose


def test_compose_file_follows_the_compose_specification(tools, tmp_path):
    tools.run(tools.check_jsonschema, "--builtin-schema", "vendor.compose-spec", DEPLOY / "compose.yaml")
    broken = tmp_path / "compose.yaml"  # the check does catch a mistake
    broken.write_text((DEPLOY / "compose.yaml").read_text().replace("    healthcheck:\n", "    health_check:\n", 1))
    assert tools.run(tools.check_jsonschema, "--builtin-schema", "vendor.compose-spec", broken, ok=False).returncode != 0


def known_settings() -> set[str]:
    return {f.metadata["env"] for f in fields(Settings)}


def test_compose_refers_to_files_and_settings_that_exist(tools):
    (compose,) = tools.load_yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert {"kafka", "redis", "worker", "prometheus", "grafana"} <= set(services)
    build = services["worker"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which does not exist"
        env = service.get("environment") or {}
        unknown = {k for k in env if k.startswith("STREAMREC_")} - known_settings()
        assert not unknown, f"{name} sets unknown settings {unknown}"
    config = next(a for a in services["prometheus"]["command"] if a.startswith("--config.file="))
    assert (PROM / Path(config.split("=", 1)[1]).name).is_file()
    assert "kafka:9092" in services["worker"]["environment"]["STREAMREC_KAFKA_BOOTSTRAP"]


def broker_properties() -> dict[str, str]:
    lines = (DEPLOY / "kafka" / "server.properties").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.lstrip().startswith("#"))


def test_compose_broker_keeps_the_cleaner_buffer_of_the_project_broker(tools):
    """The compose broker takes the lesson of deploy/kafka: a 16 MiB cleaner key map (the image
    reads KAFKA_LOG_CLEANER_DEDUPE_BUFFER_SIZE as log.cleaner.dedupe.buffer.size)."""
    (compose,) = tools.load_yaml(DEPLOY / "compose.yaml")
    env = compose["services"]["kafka"]["environment"]
    wanted = broker_properties()["log.cleaner.dedupe.buffer.size"]
    assert int(wanted) < 128 << 20  # smaller than Kafka's default, or there is nothing to carry over
    assert str(env.get("KAFKA_LOG_CLEANER_DEDUPE_BUFFER_SIZE")) == wanted


# ---------------------------------------------------------------------------- Kubernetes


def k8s_docs(tools) -> list[dict]:
    return [d for path in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in tools.load_yaml(path) if d]


def test_kubernetes_manifests_follow_the_kubernetes_schemas(tools, tmp_path):
    paths = sorted((DEPLOY / "k8s").glob("*.yaml"))
    out = tools.run(tools.kubernetes_validate, "--strict", *paths)
    assert out.stdout.count("passed") == len(k8s_docs(tools))
    broken = tmp_path / "worker.yaml"  # the check does catch a mistake (strict: unknown fields)
    broken.write_text((DEPLOY / "k8s" / "worker.yaml").read_text().replace("  replicas:", "  replica:", 1))
    assert tools.run(tools.kubernetes_validate, "--strict", broken, ok=False).returncode != 0


def test_worker_deployment_agrees_with_the_worker(tools):
    docs = {(d["kind"], d["metadata"]["name"]): d for d in k8s_docs(tools)}
    config = docs[("ConfigMap", "streamrec-config")]["data"]
    assert set(config) <= known_settings()
    deployment = docs[("Deployment", "streamrec-worker")]
    assert deployment["spec"]["replicas"] <= int(config["STREAMREC_PARTITIONS"]), "workers beyond the partition count stay idle"
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    port = int(config["STREAMREC_METRICS_PORT"])
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"] == port
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["metadata"]["labels"]["streamrec.io/scorer-expected"] in ("cpu", "gpu")
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["REDIS_PASSWORD"]["valueFrom"]
    assert "$(REDIS_PASSWORD)" in env["STREAMREC_REDIS_URL"]["value"], "the Redis password must come from the Secret"
    assert "STREAMREC_REDIS_URL" not in config
    assert pod["spec"]["terminationGracePeriodSeconds"] > 30, "the worker drains the batch in hand for up to 30 s"


# ---------------------------------------------------------------------------- security defaults


def test_compose_has_no_default_credentials_and_publishes_no_open_service(tools):
    text = (DEPLOY / "compose.yaml").read_text()
    (compose,) = tools.load_yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    grafana = services["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?"), "a password is required, never defaulted"
    assert "${REDIS_PASSWORD:?" in services["redis"]["command"][-1]
    assert "${REDIS_PASSWORD:?" in services["worker"]["environment"]["STREAMREC_REDIS_URL"]
    assert not any(a.startswith(("--web.enable-lifecycle", "--web.enable-admin-api")) for a in services["prometheus"]["command"])
    assert "ports" not in services["kafka"] and "ports" not in services["redis"], "Kafka and Redis are not published"
    for name in ("prometheus", "grafana"):
        assert all(p.startswith("127.0.0.1:") for p in services[name]["ports"]), f"{name} is published beyond loopback"
    for default in (":-admin}", ":-streamrec-local}", "change-me"):
        assert default not in text


def test_kubernetes_holds_no_secret_and_uses_tls_and_a_network_policy(tools):
    docs = k8s_docs(tools)
    assert not [d for d in docs if d["kind"] == "Secret"], "secrets are created at deploy time, never shipped"
    assert "change-me" not in "".join(p.read_text() for p in (DEPLOY / "k8s").glob("*.yaml"))
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    config = by_kind[("ConfigMap", "streamrec-config")]["data"]
    assert config["STREAMREC_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    pod = by_kind[("Deployment", "streamrec-worker")]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["STREAMREC_REDIS_URL"]["value"].startswith("rediss://"), "Redis over TLS"
    assert "secretKeyRef" in env["STREAMREC_KAFKA_SASL_PASSWORD"]["valueFrom"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for setting in ("STREAMREC_KAFKA_SSL_CAFILE", "STREAMREC_REDIS_SSL_CA_FILE"):
        assert str(Path(config[setting]).parent) in mounts, f"{setting} names a file the pod does not mount"
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items(), "it selects the workers"
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ports == {"metrics"}, "only the metrics port is open to Prometheus"
