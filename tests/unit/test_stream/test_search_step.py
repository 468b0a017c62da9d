"""Searches in the worker: the pure SearchStep, and the batch handler's side topic with the
in-memory store (tests/integration/test_search_e2e.py runs it through real Kafka and Redis)."""

from __future__ import annotations

import json

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from online_models import Recommender, RecommenderConfig
from online_models.search import Catalogue, CatalogueItem, TextEmbedder
from stream.experiments import SEARCHED
from stream.handler import BatchHandler, RawMessage
from stream.pipeline import RecommendationStep
from stream.prometheus import Metrics
from stream.records import ClickEvent, SearchEvent, decode_dead_letter, decode_recommendation
from stream.search_step import RECENT_QUERIES, SearchConfig, SearchStep
from stream.settings import TopicNames
from stream.state import InMemoryUserStateStore, UserState

TS = 1_700_000_000_000
CATALOGUE = [
    CatalogueItem(item_id="jacket-zh", title="女士冬季长款羽绒服 连帽 保暖", category_path=("Women", "Coats"), brand="Yuki"),
    CatalogueItem(item_id="jacket-en", title="Women's long winter down jacket with hood", category_path=("Women", "Coats"),
                  brand="Northline"),
    CatalogueItem(item_id="parka", title="Men's winter parka, insulated, waterproof", category_path=("Men", "Coats")),
    CatalogueItem(item_id="shoes", title="Men's lightweight running shoes", category_path=("Shoes",)),
    CatalogueItem(item_id="tv", title="55 inch 4K LED smart TV"),
]


@pytest.fixture(scope="module")
def catalogue():
    catalogue = Catalogue(TextEmbedder(threads=1), candidates=10)
    catalogue.upsert(CATALOGUE)
    catalogue.flush()
    return catalogue


def search(eid, user, query, ts=TS, **kw):
    return SearchEvent(event_id=eid, type="search", user_id=user, query=query, ts=ts, **kw)


def trained_step():
    """Models that learned that shoppers who view ``a`` view ``b`` next."""
    step = RecommendationStep(Recommender.default(RecommenderConfig(k=10, n_candidates=50)))
    events = []
    for u in range(40):
        events += [ClickEvent(event_id=f"e{u}a", user_id=f"v{u}", item_id="a", ts=TS + u * 10),
                   ClickEvent(event_id=f"e{u}b", user_id=f"v{u}", item_id="b", ts=TS + u * 10 + 1)]
    step(events, {}, lambda: TS)
    return step


def test_a_query_retrieves_from_the_catalogue_in_any_language_and_the_answer_says_so(catalogue):
    step = SearchStep(RecommendationStep(Recommender.default()), catalogue, SearchConfig(k=3))
    result = step([search("s1", "new-user", "女士羽绒服")], {}, lambda: TS + 5)  # women's down jacket
    (rec,) = result.recommendations
    assert rec.context == {"kind": "search", "query": "女士羽绒服"}
    assert [i.item_id for i in rec.items[:2]] == ["jacket-zh", "jacket-en"]  # the English title by meaning
    assert all(i.reason == "search" and i.explanation.matched in ("words", "meaning", "both") for i in rec.items)
    assert (rec.trigger_event_id, rec.event_ts, rec.generated_ts) == ("s1", TS, TS + 5)
    assert decode_recommendation(result.payloads[0]) == rec
    state = msgspec.json.decode(result.docs["new-user"], type=UserState)
    assert state.recent_queries == ["女士羽绒服"] and state.recs[0][0] == rec.rec_id
    assert state.recs[0][2] == SEARCHED  # a search's answer: not the list live hits are judged against


def test_filters_narrow_the_catalogue(catalogue):
    step = SearchStep(RecommendationStep(Recommender.default()), catalogue)
    (rec,) = step([search("s1", "u", "winter coat", filters={"category": "men"})], {}, lambda: TS).recommendations
    assert [i.item_id for i in rec.items] == ["parka"]
    (rec,) = step([search("s2", "u", "jacket", filters={"brand": "NORTHLINE"})], {}, lambda: TS).recommendations
    assert [i.item_id for i in rec.items] == ["jacket-en"]


