"""Create streamrec's topics on a broker, and wait for a broker to answer.

Both are idempotent start-up steps for ``streamrec produce``, the worker and the tests:
topics that exist are left exactly as they are, and a broker that does not answer gives a
:class:`~stream.errors.ServiceUnavailable` saying where it was looked for (one that refuses
the client's credentials or certificate, a :class:`~stream.connections.AccessDenied` saying
which setting to check). Each function takes a :class:`~stream.connections.KafkaConnection`
(``Settings.kafka``), or bootstrap servers alone for a plaintext broker.

>>> check_topic_name("streamrec.clicks")
>>> check_topic_name("streamrec/clicks")
Traceback (most recent call last):
...
stream.errors.ConfigError: topic name 'streamrec/clicks': only letters, digits, '.', '_' and '-' are allowed (at most 249)
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

from aiokafka.conn import create_conn
from aiokafka.errors import KafkaError as AIOKafkaError
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from stream.connections import AccessDenied, KafkaConnection
from stream.errors import ConfigError, StreamrecError
from stream.listeners import API_VERSIONS, METADATA, SPEAKS, answered, exchange, listener_speaks

log = logging.getLogger(__name__)

_LEGAL = re.compile(r"[A-Za-z0-9._-]{1,249}")


def check_topic_name(name: str) -> None:
    """Refuse a name Kafka would refuse, before asking the broker."""
    if not _LEGAL.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"topic name {name!r}: only letters, digits, '.', '_' and '-' are allowed (at most 249)")


def _unavailable(kafka: KafkaConnection, timeout_s: float, exc: BaseException | str,
                 waited: bool = False) -> StreamrecError:
    return kafka.unavailable(exc, timeout_s, waited)


_UNANSWERED = "closed the connection without answering"


def _what_it_speaks(kafka: KafkaConnection, host: str, port: int, timeout_s: float) -> str:
    """``; the listener there speaks SSL`` (stream/listeners.py) when the listener at ``host:port``
    speaks another protocol than ``kafka``'s, which :meth:`KafkaConnection.refusal` reads as a
    setting to change; empty when it speaks the same, or answers as no Kafka listener does."""
    speaks = listener_speaks(host, port, timeout_s, kafka.ssl_certfile, kafka.ssl_keyfile)
    if speaks is None or kafka.security_protocol in speaks.split(" or "):
        return ""
    return f"; {SPEAKS}{speaks}"


def probe(bootstrap: KafkaConnection | str, timeout_s: float = 3.0) -> str | None:
    """None when a broker in ``bootstrap`` answers a Metadata request, else what went wrong.

    A raw request on a plain socket (TLS-wrapped with SSL and SASL_SSL) rather than a client:
    kafka-python 3.0 leaves a socket open and an I/O thread running when its bootstrap fails,
    which ``wait_for_kafka`` would otherwise repeat every 200 ms while a broker starts. A SASL
    listener answers nothing but ApiVersions before the login, so there the probe asks that
    (whether the credentials work, the client that logs in finds out).
    """
    kafka = KafkaConnection.of(bootstrap)
    request = API_VERSIONS if kafka.uses_sasl else METADATA
    context = kafka.ssl_context()
    problem = f"no server in {kafka.bootstrap!r}"
    try:
        servers = kafka.servers()
    except ConfigError as exc:
        return str(exc)
    for host, port in servers:
        server = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            with socket.create_connection((host, port), timeout=timeout_s) as raw:
                conn = context.wrap_socket(raw, server_hostname=host) if context is not None else raw
                try:
                    head = exchange(conn, request)
                    if head is None:
                        raise ConnectionError(_UNANSWERED)
                finally:
                    if conn is not raw:
                        conn.close()
        except ssl.SSLError as exc:
            problem = f"{server}: TLS failed: {exc}"
            if "certificate" not in str(exc).lower():  # cut short, not refused: a plaintext listener?
                problem += _what_it_speaks(kafka, host, port, timeout_s)
            continue
        except (OSError, ValueError) as exc:
            problem = f"{server}: {exc}"
            if isinstance(exc, ConnectionError) and _UNANSWERED in str(exc):  # a TLS or SASL listener?
                problem += _what_it_speaks(kafka, host, port, timeout_s)
            continue
        if answered(head):
            return None
        problem = f"{server}: answered, but not as a Kafka broker"
    return problem


def check_login(kafka: KafkaConnection, timeout_s: float = 10.0) -> None:
    """Log in to the first broker that answers; :class:`~stream.connections.AccessDenied` when
    the broker refuses the credentials (nothing to do without SASL).

    kafka-python's clients retry a refused login until their bootstrap times out and then
    report a timeout; one aiokafka connection says at once what the broker answered.
    """
    if not kafka.uses_sasl:
        return
    options = kafka.client_options()
    del options["bootstrap_servers"]

    async def login() -> None:
        for server in filter(None, (s.strip() for s in kafka.bootstrap.split(","))):
            host, _, port = server.rpartition(":")
            try:
                conn = await asyncio.wait_for(create_conn(host.strip("[]") or "127.0.0.1", int(port),
                                                          client_id="streamrec-login",
                                                          request_timeout_ms=int(timeout_s * 1000), **options),
                                              timeout_s)
            except AIOKafkaError as exc:
                if (denied := kafka.refusal(exc)) is not None:
                    raise denied from None
                continue
            except (TimeoutError, OSError, ValueError):
                continue  # not this broker: the client that follows reports what it finds
            await conn.close()  # the socket closed, not only asked to
            return

    with ThreadPoolExecutor(1) as pool:  # a loop of its own, whether or not the caller runs one
        pool.submit(asyncio.run, login()).result()


class _Admin(KafkaAdminClient):
    """kafka-python's admin client, minus the I/O thread it leaves behind when bootstrap fails."""

    def __init__(self, **configs) -> None:
        try:
            super().__init__(**configs)
        except BaseException:
            for release in (lambda: self._client.close(), lambda: self._net.stop(), lambda: self._metrics.close()):
                try:
                    release()
                except Exception:  # best effort: the bootstrap error is the one to report
                    pass
            raise


