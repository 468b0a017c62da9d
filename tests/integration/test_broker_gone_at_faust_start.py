"""A broker that goes away between the worker's wait for it (stream/broker_wait.py) and Faust's
start: Faust's producer and consumer bootstrap again when they start, and found no broker, so
the worker exited with status 1 ("Unable to bootstrap from ..."), a crash for its supervisor
to restart. A chaos soak hit it with a broker killed within a second of a worker's start. Now
their start waits for the broker, with back-off (stream/consumer.py, ``bootstrapped``)."""

from __future__ import annotations

import asyncio
import logging

from workerkit import until

from stream.app import create_app
from stream.settings import Settings


async def test_the_worker_producer_start_waits_for_a_broker_that_went_away(unstarted_kafka, topic_prefix, tmp_path,
                                                                           caplog):
    caplog.set_level(logging.WARNING, "stream.consumer")
    settings = Settings.from_env({"STREAMREC_KAFKA_BOOTSTRAP": unstarted_kafka.address, "STREAMREC_TOPIC_PREFIX": topic_prefix,
                                  "STREAMREC_APP_ID": f"{topic_prefix}worker", "STREAMREC_MODEL_DIR": str(tmp_path / "models")})
    app = create_app(settings, load_model=False)
    producer = app.producer  # Faust's, as the worker's Worker starts it
    starting = asyncio.ensure_future(producer.start())
    try:
        # no broker answers: the start is tried again, and neither raises nor gives up
        await until(lambda: caplog.text.count("the producer could not reach Kafka as the worker started") >= 2,
                    "the producer's start to be tried again", starting, timeout=30)
        await asyncio.to_thread(unstarted_kafka.start)
        await asyncio.wait_for(starting, 60)
        assert producer._producer is not None and producer._producer._sender._sender_task is not None
    finally:
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await producer.stop()