def test_the_shops_results_are_re_ranked_for_the_user_and_nothing_is_added():
    step = trained_step()
    results = ["x1", "x2", "x3", "x4", "x5", "b"]
    searcher = SearchStep(step, None, SearchConfig(k=10, personal_weight=0.3))
    known = UserState("fan", recent_items=["a"], purchased=["b"])  # bought b before: kept in a search
    (rec,) = searcher([search("s1", "fan", "b please", results=results)], {"fan": known}, lambda: TS).recommendations
    ranked = [i.item_id for i in rec.items]
    assert sorted(ranked) == sorted(results)
    assert ranked.index("b") < results.index("b")  # the user's models moved it up
    assert rec.items[ranked.index("b")].reason == "covisit"  # and the explanation says why
    (plain,) = searcher([search("s2", "stranger", "b please", results=results)], {}, lambda: TS).recommendations
    assert [i.item_id for i in plain.items] == results  # nothing known of the user: the shop's order
    assert {i.explanation.matched for i in plain.items} == {"shop"}
    none = SearchStep(step, None, SearchConfig(k=10, personal_weight=0.0))
    (rec,) = none([search("s3", "fan", "b please", results=results)], {"fan": known}, lambda: TS).recommendations
    assert [i.item_id for i in rec.items] == results


def test_a_shop_that_found_nothing_gets_nothing_added_from_the_catalogue(catalogue):
    searcher = SearchStep(trained_step(), catalogue, SearchConfig(k=10))
    (found,) = searcher([search("s1", "u1", "jacket")], {}, lambda: TS).recommendations
    (empty,) = searcher([search("s2", "u1", "jacket", results=[])], {}, lambda: TS).recommendations
    assert found.items and empty.items == []


def test_without_a_catalogue_or_results_the_answer_is_empty_and_a_redelivery_is_skipped():
    step = SearchStep(RecommendationStep(Recommender.default()))
    result = step([search("s1", "u", "anything")], {}, lambda: TS, positions=[("searches:0", 7)])
    assert result.recommendations[0].items == []
    state = msgspec.json.decode(result.docs["u"], type=UserState)
    again = step([search("s1", "u", "anything")], {"u": state}, lambda: TS, positions=[("searches:0", 7)])
    assert again.recommendations == [] and again.duplicates == 1


def test_a_search_the_producer_sent_twice_is_answered_once():
    """A producer's retry has a new offset and the same event_id: caught by the id, as an event's
    is, in the same batch and in a later one; it was answered again, and counted again as an
    experiment's list. Another user's search with that id is theirs to have."""
    step = SearchStep(RecommendationStep(Recommender.default()))
    first = step([search("s1", "u", "lamp"), search("s1", "u", "lamp"), search("s1", "v", "lamp")], {}, lambda: TS,
                 positions=[("searches:0", 7), ("searches:0", 8), ("searches:1", 3)])
    assert [r.user_id for r in first.recommendations] == ["u", "v"] and first.duplicates == 1
    state = msgspec.json.decode(first.docs["u"], type=UserState)
    again = step([search("s1", "u", "lamp"), search("s2", "u", "lamp")], {"u": state}, lambda: TS,
                 positions=[("searches:0", 9), ("searches:0", 10)])
    assert [r.trigger_event_id for r in again.recommendations] == ["s2"] and again.duplicates == 1


def test_recent_queries_are_bounded_and_a_repeat_moves_to_the_end():
    step = SearchStep(RecommendationStep(Recommender.default()))
    queries = [f"q{i}" for i in range(RECENT_QUERIES + 2)] + ["q3"]
    result = step([search(f"s{i}", "u", q) for i, q in enumerate(queries)], {}, lambda: TS)
    state = msgspec.json.decode(result.docs["u"], type=UserState)
    assert state.recent_queries == ["q2", "q4", "q5", "q6", "q3"]


def test_a_search_that_raises_is_a_failure_and_the_others_are_answered(catalogue):
    class Broken:
        def __len__(self):
            return 1

        def search(self, query, depth):
            if query == "boom":
                raise RuntimeError("index gone")
            return catalogue.search(query, depth)

    step = SearchStep(RecommendationStep(Recommender.default()), Broken())
    result = step([search("s1", "u1", "tv"), search("s2", "u2", "boom"), search("s3", "u3", "shoes")], {}, lambda: TS)
    assert [r.trigger_event_id for r in result.recommendations] == ["s1", "s3"]
    (failure,) = result.failures
    assert failure.index == 1 and "answering the search raised RuntimeError: index gone" in failure.reason
    assert "u2" not in result.docs


def test_the_personal_weight_is_bounded():
    with pytest.raises(ValueError, match="personal_weight"):
        SearchConfig(personal_weight=1.5)