def _admin(kafka: KafkaConnection, timeout_s: float) -> KafkaAdminClient:
    """An admin client that has reached the broker; ServiceUnavailable when none answers."""
    probe_s = min(timeout_s, 5.0)
    problem = probe(kafka, probe_s)
    if problem is not None:
        raise _unavailable(kafka, probe_s, problem)  # how long it was given, not the caller's whole timeout
    check_login(kafka, min(timeout_s, 10.0))
    timeout_ms = max(1, int(timeout_s * 1000))
    return _Admin(
        **kafka.client_options(),
        client_id="streamrec-admin",
        bootstrap_timeout_ms=timeout_ms,
        request_timeout_ms=timeout_ms,
        reconnect_backoff_max_ms=500,
    )


def wait_for_kafka(bootstrap: KafkaConnection | str, timeout_s: float = 30.0) -> list[str]:
    """Block until the broker at ``bootstrap`` answers a metadata request; return its topics.

    Raises :class:`ServiceUnavailable` when it has not answered within ``timeout_s``.
    """
    kafka = KafkaConnection.of(bootstrap)
    deadline = time.monotonic() + timeout_s
    while (problem := probe(kafka, max(0.1, min(2.0, deadline - time.monotonic())))) is not None:
        left = deadline - time.monotonic()
        if left <= 0 or kafka.refusal(problem) is not None:  # an untrusted certificate stays untrusted
            raise _unavailable(kafka, timeout_s, problem, waited=True)
        time.sleep(min(0.2, left))
    admin = _connected_admin(kafka, max(1.0, deadline - time.monotonic()))
    try:
        return sorted(admin.list_topics())
    finally:
        admin.close()


