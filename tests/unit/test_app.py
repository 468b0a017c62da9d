"""The Faust app's rebalance hook, without a broker: ``create_app`` connects to nothing."""

from __future__ import annotations

import asyncio
import logging

from stream.app import create_app
from stream.settings import Settings


def make_app(**env):
    return create_app(Settings.from_env(env), load_model=False)


async def test_a_revocation_waits_for_the_batch_in_hand():
    app = make_app()
    shell = app.streamrec
    await shell.busy.acquire()  # a batch is being handled
    revoking = asyncio.ensure_future(app.on_partitions_revoked.send({("streamrec.clicks", 0)}))
    await asyncio.sleep(0.1)
    assert not revoking.done()  # its partitions are not handed over before its state is saved
    shell.busy.release()
    await asyncio.wait_for(revoking, 1.0)


async def test_a_revocation_does_not_wait_forever_for_a_stuck_batch(caplog):
    app = make_app(STREAMREC_KAFKA_SESSION_TIMEOUT_S="1")  # waits at most half of it
    await app.streamrec.busy.acquire()
    with caplog.at_level(logging.WARNING, logger="streamrec.app"):
        await asyncio.wait_for(app.on_partitions_revoked.send({("streamrec.clicks", 0)}), 2.0)
    assert "did not finish within" in caplog.text


async def test_nothing_revoked_waits_for_nothing():
    app = make_app()
    await app.streamrec.busy.acquire()
    await asyncio.wait_for(app.on_partitions_revoked.send(set()), 0.5)