async def test_the_handler_answers_searches_and_dead_letters_bad_ones(catalogue):
    store = InMemoryUserStateStore()
    sent: list = []

    async def publish(records):
        sent.extend(records)
        return []

    topics = TopicNames("t.")
    metrics = Metrics(CollectorRegistry())
    step = RecommendationStep(Recommender.default())
    handler = BatchHandler(step, store, publish, topics, metrics)
    handler.search = SearchStep(step, catalogue, SearchConfig(k=2))
    good = json.dumps({"event_id": "s1", "type": "search", "user_id": "u1", "query": "smart tv", "ts": TS}).encode()
    bad = json.dumps({"event_id": "s2", "type": "search", "user_id": "u1", "query": "   ", "ts": TS}).encode()
    messages = [RawMessage("t.searches", 0, 0, b"u1", good), RawMessage("t.searches", 0, 1, b"u1", bad)]
    await handler.handle_isolated(messages)
    recs = [decode_recommendation(v) for t, _, v in sent if t == "t.recommendations"]
    letters = [decode_dead_letter(v) for t, _, v in sent if t == "t.dlq"]
    assert [r.items[0].item_id for r in recs] == ["tv"] and recs[0].context["kind"] == "search"
    assert [(d.code, d.offset) for d in letters] == [("invalid_value", 1)]
    state = (await store.load_many(["u1"]))["u1"]
    assert state.recent_queries == ["smart tv"] and state.offsets == {"t.searches:0": 0}
    assert metrics.searches_answered._value.get() == 1
    assert handler.events_applied == 0  # a search is not an event the models learn