def _connected_admin(kafka: KafkaConnection, timeout_s: float) -> KafkaAdminClient:
    try:
        return _admin(kafka, timeout_s)
    except (KafkaError, OSError) as exc:
        raise _unavailable(kafka, timeout_s, exc) from None


def ensure_topics(
    bootstrap: KafkaConnection | str,
    names: Iterable[str],
    partitions: int,
    replication: int = 1,
    timeout_s: float = 30.0,
    min_insync_replicas: int | None = None,
    configs: Mapping[str, Mapping[str, str]] | None = None,
) -> list[str]:
    """Create those of ``names`` that do not exist; return the ones this call created.
    ``configs``: topic configs per name (``Settings.topic_configs()``) for those it creates.

    Existing topics are not touched (not even when their partition count differs: changing it
    would move keys between partitions; :func:`align_topic_configs` sets their configs). Created topics have a leader for every partition
    before this returns, so a producer can write at once. Another process creating the same
    topic at the same moment is not an error.
    """
    wanted = list(dict.fromkeys(names))
    for name in wanted:
        check_topic_name(name)
    if partitions < 1 or replication < 1:
        raise ConfigError(f"partitions={partitions}, replication={replication}: both must be at least 1")
    if not wanted:
        return []
    kafka = KafkaConnection.of(bootstrap)
    admin = _connected_admin(kafka, timeout_s)
    try:
        try:
            existing = set(admin.list_topics())
            missing = [n for n in wanted if n not in existing]
            if not missing:
                return []
            spec = {n: {"num_partitions": partitions, "replication_factor": replication} for n in missing}
            for n in missing:
                wanted_configs = dict((configs or {}).get(n, {}))
                if min_insync_replicas is not None:
                    wanted_configs["min.insync.replicas"] = str(min_insync_replicas)
                if wanted_configs:
                    spec[n]["configs"] = wanted_configs
            response = admin.create_topics(spec, timeout_ms=int(timeout_s * 1000), raise_errors=False)
            created = _created(response, missing)
            if created:
                admin.wait_for_topics(created, timeout_ms=int(timeout_s * 1000))
        except KafkaError as exc:
            if (denied := kafka.refusal(exc)) is not None:
                raise denied from None
            if exc.retriable or "timeout" in type(exc).__name__.lower():
                raise _unavailable(kafka, timeout_s, exc) from None
            raise StreamrecError(f"creating topics {', '.join(missing)} on {kafka.bootstrap} failed: {exc}") from None
    finally:
        admin.close()
    if created:
        log.info("created topics %s (%d partitions, replication %d)", ", ".join(created), partitions, replication)
    return created


def ensure_streamrec_topics(settings, timeout_s: float = 30.0) -> list[str]:
    """:func:`ensure_topics` for every topic of ``settings`` (a :class:`~stream.settings.Settings`),
    with its partitions, replication and configs (``Settings.topic_configs()``). Where the clicks
    topic exists, the topics read with it (purchases, forget requests, impressions) are created
    with as many partitions as it has, whatever ``STREAMREC_PARTITIONS`` says: they must be
    co-partitioned (an older deployment gets its new topics right)."""
    topics = settings.topics
    partitions = partition_count(settings.kafka, topics.clicks, timeout_s) or settings.partitions
    created = ensure_topics(settings.kafka, topics.consumed, partitions, timeout_s=timeout_s,
                            replication=settings.replication_factor, configs=settings.topic_configs())
    return created + ensure_topics(settings.kafka, [t for t in topics.all if t not in topics.consumed],
                                   settings.partitions, timeout_s=timeout_s, replication=settings.replication_factor,
                                   configs=settings.topic_configs())


