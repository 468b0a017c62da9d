"""Search through a real worker, Kafka and Redis (issue 18): the worker reads the whole items
topic into its catalogue (tombstones remove, bad values are dead-lettered), answers a
SearchEvent with a personalised list on the recommendations topic, remembers the query in the
user's state, and leans their next home-page list towards it, with new items by their text."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import numpy as np
from kafka.admin import NewTopic
from prometheus_client import CollectorRegistry
from workerkit import (
    ROOT,
    consume_until,
    free_port,
    http_get,
    produce,
    read_all,
    user_doc,
    wait_for,
)

from online_models.search import Catalogue, TextEmbedder
from stream import catalogue_feed
from stream.catalogue_feed import CatalogueFeed
from stream.prometheus import Metrics
from stream.publisher import BatchPublisher
from stream.records import DEFAULT_BOUNDS, decode_dead_letter, decode_recommendation

TS = 1_700_000_000_000

ITEMS = [
    {"item_id": "jacket-zh", "title": "女士冬季长款羽绒服 连帽 保暖", "category_path": ["Women", "Coats"]},
    {"item_id": "jacket-en", "title": "Women's long winter down jacket with hood", "brand": "Northline"},
    {"item_id": "shoes", "title": "Men's lightweight running shoes", "category_path": ["Shoes"]},
    {"item_id": "tv", "title": "55 inch 4K LED smart TV", "price": 399.0},
    {"item_id": "lights", "title": "Set of 10 battery operated LED Christmas lights"},
    {"item_id": "gone", "title": "A discontinued LED TV stand"},
]


def test_the_worker_answers_a_search_from_the_items_topic(workers, worker_env, topic_prefix, redis_client, tmp_path):
    bootstrap = worker_env["STREAMREC_KAFKA_BOOTSTRAP"]
    worker = workers(metrics=True)
    wait_for(lambda: worker.http("/readyz")[0] == 200, 120, "the worker to be ready", worker)
    catalogue = tmp_path / "items.jsonl"  # the catalogue service's export, sent as a user would
    catalogue.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in ITEMS), encoding="utf-8")
    sent = subprocess.run([sys.executable, "-m", "stream.cli", "produce", "--catalogue", str(catalogue)], cwd=ROOT,
                          env=worker_env, capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0 and f"sent {len(ITEMS)} items to {topic_prefix}items" in sent.stdout, sent.stderr
    produce(bootstrap, topic_prefix, [("items", b"broken", b'{"item_id": "broken", "ts": 1}'),  # no title: dead-lettered
                                      ("items", b"gone", None)])  # a tombstone
    wait_for(lambda: worker.metric("streamrec_catalogue_items") == len(ITEMS) - 1
             and worker.metric("streamrec_catalogue_pending_items") == 0, 120, "the catalogue to be indexed", worker)
    assert worker.metric("streamrec_catalogue_changes_total", kind="tombstone") == 1
    assert worker.metric("streamrec_catalogue_changes_total", kind="invalid") == 1

    # a shopper who viewed the TV searches, in Chinese, for a winter down jacket
    click = {"event_id": "c1", "type": "click", "user_id": "shopper", "item_id": "tv", "ts": TS + 1000}
    query = {"event_id": "q1", "type": "search", "user_id": "shopper", "query": "冬季羽绒服", "ts": TS + 2000}
    produce(bootstrap, topic_prefix, [("clicks", b"shopper", json.dumps(click).encode())])
    consume_until(bootstrap, f"{topic_prefix}recommendations", lambda vs: any(b'"c1"' in v for v in vs), 60, worker)
    produce(bootstrap, topic_prefix, [("searches", b"shopper", json.dumps(query, ensure_ascii=False).encode())])

    def answer(values):
        recs = [decode_recommendation(v) for v in values if v is not None]
        return [r for r in recs if r.trigger_event_id == "q1"]

    values = consume_until(bootstrap, f"{topic_prefix}recommendations", answer, 60, worker)
    (rec,) = answer(values)
    assert rec.context == {"kind": "search", "query": "冬季羽绒服"} and rec.user_id == "shopper"
    ranked = [i.item_id for i in rec.items]
    assert ranked[:2] == ["jacket-zh", "jacket-en"], ranked  # the English title found by meaning
    assert "gone" not in ranked
    assert rec.items[0].explanation.source == "search" and rec.rec_id

    doc = wait_for(lambda: (d := user_doc(redis_client, topic_prefix, "shopper")) and d.get("recent_queries") and d,
                   30, "the query in the user's state", worker)
    assert doc["recent_queries"] == ["冬季羽绒服"] and doc["recent_items"] == ["tv"] and doc["query_ts"] == TS + 2000
    assert any(entry[0] == rec.rec_id for entry in doc["recs"])  # attributed like any list

    # their next home-page list leans towards the search (the query source), and items nobody
    # has clicked join it by their text, close to what they viewed (the content source)
    click2 = {**click, "event_id": "c2", "ts": TS + 2500}
    produce(bootstrap, topic_prefix, [("clicks", b"shopper", json.dumps(click2).encode())])
    values = consume_until(bootstrap, f"{topic_prefix}recommendations",
                           lambda vs: any(b'"c2"' in v for v in vs if v is not None), 60, worker)
    (home,) = [r for r in (decode_recommendation(v) for v in values if v is not None) if r.trigger_event_id == "c2"]
    sources = {i.item_id: i.reason for i in home.items}
    assert home.context is None and sources.get("jacket-zh") == "query", sources
    assert "content" in sources.values() and "tv" not in {i for i, r in sources.items() if r == "content"}, sources

    letters = [decode_dead_letter(r.value) for r in read_all(bootstrap, f"{topic_prefix}dlq")]
    assert [(d.topic, d.code) for d in letters] == [(f"{topic_prefix}items", "missing_field")], letters
    assert "title" in letters[0].reason
    assert worker.metric("streamrec_searches_answered_total") == 1

    # a restarted worker restores the catalogue from its snapshot: nothing is embedded again
    wait_for(lambda: "catalogue snapshot written" in worker.log_text(), 60, "the catalogue's snapshot", worker)
    assert worker.stop() == 0
    again = workers(metrics=True)
    wait_for(lambda: again.metric("streamrec_catalogue_items") == len(ITEMS) - 1, 120, "the catalogue restored", again)
    wait_for(lambda: again.http("/readyz")[0] == 200, 120, "the second worker to be ready", again)
    second = {**query, "event_id": "q2", "query": "smart television", "ts": TS + 3000}
    produce(bootstrap, topic_prefix, [("searches", b"shopper", json.dumps(second).encode())])
    values = consume_until(bootstrap, f"{topic_prefix}recommendations",
                           lambda vs: any(b'"q2"' in v for v in vs if v is not None), 60, again)
    (rec2,) = [r for r in (decode_recommendation(v) for v in values if v is not None) if r.trigger_event_id == "q2"]
    assert rec2.items[0].item_id == "tv"
    assert again.metric("streamrec_catalogue_changes_total", kind="upsert") == 0  # restored, not read and embedded
    assert "catalogue restored from its snapshot: 5 items" in again.log_text()

    # `streamrec serve` beside the worker: the same catalogue and models, read from Redis
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    serve = subprocess.Popen([sys.executable, "-m", "stream.cli", "serve", "--port", str(port), "--host", "127.0.0.1"],
                             cwd=ROOT, env=worker_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        served = lambda: (tmp_path / "serve.log").read_text(errors="replace")  # noqa: E731
        wait_for(lambda: http_get(f"{base}/readyz")[0] == 200 and "catalogue restored" in served(), 120,
                 f"serve to be ready:\n{served()}")
        status, body = http_get(f"{base}/v1/search?q=%E5%86%AC%E5%AD%A3%E7%BE%BD%E7%BB%92%E6%9C%8D&user_id=shopper&k=2")
        assert status == 200, body
        assert [i["item_id"] for i in json.loads(body)["items"]] == ["jacket-zh", "jacket-en"]
        status, body = http_get(f"{base}/v1/items/jacket-zh/similar?k=1")
        assert status == 200 and json.loads(body)["items"][0]["item_id"] == "jacket-en"
        status, body = http_get(f"{base}/v1/users/shopper/recommendations?k=5")
        assert status == 200 and isinstance(json.loads(body)["items"], list)
        listed = json.loads(body)  # named as the worker's lists, so a click echoing it counts for its arm
        assert listed["variant"] == "default" and 0 < len(listed["rec_id"]) <= 24
        status, body = http_get(f"{base}/v1/search?q=tv&k=1000")
        assert status == 400 and "k=1000" in json.loads(body)["error"]
    finally:
        serve.terminate()
        assert serve.wait(30) == 0, served()
        log.close()


async def test_a_missing_items_topic_is_an_empty_catalogue_until_it_exists(kafka_bootstrap, kafka_admin, topic_prefix,
                                                                           monkeypatch):
    # serve (or a worker) started on a prefix whose items topic does not exist yet: it must not
    # wait for a catalogue that cannot come (serve stayed unready for ever), and must read the
    # topic from its start once someone creates it
    monkeypatch.setattr(catalogue_feed, "MISSING_TOPIC_EVERY_S", 0.2)
    topic = f"{topic_prefix}items"
    feed = CatalogueFeed(Catalogue(TextEmbedder(threads=1)), {"bootstrap_servers": kafka_bootstrap}, topic,
                         DEFAULT_BOUNDS, Metrics(CollectorRegistry()))
    reading = asyncio.create_task(feed.run())
    try:
        await asyncio.wait_for(feed.caught_up.wait(), 60)
        assert feed.topic_exists is False and len(feed.catalogue) == 0
        await asyncio.to_thread(kafka_admin.create_topics, [NewTopic(topic, 2, 1)])
        item = {"item_id": "tv", "title": "55 inch 4K LED smart TV", "ts": TS}
        await asyncio.to_thread(produce, kafka_bootstrap, topic_prefix, [("items", b"tv", json.dumps(item).encode())])
        for _ in range(600):  # 60 s at most
            if len(feed.catalogue) == 1 and not feed.catalogue.pending:
                break
            await asyncio.sleep(0.1)
        assert feed.topic_exists is True and len(feed.catalogue) == 1, (feed.topic_exists, len(feed.catalogue))
        await asyncio.wait_for(feed.caught_up.wait(), 30)  # read to the end of the topic that came
        assert not reading.done()
    finally:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)


class _PoisonedModel:
    """A text model that raises on one item's text (a bug of the model or its tokenizer) and
    embeds every other text."""

    dim = 4
    name = "poisoned-test-model"

    def queries(self, texts):
        return np.ones((len(texts), 4), dtype=np.float32) / 2

    def passages(self, texts):
        if any("Poison" in text for text in texts):
            raise ValueError("the tokenizer cannot take this text")
        return self.queries(texts)


async def test_an_item_the_text_model_raises_on_reaches_the_dead_letter_topic(kafka_bootstrap, kafka_admin,
                                                                               topic_prefix):
    # it was only logged: its record was gone by the time the model raised on it, so nothing
    # on the DLQ said which value, where, or what to do
    topic, dlq = f"{topic_prefix}items", f"{topic_prefix}dlq"
    await asyncio.to_thread(kafka_admin.create_topics, [NewTopic(topic, 2, 1), NewTopic(dlq, 1, 1)])
    values = {item_id: json.dumps({"item_id": item_id, "title": title, "ts": TS}).encode()
              for item_id, title in [("lamp", "Desk lamp"), ("pill", "Poison pill"), ("chair", "Office chair")]}
    placed = await asyncio.to_thread(produce, kafka_bootstrap, topic_prefix,
                                     [("items", item_id.encode(), value) for item_id, value in values.items()])
    publisher = BatchPublisher(kafka_bootstrap)
    metrics = Metrics(CollectorRegistry())
    feed = CatalogueFeed(Catalogue(_PoisonedModel()), {"bootstrap_servers": kafka_bootstrap}, topic, DEFAULT_BOUNDS,
                         metrics, publisher.publish, dlq, reader="worker-test")
    reading = asyncio.create_task(feed.run())
    try:
        await asyncio.wait_for(feed.caught_up.wait(), 60)
        deadline = time.monotonic() + 60
        while not (letters := await asyncio.to_thread(read_all, kafka_bootstrap, dlq)):
            assert time.monotonic() < deadline and not reading.done(), "no dead letter on the DLQ topic"
            await asyncio.sleep(0.2)
        assert "lamp" in feed.catalogue and "chair" in feed.catalogue and "pill" not in feed.catalogue
        assert feed.catalogue.pending == 0 and not reading.done()
    finally:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        await publisher.stop()
    (record,) = letters
    letter = decode_dead_letter(record.value)
    assert (record.key, letter.code, letter.raw) == (b"pill", "embedding_failed", values["pill"].decode())
    assert (letter.topic, letter.partition, letter.offset) == placed[1]
    assert "ValueError: the tokenizer cannot take this text" in letter.reason and "worker-test" in letter.reason
    assert metrics.registry.get_sample_value("streamrec_dead_letters_published_total") == 1