def test_produce_refuses_a_bad_catalogue_file_with_its_line_and_no_traceback(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    bad = tmp_path / "items.jsonl"
    bad.write_text('{"item_id": "i1", "title": "Down jacket"}\n{"item_id": "i2", "title": "", "ts": 1}\n',
                   encoding="utf-8")
    root = Path(__file__).resolve().parents[3]
    env = {"PATH": "/usr/bin:/bin", "STREAMREC_KAFKA_BOOTSTRAP": "127.0.0.1:1"}  # never reached: refused before
    done = subprocess.run([sys.executable, "-m", "stream.cli", "produce", "--catalogue", str(bad)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"{bad}: catalogue line 2: field `title`: must not be empty" in done.stderr and "Traceback" not in done.stderr
    both = subprocess.run([sys.executable, "-m", "stream.cli", "produce", "--catalogue", str(bad), "-d", str(bad),
                           "-f", "otto"], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert both.returncode == 2 and "a log of events" in both.stderr and "Traceback" not in both.stderr


def test_produce_refuses_a_catalogue_line_over_the_workers_lowered_price_maximum(tmp_path):
    """The workers refuse an item priced over STREAMREC_MAX_PRICE (number_too_large, dead-lettered
    by each of them); produce, under the same settings, refuses the file before sending it."""
    import subprocess
    import sys
    from pathlib import Path

    items = tmp_path / "items.jsonl"
    items.write_text('{"item_id": "i1", "title": "Down jacket", "price": 50}\n'
                     '{"item_id": "i2", "title": "Sofa", "price": 5000}\n', encoding="utf-8")
    root = Path(__file__).resolve().parents[3]
    env = {"PATH": "/usr/bin:/bin", "STREAMREC_KAFKA_BOOTSTRAP": "127.0.0.1:1", "STREAMREC_MAX_PRICE": "1000"}
    done = subprocess.run([sys.executable, "-m", "stream.cli", "produce", "--catalogue", str(items)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"{items}: catalogue line 2: field `price`" in done.stderr and "STREAMREC_MAX_PRICE" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_the_synthetic_catalogue_is_valid_item_events_of_the_synthetic_shops_items():
    from online_models.datasets import synthetic_interactions
    from stream.decoding import decode_item
    from stream.produce_catalogue import synthetic_items
    from stream.records import encode

    items = synthetic_items(42, TS)
    assert len(items) == 2000 and all(decode_item(encode(i)) == i for i in items)
    category = {i.item_id: i.category_path[0] for i in items}
    assert all(category[x.item_id] == x.category_id for x in synthetic_interactions(3000))


def test_a_users_latest_search_leans_their_next_home_page_list_towards_it(catalogue):
    step = trained_step()  # shoppers who view a view b
    step.catalogue = catalogue
    searched = UserState("s", recent_items=["a"], recent_queries=["old query", "running shoes"], query_ts=TS + 9_000)
    result = step([ClickEvent(event_id="n1", user_id="s", item_id="a", ts=TS + 10_000)], {"s": searched},
                  lambda: TS + 10_001)
    (rec,) = result.recommendations
    by_id = {i.item_id: i for i in rec.items}
    assert "shoes" in by_id and by_id["shoes"].reason == "query"  # the catalogue's match of the latest query
    assert "b" in by_id  # what the models propose stays
    plain = step([ClickEvent(event_id="n2", user_id="p", item_id="a", ts=TS + 10_000)], {}, lambda: TS + 10_001)
    assert "shoes" not in {i.item_id for i in plain.recommendations[0].items}  # never searched: as before
    step.catalogue = None
    again = step([ClickEvent(event_id="n3", user_id="s2", item_id="a", ts=TS + 10_000)],
                 {"s2": UserState("s2", recent_items=["a"], recent_queries=["running shoes"], query_ts=TS + 9_000)},
                 lambda: TS + 10_001)
    assert "shoes" not in {i.item_id for i in again.recommendations[0].items}  # no catalogue: no query source


def test_a_search_steers_the_home_page_for_query_ttl_then_no_longer(catalogue):
    from stream.step_inputs import StepConfig

    step = trained_step()
    step.catalogue = catalogue
    step.config = StepConfig(query_ttl_ms=60_000)

    def home_list(user, searched_at, clicked_at):
        state = UserState(user, recent_items=["a"], recent_queries=["running shoes"], query_ts=searched_at)
        result = step([ClickEvent(event_id=f"h-{user}", user_id=user, item_id="a", ts=clicked_at)], {user: state},
                      lambda: clicked_at + 1)
        return {i.item_id: i.reason for i in result.recommendations[0].items}

    assert home_list("fresh", TS, TS + 60_000).get("shoes") == "query"  # a minute later: still steered
    assert "shoes" not in home_list("stale", TS, TS + 60_001)  # past the TTL: as if they never searched
    assert "shoes" not in home_list("unknown", 0, TS)  # a state from before query_ts was kept
    assert home_list("late", TS + 5_000, TS).get("shoes") == "query"  # a click that arrived after the search
    step.config = StepConfig(query_ttl_ms=0)
    assert "shoes" not in home_list("off", TS, TS)  # STREAMREC_QUERY_TTL_S=0: searches never steer


def test_a_search_remembers_its_time(catalogue):
    step = SearchStep(RecommendationStep(Recommender.default()), catalogue, SearchConfig(k=3))
    result = step([search("s9", "u9", "running shoes", ts=TS + 42)], {}, lambda: TS + 50)
    state = msgspec.json.decode(result.docs["u9"], type=UserState)
    assert state.query_ts == TS + 42 and state.recent_queries == ["running shoes"]


async def test_the_feeds_dead_letters_survive_a_publish_that_raises(catalogue):
    from types import SimpleNamespace

    from stream.catalogue_feed import CatalogueFeed
    from stream.records import DEFAULT_BOUNDS
    from stream.retry import Backoff

    calls: list[list] = []

    async def flaky(records):
        calls.append(list(records))
        if len(calls) == 1:
            raise ConnectionError("producer gone")
        return []

    metrics = Metrics(CollectorRegistry())
    feed = CatalogueFeed(Catalogue(catalogue.embedder), {}, "t.items", DEFAULT_BOUNDS, metrics, flaky, "t.dlq",
                         backoff=Backoff(base_s=0.001, jitter=0))
    bad = SimpleNamespace(topic="t.items", offset=4, key=b"x", value=b'{"item_id": "x", "ts": 1}')
    await feed._apply(0, [bad])
    assert len(calls) == 2 and calls[1][0][0] == "t.dlq"  # sent again after the failure
    assert decode_dead_letter(calls[1][0][2]).code == "missing_field" and feed.offsets == {0: 5}


async def test_the_feed_dead_letters_an_item_keyed_by_another_id_and_cuts_a_huge_key(catalogue):
    """The items topic is compacted by key: an item under another key would outlive its
    tombstone (and come back for every reader that starts afresh), so it is refused."""
    from types import SimpleNamespace

    from stream.catalogue_feed import CatalogueFeed
    from stream.records import DEFAULT_BOUNDS

    sent: list = []

    async def publish(records):
        sent.extend(records)
        return []

    feed = CatalogueFeed(Catalogue(catalogue.embedder), {}, "t.items", DEFAULT_BOUNDS, Metrics(CollectorRegistry()),
                         publish, "t.dlq")
    value = b'{"item_id": "B", "title": "Bogus walrus kettle", "ts": 1}'
    await feed._apply(0, [SimpleNamespace(topic="t.items", offset=0, key=b"ghost", value=value),
                          SimpleNamespace(topic="t.items", offset=1, key=b"k" * 1_040_000, value=b"x" * 8_300),
                          SimpleNamespace(topic="t.items", offset=2, key=b"B", value=value)])
    (ghost, huge) = sent
    letter = decode_dead_letter(ghost[2])
    assert ghost[1] == b"ghost" and letter.code == "invalid_value" and "key 'ghost'" in letter.reason
    assert huge[1] == b"k" * 1024 and decode_dead_letter(huge[2]).code == "malformed_json"
    assert feed.offsets == {0: 3}


def test_a_new_item_is_recommended_by_its_text_until_events_name_it(catalogue):
    # the models know a and b (events); the catalogue's items have no events: all are cold
    step = trained_step()
    step.catalogue = catalogue
    viewer = UserState("w", recent_items=["jacket-en"])
    result = step([ClickEvent(event_id="c1", user_id="w", item_id="jacket-en", ts=TS + 10_000)], {"w": viewer},
                  lambda: TS + 10_001)
    by_id = {i.item_id: i for i in result.recommendations[0].items}
    content = {item for item, i in by_id.items() if i.reason == "content"}
    assert "jacket-zh" in content  # the same jacket, titled in Chinese: nobody has clicked it
    assert "tv" not in content
    # once shoppers click it, the learners have it: it is no longer offered for its text
    step([ClickEvent(event_id=f"z{n}", user_id=f"z{n}", item_id="jacket-zh", ts=TS + 20_000 + n) for n in range(3)],
         {}, lambda: TS + 20_010)
    later = step([ClickEvent(event_id="c2", user_id="w2", item_id="jacket-en", ts=TS + 30_000)],
                 {"w2": UserState("w2", recent_items=["jacket-en"])}, lambda: TS + 30_001)
    assert all(i.reason != "content" or i.item_id != "jacket-zh" for i in later.recommendations[0].items)


def test_an_experiment_may_weight_the_search_and_content_sources(tmp_path):
    from stream.errors import ConfigError
    from stream.settings import Settings

    spec = tmp_path / "arms.toml"
    spec.write_text('experiment = "x"\n[[arms]]\nname = "a"\nshare = 0.5\n[[arms]]\nname = "b"\nshare = 0.5\n'
                    'weights = { query = 2.0, content = 0.0 }\n')
    step = RecommendationStep.from_settings(Settings.from_env({"STREAMREC_VARIANTS": str(spec)}))
    (_, b) = step.experiment.arms
    weights = b.config(step.recommender.config).weights
    assert weights["content"] == 0.0 and weights["query"] == 2.0
    spec.write_text('experiment = "x"\n[[arms]]\nname = "a"\nshare = 1.0\nweights = { contnet = 1.0 }\n')
    with pytest.raises(ConfigError, match="contnet"):
        RecommendationStep.from_settings(Settings.from_env({"STREAMREC_VARIANTS": str(spec)}))


def test_a_querys_matches_are_remembered_until_the_catalogue_changes():
    step = trained_step()
    catalogue = Catalogue(TextEmbedder(threads=1), candidates=10)
    catalogue.upsert(CATALOGUE)
    catalogue.flush()
    step.catalogue = catalogue
    calls = []
    search = catalogue.search
    catalogue.search = lambda *a, **kw: calls.append(a[0]) or search(*a, **kw)

    def home(user, ts):
        state = UserState(user, recent_items=["a"], recent_queries=["running shoes"], query_ts=ts - 1)
        result = step([ClickEvent(event_id=f"h{user}", user_id=user, item_id="a", ts=ts)], {user: state}, lambda: ts)
        return {i.item_id: i.reason for i in result.recommendations[0].items}

    assert home("x1", TS).get("shoes") == "query" and home("x2", TS + 1).get("shoes") == "query"
    assert calls == ["running shoes"]  # searched once for both users
    catalogue.upsert([CatalogueItem(item_id="trail", title="Trail running shoes for men")])
    catalogue.flush()  # a new item that matches: the next list searches again and may hold it
    assert "trail" in home("x3", TS + 2) and calls == ["running shoes"] * 2