def partition_count(bootstrap: KafkaConnection | str, topic: str, timeout_s: float = 30.0) -> int | None:
    """How many partitions ``topic`` has; None when it does not exist."""
    kafka = KafkaConnection.of(bootstrap)
    admin = _connected_admin(kafka, timeout_s)
    try:
        try:
            if topic not in set(admin.list_topics()):
                return None
            (described,) = admin.describe_topics([topic])
        except KafkaError as exc:
            raise _unavailable(kafka, timeout_s, exc) from None
    finally:
        admin.close()
    return len(described["partitions"]) or None


def topic_ids(bootstrap: KafkaConnection | str, names: Iterable[str], timeout_s: float = 10.0) -> dict[str, str]:
    """The broker's id of each of ``names`` that exists (a UUID, new each time a topic is
    created: a topic deleted and created again has a new one). Topics the broker gives no id
    (one that does not exist, a broker older than Kafka 2.8) are left out."""
    kafka = KafkaConnection.of(bootstrap)
    admin = _connected_admin(kafka, timeout_s)
    try:
        try:
            described = admin.describe_topics(sorted(set(names)))
        except KafkaError as exc:
            raise _unavailable(kafka, timeout_s, exc) from None
    finally:
        admin.close()
    return {str(t["name"]): str(t["topic_id"]) for t in described
            if not t.get("error_code") and t.get("topic_id") and str(t["topic_id"]).strip("0-")}


def require_topic(settings, topic: str) -> int:
    """The partitions of ``topic``, which a worker of ``settings`` (a
    :class:`~stream.settings.Settings`) creates when it starts; a :class:`StreamrecError` that
    asks about the prefix where it does not exist. For the commands that only read or add to a
    running deployment (forget, tail, retrain): a typo in the prefix must not send to, or wait on,
    nobody, nor create a set of topics no worker uses."""
    partitions = partition_count(settings.kafka, topic)
    if partitions is None:
        raise _no_topics(settings, [topic])
    return partitions


def require_topics(settings, names: Iterable[str], timeout_s: float = 30.0) -> None:
    """:func:`require_topic` for several topics at once: one :class:`StreamrecError` naming
    every one of ``names`` that does not exist."""
    kafka = settings.kafka
    admin = _connected_admin(kafka, timeout_s)
    try:
        try:
            existing = set(admin.list_topics())
        except KafkaError as exc:
            raise _unavailable(kafka, timeout_s, exc) from None
    finally:
        admin.close()
    missing = [name for name in names if name not in existing]
    if missing:
        raise _no_topics(settings, missing)


def _no_topics(settings, missing: list[str]) -> StreamrecError:
    one = len(missing) == 1
    return StreamrecError(f"there {'is no topic' if one else 'are no topics'} {', '.join(missing)} on "
                          f"{settings.kafka.bootstrap}: is {settings.named('topic_prefix')} ({settings.topic_prefix!r}) the "
                          f"workers'? A worker creates {'it' if one else 'them'} when it starts: start one first")


def check_copartitioned(bootstrap: KafkaConnection | str, names: Iterable[str], timeout_s: float = 30.0) -> None:
    """Raise a :class:`~stream.errors.ConfigError` unless the topics ``names`` have one partition
    count: the worker's agent reads them as co-partitioned (a user's events and forget
    requests on the same partition number, owned by one worker). A :class:`StreamrecError` when
    some of them do not exist (:func:`missing_topics`): they were said as having 0 partitions,
    with the advice to grow them, which no ``kafka-topics.sh --alter`` can do to a topic that
    is not there."""
    kafka = KafkaConnection.of(bootstrap)
    wanted = list(names)
    admin = _connected_admin(kafka, timeout_s)
    try:
        try:
            described = admin.describe_topics(wanted)
        except KafkaError as exc:
            raise _unavailable(kafka, timeout_s, exc) from None
    finally:
        admin.close()
    counts: dict[str, int] = {}
    missing: list[str] = []
    for t in described:
        name = t["topic"] if "topic" in t else t["name"]
        if t.get("error_code") == _UNKNOWN_TOPIC:
            missing.append(name)
        elif t.get("error_code"):  # not authorised to describe it, say: not a count of 0
            raise StreamrecError(f"cannot read the partitions of topic {name} on {kafka.bootstrap}: "
                                 f"{for_code(t['error_code']).__name__}")
        else:
            counts[name] = len(t["partitions"])
    if missing:
        raise StreamrecError(missing_topics(missing, list(counts), kafka.bootstrap))
    uneven = uneven_partitions(counts)
    if uneven:
        raise ConfigError(uneven)


