"""Fencing: a worker that lost its partitions never overwrites what their next owner wrote.

Worker A reaches Redis through a small TCP proxy that can hold back A's writes. Mid-stream the
proxy holds them (A's batch in hand is stuck saving its state, as behind a network split),
A is paused (SIGSTOP, a long pause: its session times out), and worker B joins and takes every
partition. Then the proxy lets A's held commands through, A resumes, and its late writes
arrive after B's: they must be refused. Every user's count is exact afterwards.
"""

from __future__ import annotations

import re
import signal

from workerkit import FlowingFeed, HoldingProxy, exactly_once, wait_for


def assigned(worker) -> int:
    """How many partitions the worker's /readyz says it holds (-1: no answer)."""
    status, body = worker.http("/readyz")
    m = re.search(r"(\d+) input partitions? assigned", body)
    return int(m.group(1)) if m and status == 200 else -1


def test_a_paused_worker_whose_writes_arrive_late_is_fenced_and_counts_stay_exact(worker_env, workers, topic_prefix,
                                                                                    redis_client):
    host, port = re.match(r"redis://([^:/]+):(\d+)", worker_env["STREAMREC_REDIS_URL"]).groups()
    proxy = HoldingProxy(host, int(port)).start()
    try:
        with FlowingFeed(worker_env["STREAMREC_KAFKA_BOOTSTRAP"], topic_prefix, seed=51, n_events=5000) as feed:
            a = workers(metrics=True, STREAMREC_REDIS_URL=f"redis://127.0.0.1:{proxy.port}/0")
            feed.start(a)
            wait_for(lambda: sum(feed.applied(redis_client).values()) > 500, 60, "A to apply events", a)
            proxy.hold()  # A's next state write (its batch in hand) is held back
            wait_for(lambda: proxy.held_writes > 0, 30, "A to be stuck writing to Redis", a)
            a.proc.send_signal(signal.SIGSTOP)  # and paused long enough to lose its partitions
            try:
                # counted before B starts: A's writes are held, so what is applied from here on is B's.
                # (Counted after B owns the partitions, a slow start could let the feed end and B catch
                # up on all of it first, leaving nothing more to wait for: a CI run timed out so.)
                applied_by_a = sum(feed.applied(redis_client).values())
                b = workers(metrics=True)
                wait_for(lambda: assigned(b) == 4, 90, "B to own every partition", b)
                wait_for(lambda: sum(feed.applied(redis_client).values()) > applied_by_a + 200, 60,
                         "B to apply events", b)
                proxy.release()  # A's held writes reach Redis now, after B's
            finally:
                a.proc.send_signal(signal.SIGCONT)
            feed.wait_until_all_applied(redis_client, b, timeout=240)
            wait_for(lambda: a.metric("streamrec_fenced_batches_total") >= 1, 60, "A's late write to be refused", a)
            assert exactly_once(redis_client, topic_prefix, feed.expected)  # still: the refused write changed nothing
            assert "fenced:" in a.log_text()
            a.assert_alive()
            assert a.agent_restarts() == [] and b.agent_restarts() == []
    finally:
        proxy.close()
