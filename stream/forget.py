"""``streamrec forget``: ask the workers to erase users (one ForgetRequest each).

A request goes to ``<prefix>forget``, keyed by the user id like the user's events, so it lands
on the partition whose owner holds the user's state. That worker deletes the state, writes a
tombstone for the user on the (compacted) recommendations topic and purges its models; every
other worker purges its own models; all of them refuse the user's events up to the request's
``ts`` from then on (docs/operations.md, "Forgetting a user", says when an erasure is complete).
"""

from __future__ import annotations

import asyncio
import shlex
import time
import uuid
from collections.abc import Callable
from typing import Annotated

import typer
from aiokafka.errors import KafkaError

from stream.connections import KafkaConnection
from stream.decoding import decode_forget
from stream.errors import InvalidEvent, StreamrecError, counted, some_of
from stream.produce import started_producer
from stream.records import ForgetRequest, encode
from stream.settings import Settings
from stream.topics import check_copartitioned, require_topic


def forget_requests(user_ids: list[str], now_ms: int | None = None) -> list[ForgetRequest]:
    """One request per distinct user id, each with a fresh request id, dated now; a user id the
    worker would refuse raises :class:`InvalidEvent` (``reason`` names it).

    >>> [r.user_id for r in forget_requests(["u1", "u2", "u1"], now_ms=5)]
    ['u1', 'u2']
    """
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    out = []
    for uid in dict.fromkeys(user_ids):
        try:
            uid.encode()
        except UnicodeEncodeError:  # bytes that are not UTF-8 on the command line arrive as lone surrogates
            raise InvalidEvent("not_utf8", f"field `user_id` {uid!r} is not UTF-8 text", "user_id") from None
        req = ForgetRequest(user_id=uid, request_id=f"forget-{uuid.uuid4().hex[:16]}", ts=now)
        decode_forget(encode(req))  # the worker's own door: the same refusals, here and now
        out.append(req)
    return out


#: user ids a failure names at most, of those whose requests Kafka did not confirm
UNSENT_IDS_SHOWN = 10


def unsent_text(requests: list[ForgetRequest], confirmed: int) -> str:
    """What a failure says of ``requests`` when Kafka confirmed the first ``confirmed`` alone.

    >>> reqs = forget_requests(["u1", "u 2", "u3"], now_ms=5)
    >>> print(unsent_text(reqs, 1))
    Kafka confirmed the request for the first of the 3 users (above); for the other 2, run forget again with the same options for: 'u 2' u3
    >>> print(unsent_text(reqs, 0))
    Kafka confirmed none of the 3 requests; run the same command again
    """
    if confirmed == 0:
        return f"Kafka confirmed none of the {counted(len(requests), 'request')}; run the same command again"
    rest = [req.user_id for req in requests[confirmed:]]
    head = "the request for the first" if confirmed == 1 else f"the requests for the first {confirmed:,}"
    return (f"Kafka confirmed {head} of the {len(requests):,} users (above); for the other {len(rest):,}, run forget "
            f"again with the same options for: {some_of(rest, UNSENT_IDS_SHOWN, shlex.quote, ' ')}")


async def send_forget_requests(kafka: KafkaConnection | str, topic: str, requests: list[ForgetRequest],
                               on_sent: Callable[[ForgetRequest, int], None] | None = None) -> list[int]:
    """Send ``requests`` to ``topic`` keyed by user id, one after the other, each confirmed by
    every in-sync replica before the next is sent; returns each request's partition.

    ``on_sent``: called with each request and its partition once Kafka confirmed it. A failure
    says which requests Kafka confirmed (the first ones) and for which users to run it again.
    """
    kafka = KafkaConnection.of(kafka)
    producer = await started_producer(kafka, client_id="streamrec-forget", acks="all", enable_idempotence=True,
                                      request_timeout_ms=30_000)
    partitions: list[int] = []
    try:
        for req in requests:
            meta = await producer.send_and_wait(topic, encode(req), key=req.user_id.encode())
            partitions.append(meta.partition)
            if on_sent is not None:
                on_sent(req, meta.partition)
    except KafkaError as exc:
        raise StreamrecError(f"sending forget requests to {topic} failed: {exc}; "
                             f"{unsent_text(requests, len(partitions))}") from None
    finally:
        await producer.stop()
    return partitions


def forget(
    user_ids: Annotated[list[str], typer.Argument(help="The ids of the users to erase, as the site sends them.",
                                                  metavar="USER_ID", show_default=False)],
    bootstrap: Annotated[str | None, typer.Option(
        "--bootstrap", "-b", help="Kafka bootstrap servers (default STREAMREC_KAFKA_BOOTSTRAP).")] = None,
    topic_prefix: Annotated[str | None, typer.Option(
        "--topic-prefix", help="Prefix of the topic names (default STREAMREC_TOPIC_PREFIX).")] = None,
) -> None:
    """Erase users: their state, what the models learned of them, and their recommendations.

    Sends one ForgetRequest per user to <prefix>forget. The worker that owns the user deletes their Redis state and writes a tombstone on <prefix>recommendations (`streamrec tail --user ID` shows it); every worker purges the user from its models and never learns their events up to now again; a later event starts the user afresh.

    Their raw events stay in Kafka until the topics' retention (STREAMREC_RAW_RETENTION_H) removes them. Watch streamrec_users_forgotten_total, or the worker's log line with the request id.
    """
    settings = Settings.with_options(kafka_bootstrap=("--bootstrap", bootstrap), topic_prefix=("--topic-prefix", topic_prefix))
    try:
        requests = forget_requests(user_ids)
    except InvalidEvent as exc:
        raise typer.BadParameter(exc.reason.replace("field `user_id`", "a user id"), param_hint="USER_ID") from None
    topics = settings.topics
    require_topic(settings, topics.forget)  # a wrong prefix must not "send" to nobody
    check_copartitioned(settings.kafka, topics.consumed)  # else a request misses the user's partition

    def said(req: ForgetRequest, partition: int) -> None:  # at once: a later failure leaves the confirmed ones listed
        typer.echo(f"{req.request_id}  sent for user {req.user_id} ({topics.forget}[{partition}])")

    asyncio.run(send_forget_requests(settings.kafka, topics.forget, requests, said))


__all__ = ["forget", "forget_requests", "send_forget_requests"]