#: the error code of a topic the broker does not have (UNKNOWN_TOPIC_OR_PARTITION)
_UNKNOWN_TOPIC = 3


def missing_topics(missing: list[str], present: list[str], bootstrap: str) -> str:
    """What is wrong, for an operator, when some of the topics a worker reads together do not
    exist (``present``: those that do): a worker of this version has not started yet, and
    starting one creates them, with as many partitions as the clicks topic.

    >>> print(missing_topics(["t.searches"], ["t.clicks", "t.forget"], "kafka:9092"))  # doctest: +ELLIPSIS
    there is no topic t.searches on kafka:9092, which the workers read together with t.clicks and t.forget: ...
    """
    one = len(missing) == 1
    listed = " and ".join([", ".join(present[:-1]), present[-1]] if len(present) > 2 else present)
    others = f", which the workers read together with {listed}" if present else ""
    return (f"there {'is no topic' if one else 'are no topics'} {', '.join(missing)} on {bootstrap}{others}: a worker "
            f"creates {'it' if one else 'them'} when it starts, with as many partitions as the clicks topic: start one "
            "(streamrec worker) first")


def uneven_partitions(counts: Mapping[str, int]) -> str | None:
    """What is wrong, for an operator, when the topics a worker reads together (``counts``:
    each one's partitions) do not have one partition count; None when they do.

    >>> uneven_partitions({"clicks": 4, "purchases": 4}) is None
    True
    >>> print(uneven_partitions({"clicks": 4, "purchases": 2}))  # doctest: +ELLIPSIS
    the topics a worker reads together must have as many partitions each (clicks has 4, purchases has 2): ...
    """
    if len(set(counts.values())) <= 1:
        return None
    listed = ", ".join(f"{n} has {c}" for n, c in counts.items())
    most = max(counts.values())
    smaller = [n for n, c in counts.items() if c < most]
    fix = (f"Grow {', '.join(smaller)} to {most} partitions (kafka-topics.sh --alter --topic NAME --partitions "
           f"{most}; docs/operations.md, \"Adding partitions later\")")
    largest = [n for n, c in counts.items() if c == most]
    if len(largest) == 1 and largest[0].endswith("forget"):  # a count never shrinks: it alone grew past the inputs
        fix += f", or recreate {largest[0]} with as many partitions as the input topics"
    return (f"the topics a worker reads together must have as many partitions each ({listed}): a user's "
            f"events and forget requests must land on the same partition number. {fix}")


#: where a topic's config comes from when the topic does not set it (kafka-python's ConfigSourceType names)
_INHERITED = frozenset({"DYNAMIC_DEFAULT_BROKER_CONFIG", "STATIC_BROKER_CONFIG", "DEFAULT_CONFIG"})


