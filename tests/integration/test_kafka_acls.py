"""Kafka ACLs against a real authorizer (docs/operations.md, Security): a broker with Kafka's
StandardAuthorizer and a SASL_SSL listener (tests/integration/secure.py), the worker logging in
as a SCRAM user that holds exactly the ACLs the docs list, and no more.

- With them, the worker makes its topics, becomes ready and turns events into recommendations.
- Without DescribeConfigs on its topics it said nothing useful: the broker hides the configs,
  kafka-python's alter_configs raised "Unrecognized configs" and the worker died at start with a
  traceback (exit 1). Now it says which configs to set by hand and runs on.
- Write taken away from a running worker holds its output (unready, a log line naming the ACL),
  and once it is given back every event is applied exactly once. Read taken away crashed it
  (Faust's fetcher); now it is unready (``input``), fetches again, and loses nothing.
- Without Read on a topic it consumes, or Write on one it publishes to, it stops at start (exit 2)
  naming the topic.

The tests' own clients (producing the events, granting and revoking ACLs, reading the outputs)
use the broker's PLAINTEXT listener, whose principal (ANONYMOUS) is a super user.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis
from kafka.admin import (
    ACL,
    ACLOperation,
    ACLPermissionType,
    ACLResourcePatternType,
    KafkaAdminClient,
    ResourcePattern,
    ResourceType,
)
from secure import Certs, SecureKafka, make_certs, secure_kafka
from workerkit import (
    WorkerProcess,
    exactly_once,
    free_port,
    produce,
    read_all,
    synthetic_records,
    wait_for,
)

AUTHORIZER = ("authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
              "super.users=User:ANONYMOUS")
MECHANISM = "SCRAM-SHA-512"
CONSUMED = ("clicks", "purchases", "forget", "impressions", "searches")
R, W, D, C = ACLOperation.READ, ACLOperation.WRITE, ACLOperation.DESCRIBE, ACLOperation.CREATE
DESCRIBE_CONFIGS = ACLOperation.DESCRIBE_CONFIGS


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def kafka_acl(certs: Certs) -> Iterator[SecureKafka]:
    yield from secure_kafka(certs, f"acl-{os.getpid()}-{uuid.uuid4().hex[:6]}", AUTHORIZER)


@pytest.fixture
def admin(kafka_acl: SecureKafka) -> Iterator[KafkaAdminClient]:
    client = KafkaAdminClient(bootstrap_servers=kafka_acl.plaintext, client_id="streamrec-acl-tests")
    try:
        yield client
    finally:
        client.close()


def _acl(principal: str, operation: ACLOperation, kind: ResourceType, name: str) -> ACL:
    return ACL(principal=principal, host="*", operation=operation, permission_type=ACLPermissionType.ALLOW,
               resource_pattern=ResourcePattern(kind, name, ACLResourcePatternType.LITERAL))


def documented_acls(principal: str, prefix: str, app_id: str, describe_configs: bool = True,
                    without: tuple[str, ACLOperation] | None = None) -> list[ACL]:
    """The ACLs docs/operations.md (Security) lists for the worker's user: literal names under
    ``prefix``; ``describe_configs=False`` leaves out DescribeConfigs on the topics, ``without``
    one (topic, operation)."""
    topic = ResourceType.TOPIC
    wanted = [*((t, op) for t in (*CONSUMED, "items") for op in (R, D)),
              *((t, op) for t in ("recommendations", "dlq") for op in (W, D))]
    if describe_configs:
        wanted += [(t, DESCRIBE_CONFIGS) for t in (*CONSUMED, "items", "recommendations", "dlq")]
    acls = [_acl(principal, op, topic, f"{prefix}{t}") for t, op in wanted if (t, op) != without]
    acls += [_acl(principal, C, ResourceType.CLUSTER, "kafka-cluster"),
             _acl(principal, R, ResourceType.GROUP, app_id),
             *(_acl(principal, op, topic, f"{app_id}-__assignor-__leader") for op in (C, D, R, W))]
    return acls


def _worker(kafka_acl: SecureKafka, redis_url: str, prefix: str, tmp_path, name: str) -> WorkerProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    env.update({**kafka_acl.env(MECHANISM), "STREAMREC_REDIS_URL": redis_url, "STREAMREC_TOPIC_PREFIX": prefix,
                "STREAMREC_APP_ID": f"{prefix}worker", "STREAMREC_PARTITIONS": "2",
                "STREAMREC_MODEL_DIR": str(tmp_path / "models"), "STREAMREC_BATCH_TIMEOUT_MS": "5",
                "STREAMREC_SNAPSHOT_INTERVAL_S": "2", "STREAMREC_KAFKA_SESSION_TIMEOUT_S": "6",
                "PYTHONUNBUFFERED": "1"})
    return WorkerProcess(env, tmp_path / f"{name}.log", free_port()).start()


def _ready(worker: WorkerProcess) -> bool:
    return worker.http("/readyz")[0] == 200


def _principal(kafka_acl: SecureKafka) -> str:
    return f"User:{kafka_acl.users[MECHANISM][0]}"


@contextmanager
def _documented_worker(kafka_acl, admin, redis_url, tmp_path) -> Iterator[tuple[str, str, WorkerProcess]]:
    """(topic prefix, principal, worker): a ready worker whose user holds the documented ACLs;
    stopped after, by SIGTERM, with exit status 0."""
    prefix = f"acl{uuid.uuid4().hex[:8]}."
    principal = _principal(kafka_acl)
    admin.create_acls(documented_acls(principal, prefix, f"{prefix}worker"))
    worker = _worker(kafka_acl, redis_url, prefix, tmp_path, "worker")
    try:
        wait_for(lambda: _ready(worker), 120, "the worker, logged in with the documented ACLs, to be ready", worker)
        yield prefix, principal, worker
    finally:
        assert worker.stop() == 0, worker.log_tail()


@pytest.mark.parametrize(("topic", "operation", "condition", "refused", "logged"), [
    # Write on the output: its records held, unready, retried
    ("recommendations", W, "output: FAIL", "{prefix}recommendations not accepted by Kafka",
     "the broker does not let this user write to it"),
    # Read on an input: before, Faust's fetcher crashed on TopicAuthorizationFailedError, and the
    # worker with it (mode's traceback, exit 1)
    ("clicks", R, "input: FAIL", "TopicAuthorizationFailedError: {prefix}clicks", "Kafka refuses this user's fetch"),
], ids=["write", "read"])
def test_with_the_documented_acls_the_worker_runs_and_an_acl_taken_away_makes_it_unready_and_loses_nothing(
        kafka_acl, admin, redis_url, tmp_path, topic, operation, condition, refused, logged):
    with _documented_worker(kafka_acl, admin, redis_url, tmp_path) as (prefix, principal, worker):
        assert "did not show the configs" not in worker.log_text()  # DescribeConfigs is among them
        first, expected = synthetic_records(100, seed=41, n_users=20)
        produce(kafka_acl.plaintext, prefix, first)
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        try:
            wait_for(lambda: exactly_once(client, prefix, expected), 60, "the first events applied", worker)
            assert len(read_all(kafka_acl.plaintext, f"{prefix}recommendations")) >= 20  # a list for each user

            taken = _acl(principal, operation, ResourceType.TOPIC, f"{prefix}{topic}")
            admin.delete_acls([taken])
            later, more = synthetic_records(100, seed=42, n_users=20)
            produce(kafka_acl.plaintext, prefix, later)
            _, body = wait_for(lambda: (lambda got: got if got[0] == 503 and condition in got[1] else None)(
                worker.http("/readyz")), 90, f"/readyz to say {condition}", worker)
            assert refused.format(prefix=prefix) in body
            wait_for(lambda: logged in worker.log_text(), 30, "the log line naming the ACL", worker)

            admin.create_acls([taken])
            wait_for(lambda: _ready(worker), 90, "the worker to be ready again once the ACL is given back", worker)
            totals = {u: expected.get(u, 0) + more.get(u, 0) for u in {*expected, *more}}
            wait_for(lambda: exactly_once(client, prefix, totals), 90, "every event applied exactly once", worker)
        finally:
            client.close()
        assert "Traceback" not in worker.log_text()


def test_without_describe_configs_the_worker_says_which_configs_to_set_and_runs_on(kafka_acl, admin, redis_url, tmp_path):
    # before: the broker hides the configs, kafka-python's alter_configs raised "Unrecognized
    # configs: {...}" and the worker died at start, a traceback and exit 1
    prefix = f"acl{uuid.uuid4().hex[:8]}."
    admin.create_acls(documented_acls(_principal(kafka_acl), prefix, f"{prefix}worker", describe_configs=False))
    worker = _worker(kafka_acl, redis_url, prefix, tmp_path, "worker")
    try:
        wait_for(lambda: _ready(worker), 120, "the worker to be ready without DescribeConfigs", worker)
        log = worker.log_text()
        assert "the broker did not show the configs of" in log and "DescribeConfigs" in log, worker.log_tail()
        assert "kafka-configs.sh --alter --entity-type topics" in log and f"{prefix}recommendations" in log
        assert "Traceback" not in log
    finally:
        assert worker.stop() == 0, worker.log_tail()


@pytest.mark.parametrize(("topic", "operation", "said"), [("searches", R, "Read"), ("dlq", W, "Write")])
def test_without_read_on_a_consumed_topic_or_write_on_an_output_the_worker_stops_at_start_naming_it(
        kafka_acl, admin, redis_url, tmp_path, topic, operation, said):
    # before: Read missing crashed the worker once Faust fetched (mode's traceback, exit 1); Write
    # missing held its first batch with dead letters, unready, for ever
    prefix = f"acl{uuid.uuid4().hex[:8]}."
    admin.create_acls(documented_acls(_principal(kafka_acl), prefix, f"{prefix}worker", without=(topic, operation)))
    worker = _worker(kafka_acl, redis_url, prefix, tmp_path, "worker")
    try:
        assert worker.proc.wait(150) == 2, worker.log_tail()
    except Exception:
        worker.stop()
        raise
    log = worker.log_text()
    assert f"does not allow user '{kafka_acl.users[MECHANISM][0]}'" in log, worker.log_tail()
    assert f"it lacks {said} on {prefix}{topic}." in log and "docs/operations.md (Security)" in log
    assert "Traceback" not in log