def align_topic_configs(bootstrap: KafkaConnection | str, configs: Mapping[str, Mapping[str, str]],
                        timeout_s: float = 30.0) -> dict[str, dict[str, str]]:
    """Set, on the existing topics of ``configs``, each config whose value differs (a topic
    created before streamrec compacted its recommendations, say); returns what was changed,
    per topic. Topics that do not exist are left to :func:`ensure_topics`. A broker that
    refuses (the client may not alter configs) raises a :class:`~stream.errors.StreamrecError`
    that says which topics and configs to set by hand."""
    kafka = KafkaConnection.of(bootstrap)
    admin = _connected_admin(kafka, timeout_s)
    changes: dict[str, dict[str, str]] = {}
    try:
        try:
            existing = set(admin.list_topics())
            names = [n for n in configs if n in existing]
            if not names:
                return {}
            asked = [ConfigResource(ConfigResourceType.TOPIC, n, list(configs[n])) for n in names]
            try:  # every config asked, defaults too: kafka-python 3 answers only those set otherwise by default
                described = admin.describe_configs(asked, config_filter="all").get("topic", {})
                # every topic has the configs asked, so none at all is a topic the broker did not show
                # (kafka-python drops the answer's error: an ACL without DescribeConfigs)
                hidden = [n for n in names if not described.get(n)]
            except TypeError:  # an older kafka-python: no filter, and no telling a hidden topic
                described = admin.describe_configs(asked).get("topic", {})
                hidden = []
            if hidden:
                raise StreamrecError(f"the broker did not show the configs of {', '.join(hidden)} (the user needs "
                                     "DescribeConfigs on the topics, and AlterConfigs to change them: docs/operations.md, "
                                     "Security), so they were not checked; set them with kafka-configs.sh --alter "
                                     "--entity-type topics: " + "; ".join(f"{n}: {configs[n]}" for n in hidden))
            for n in names:  # only what is set on the topic itself counts: one that inherits the broker's
                # default follows it when the broker's changes (the raw topics' retention is a promise)
                now = {key: (entry or {}).get("value") for key, entry in (described.get(n) or {}).items()
                       if (entry or {}).get("config_source") not in _INHERITED}
                diff = {key: value for key, value in configs[n].items() if now.get(key) != value}
                if diff:
                    changes[n] = diff
            if changes:
                try:
                    answer = admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, n, dict(c))
                                                  for n, c in changes.items()]).get("topic", {})
                except ValueError as exc:  # kafka-python's own check of the names, against what the broker shows
                    answer = {n: str(exc) for n in changes}
                failed = {n: a for n, a in answer.items() if a != "OK"}
                if failed:
                    raise StreamrecError("the broker refused to set topic configs: " + "; ".join(
                        f"{n}: {a} (wanted {changes[n]})" for n, a in failed.items()))
        except KafkaError as exc:
            if (denied := kafka.refusal(exc)) is not None:
                raise denied from None
            wanted = "; ".join(f"{n}: {c}" for n, c in (changes or configs).items())
            raise StreamrecError(f"setting topic configs on {kafka.bootstrap} failed ({exc}); set them with "
                                 f"kafka-configs.sh --alter --entity-type topics: {wanted}") from None
    finally:
        admin.close()
    for n, c in changes.items():
        log.info("topic %s: set %s", n, ", ".join(f"{k}={v}" for k, v in c.items()))
    return changes


def check_topic_access(settings, timeout_s: float = 30.0) -> None:
    """An :class:`~stream.connections.AccessDenied` naming each topic the worker's user may not
    use as the worker does: Read on what it consumes and on the catalogue, Write on what it
    publishes. The broker says what a user may do with each topic in its metadata answer
    (``topic_authorized_operations``); without this, Read missing on one consumed topic crashed
    the worker once Faust fetched from it (exit 1, mode's traceback), and Write missing held its
    first batch, unready, for ever. Not checked where the broker does not say (an old one)."""
    topics = settings.topics
    needs = {**{t: "READ" for t in (*topics.consumed, topics.items)},
             **{t: "WRITE" for t in (topics.recommendations, topics.dlq)}}
    kafka = settings.kafka
    admin = _connected_admin(kafka, timeout_s)
    try:
        try:
            described = admin.describe_topics(list(needs))
        except KafkaError as exc:  # a refusal (AccessDenied) or the broker gone (ServiceUnavailable)
            raise _unavailable(kafka, timeout_s, exc) from None
    finally:
        admin.close()
    missing: dict[str, list[str]] = {}
    for topic in described:
        allowed = topic.get("authorized_operations")
        name = topic["topic"] if "topic" in topic else topic["name"]  # as check_copartitioned reads it
        if allowed is None or name not in needs:  # not said
            continue
        if needs[name] not in allowed:
            missing.setdefault(needs[name].capitalize(), []).append(name)
    if missing:
        user = kafka.sasl_username or "(anonymous)"
        said = "; ".join(f"{op} on {', '.join(sorted(names))}" for op, names in sorted(missing.items()))
        raise AccessDenied(f"Kafka at {kafka.bootstrap} does not allow user {user!r} what the worker does with its "
                           f"topics: it lacks {said}. Grant it the ACLs in docs/operations.md (Security)")


def session_timeout_range(bootstrap: KafkaConnection | str, timeout_s: float = 10.0) -> tuple[float, float] | None:
    """The session timeouts, in seconds, the brokers let a consumer group member ask for
    (``group.min.session.timeout.ms``, ``group.max.session.timeout.ms``: 6 to 1,800 by default);
    None when a broker does not say (a client not allowed to describe the cluster's configs).
    A consumer asking for another one is refused its join (InvalidSessionTimeoutError), which
    aiokafka leaves with the consumer: a worker that never joined its group, for ever."""
    kafka = KafkaConnection.of(bootstrap)
    admin = _connected_admin(kafka, timeout_s)
    try:
        brokers = admin.describe_cluster().get("brokers") or []
        if not brokers:
            return None
        keys = ["group.min.session.timeout.ms", "group.max.session.timeout.ms"]
        described = admin.describe_configs([ConfigResource(ConfigResourceType.BROKER, str(brokers[0]["broker_id"]), keys)],
                                           config_filter="all").get("broker", {})
        values = next(iter(described.values()), None) or {}
        low, high = ((values.get(key) or {}).get("value") for key in keys)
        return (int(low) / 1000, int(high) / 1000) if low and high else None
    except (KafkaError, KeyError, TypeError, ValueError) as exc:  # refused, or an answer without them: not checked
        log.debug("the brokers' session timeout range is not known (%s)", exc)
        return None
    finally:
        admin.close()


def committed_offsets(bootstrap: KafkaConnection | str, group_id: str,
                      timeout_s: float = 10.0) -> dict[tuple[str, int], int]:
    """The consumer group's committed offsets, ``(topic, partition) -> next offset to read``."""
    kafka = KafkaConnection.of(bootstrap)
    admin = _connected_admin(kafka, timeout_s)
    try:
        if hasattr(admin, "list_group_offsets"):  # kafka-python 3
            offsets = admin.list_group_offsets(group_id).get(group_id, {})
        else:  # kafka-python 2
            offsets = admin.list_consumer_group_offsets(group_id)
    except KafkaError as exc:
        raise _unavailable(kafka, timeout_s, exc) from None
    finally:
        admin.close()
    return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items() if meta.offset >= 0}


def _created(response: dict, asked: list[str]) -> list[str]:
    """The topics a CreateTopics response says were created; raise on any real failure."""
    created, failures = [], []
    for topic in response.get("topics", []):
        error = for_code(topic["error_code"])
        if topic["error_code"] == 0:
            created.append(topic["name"])
        elif error is not TopicAlreadyExistsError:
            failures.append(f"{topic['name']}: {error.__name__} {topic.get('error_message') or ''}".strip())
    if failures:
        raise StreamrecError("the broker refused to create " + "; ".join(failures))
    return [n for n in asked if n in created]


__all__ = ["align_topic_configs", "check_copartitioned", "check_login", "check_topic_access", "check_topic_name", "committed_offsets", "ensure_streamrec_topics", "ensure_topics", "missing_topics", "partition_count", "probe", "require_topic", "require_topics", "topic_ids", "uneven_partitions", "wait_for_kafka"]
