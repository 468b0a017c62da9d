"""All of a worker's Prometheus metrics in one bundle, built from an injected registry.

Tests pass a fresh ``CollectorRegistry`` and read sample values; the worker passes the
default registry and serves it on ``STREAMREC_METRICS_PORT``.
"""

from __future__ import annotations

import gc
import platform
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from stream.errors import DEAD_LETTER_CODES
from stream.version import own_version

# event handling is counted in milliseconds: 0.1 ms .. 2.5 s
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
END_TO_END_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
#: how often the worker counts the objects its collector policy froze (Metrics.count_frozen)
FROZEN_COUNT_INTERVAL_S = 300.0
STAGES = ("decode", "state_load", "learn", "candidates", "score", "rank", "publish", "state_save", "batch")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, namespace: str = "streamrec") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, ns = self.registry, namespace
        self.events_consumed = Counter("events_consumed_total", "Valid events consumed, by type", ["type"], namespace=ns, registry=r)
        self.events_invalid = Counter("events_invalid_total", "Invalid events sent to the dead-letter topic, by reason code", ["reason"], namespace=ns, registry=r)
        self.events_not_keyed_by_user = Counter("events_not_keyed_by_user_total", "Valid records of the input topics keyed by something other than their user_id (a producer's mistake: the user's events are split over workers; still processed), by topic; records with no key are not counted", ["topic"], namespace=ns, registry=r)
        self.duplicates_skipped = Counter("duplicates_skipped_total", "Redelivered or repeated events recognised by event_id and skipped", namespace=ns, registry=r)
        self.batch_size = Histogram("batch_size_events", "Events per micro-batch", buckets=BATCH_BUCKETS, namespace=ns, registry=r)
        self.stage_seconds = Histogram("stage_seconds", "Time per micro-batch spent in each stage", ["stage"], buckets=STAGE_BUCKETS, namespace=ns, registry=r)
        self.end_to_end_seconds = Histogram("end_to_end_seconds", "From the event's ts to the publication of its recommendation", buckets=END_TO_END_BUCKETS, namespace=ns, registry=r)
        self.recommendations_published = Counter("recommendations_published_total", "Recommendations published", namespace=ns, registry=r)
        self.dead_letters_published = Counter("dead_letters_published_total", "Dead letters published", namespace=ns, registry=r)
        self.scorer_info = Gauge("scorer_info", "The Transformer scorer in use (value 1), with its provider and model version", ["provider", "version"], namespace=ns, registry=r)
        self.model_info = Gauge("model_info", "Online model versions in use (value 1)", ["model", "version"], namespace=ns, registry=r)
        self.build_info = Gauge("build_info", "This process's streamrec and Python versions (value 1)", ["version", "python"], namespace=ns, registry=r)
        self.build_info.labels(own_version(), platform.python_version()).set(1)
        self.timer_runs = Counter("timer_runs_total", "Runs of a worker's periodic duty that ended, with or without an exception (streamrec_timer_failures_total counts those that raised)", ["timer"], namespace=ns, registry=r)
        self.timer_failures = Counter("timer_failures_total", "Runs of a worker's periodic duty (snapshots, readiness, the scorer's reload, ...) that raised; it runs again at its next interval", ["timer"], namespace=ns, registry=r)
        self.scorer_reload_failures = Counter("scorer_reload_failures_total", "Registered scorer versions refused at load or parity check", namespace=ns, registry=r)
        self.redis_errors = Counter("redis_errors_total", "Redis calls that failed (and were retried)", ["op"], namespace=ns, registry=r)
        self.kafka_errors = Counter("kafka_errors_total", "Kafka sends that failed (and were retried)", ["op"], namespace=ns, registry=r)
        self.live_hits = Counter("live_hits_total", "Next events whose item was in the last list sent to the user, by cut-off K", ["k"], namespace=ns, registry=r)
        self.live_judged = Counter("live_judged_total", "Next events of users who had been sent a list", namespace=ns, registry=r)
        self.live_reciprocal_rank = Counter("live_reciprocal_rank_sum", "Sum of 1/rank of next events found in the last list (MRR numerator)", namespace=ns, registry=r)
        self.model_snapshots = Counter("model_snapshots_total", "Snapshots of the online models written to Redis, by result (ok, failed)", ["result"], namespace=ns, registry=r)
        self.model_snapshot_seconds = Gauge("model_snapshot_seconds", "How long the last forked model snapshot took, from the fork until its process exited (the models written to Redis, a failure, or killed at the timeout)", namespace=ns, registry=r)
        self.model_snapshot_pause = Gauge("model_snapshot_pause_seconds", "How long the last model snapshot stopped the worker (the fork, or the whole pickling without one)", namespace=ns, registry=r)
        self.gc_frozen = Gauge("gc_frozen_objects", "Objects the garbage-collector policy froze (stream/gcpolicy.py), counted every few minutes: follows the live heap; one that only grows is a leak", namespace=ns, registry=r)
        self.count_frozen()
        self.events_relearned = Counter("events_relearned_total", "Events the models learned again after a restart from an older snapshot (their state had them)", namespace=ns, registry=r)
        self.offsets_reset = Counter("state_offsets_reset_total", "Users whose stored offsets counted in an input topic that was deleted and created again since (dropped as the user was loaded, so the new topic's events are applied)", namespace=ns, registry=r)
        self.states_rebuilt = Counter("states_rebuilt_total", "Users whose stored state did not decode, or whose key held another Redis type than a string (replaced by their save), and who started afresh", namespace=ns, registry=r)
        self.output_blocked = Gauge("output_blocked", "1 while Kafka refuses what the worker publishes (recommendations or dead letters); nothing after them is committed", namespace=ns, registry=r)
        self.fenced_batches = Counter("fenced_batches_total", "Batches not saved because another worker claimed their partitions since (left to that worker)", namespace=ns, registry=r)
        self.state_conflicts = Counter("state_conflicts_total", "Users whose state another worker saved between this worker's load and save (their events reached two workers: partitions added, records not keyed by user id); the batch's events were applied again to what that worker saved", namespace=ns, registry=r)
        self.batch_failures = Counter("batch_failures_total", "Batches whose handling raised past every safeguard (left unacknowledged; the log has the traceback)", namespace=ns, registry=r)
        self.model_snapshot_refused = Counter("model_snapshot_refused_total", "Model snapshots found in Redis and refused (corrupt, unsigned or foreign): a worker starting then starts with empty models; serve keeps the models it serves", namespace=ns, registry=r)
        self.peer_events_learned = Counter("peer_events_learned_total", "Events of input partitions other workers own that this worker's models learned (STREAMREC_LEARN_ALL_PARTITIONS, stream/peers.py)", namespace=ns, registry=r)
        self.peer_learn_seconds = Counter("peer_learn_seconds_total", "Time spent teaching the models the other workers' partitions (under the lock the batches take)", namespace=ns, registry=r)
        self.peer_lag = Gauge("peer_lag_events", "Events of the other workers' partitions not yet learned by this worker's models (as of the last fetch)", namespace=ns, registry=r)
        self.peer_failures = Counter("peer_failures_total", "Times reading the other workers' partitions failed and started again after a back-off", namespace=ns, registry=r)
        self._models: _ModelsLearned | None = None
        self.users_forgotten = Counter("users_forgotten_total", "Forget requests carried out by this worker as the user's owner: state deleted, models purged, recommendations tombstoned (the request id is in the log, never the user id)", namespace=ns, registry=r)
        self.forgets_applied = Counter("forgets_applied_total", "Forget requests applied to this worker's models (its own partitions and, with STREAMREC_LEARN_ALL_PARTITIONS, the others')", namespace=ns, registry=r)
        self.forgotten_remembered = Gauge("forgotten_users_remembered", "Forgotten users whose older events the models refuse (keyed hashes), as of the last snapshot; trimmed then once Kafka no longer holds their events (docs/operations.md, Forgetting a user)", namespace=ns, registry=r)
        self.searches_answered = Counter("searches_answered_total", "SearchEvents answered with a personalised list (context.kind = search)", namespace=ns, registry=r)
        self.search_end_to_end_seconds = Histogram("search_end_to_end_seconds", "From a search's ts to the publication of its answer", buckets=END_TO_END_BUCKETS, namespace=ns, registry=r)
        self.http_requests = Counter("http_requests_total", "API requests streamrec serve answered, by route and status (503: shed or the store down)", ["route", "status"], namespace=ns, registry=r)
        self.http_seconds = Histogram("http_request_seconds", "streamrec serve: from a request's parsed arrival to its answer, by route (time in the kernel's and the event loop's queues before is not in it)", ["route"], buckets=END_TO_END_BUCKETS, namespace=ns, registry=r)
        self.catalogue_items = Gauge("catalogue_items", "Items in this process's catalogue, embedded and indexed for search", namespace=ns, registry=r)
        self.catalogue_pending = Gauge("catalogue_pending_items", "Items read from the items topic and waiting to be embedded", namespace=ns, registry=r)
        self.catalogue_changes = Counter("catalogue_changes_total", "Values of the items topic applied to the catalogue, by kind (upsert, tombstone, invalid; failed: an item the text model or an index raised on alone, left out, an item whose queueing raised alone, dead-lettered, or a tombstone whose removal raised)", ["kind"], namespace=ns, registry=r)
        self.events_refused_forgotten = Counter("events_refused_forgotten_total", "Events neither applied nor learned because their user was forgotten after them (a replay, a redelivery, a late event)", namespace=ns, registry=r)
        self.forget_failures = Counter("forget_failures_total", "Forget requests whose purge raised in a model (a bug): state, lists and refusal were done, a model may still hold part of the user", namespace=ns, registry=r)
        v = ["variant"]
        self.experiment_info = Gauge("experiment_info", "1 on a worker serving an experiment (STREAMREC_VARIANTS): its name and the digest of how its file splits and serves users (workers showing two digests put users in different arms)", ["experiment", "digest"], namespace=ns, registry=r)
        self.experiment_lists = Counter("experiment_lists_total", "Recommendation lists published, by experiment arm (variant \"default\" without an experiment)", v, namespace=ns, registry=r)
        self.experiment_users = Counter("experiment_users_total", "Users served their first home-page list of the arm (as far as their state remembers), by arm: streamrec report checks them against the arms' shares (sample ratio mismatch)", v, namespace=ns, registry=r)
        self.experiment_impressions = Counter("experiment_impressions_total", "Lists the site reported as shown (ImpressionEvents), by arm", v, namespace=ns, registry=r)
        self.experiment_impressions_unmatched = Counter("experiment_impressions_unmatched_total", "Impressions not counted: for a rec_id the user's state does not remember (too old, made up) or counted before, or of a list of an arm the experiment no longer has", namespace=ns, registry=r)
        self.experiment_clicked_lists = Counter("experiment_clicked_lists_total", "Lists with at least one attributed click (each list once), by arm", v, namespace=ns, registry=r)
        self.experiment_clicks = Counter("experiment_clicks_total", "Attributed clicks, repeats on one list included, by arm", v, namespace=ns, registry=r)
        self.experiment_purchased_lists = Counter("experiment_purchased_lists_total", "Lists with at least one attributed purchase, by arm", v, namespace=ns, registry=r)
        self.experiment_purchases = Counter("experiment_purchases_total", "Attributed purchases, by arm", v, namespace=ns, registry=r)
        self.experiment_revenue = Counter("experiment_revenue_total", "Price x quantity of attributed purchases that carry a price, by arm", v, namespace=ns, registry=r)
        self.experiment_judged = Counter("experiment_judged_total", "Next events of users who had a list (live hit rate's denominator), by arm", v, namespace=ns, registry=r)
        self.experiment_groups = Counter("experiment_groups_total", "The arm's counts again per group of users (a hash of the user's id into 32 groups: each user's counts in one group), by arm, group and field (lists, impressions, clicked_lists, purchased_lists, revenue, judged, hits20): streamrec report's intervals take a user's lists together from them", ["variant", "group", "field"], namespace=ns, registry=r)
        self.experiment_hits = Counter("experiment_hits_total", "Next events whose item was in the user's last list within the top k, by arm and k", ["variant", "k"], namespace=ns, registry=r)
        self.last_event_ts = Gauge("last_event_timestamp_seconds", "Event time of the newest event handled", namespace=ns, registry=r)
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        for code in DEAD_LETTER_CODES:
            self.events_invalid.labels(code)

    def watch_models(self, models: Callable[[], object]) -> None:
        """Export ``streamrec_model_events_learned{model}``: how many events the online models
        returned by ``models()`` learned (the recommender's blend, and each learner), read at
        every scrape."""
        if self._models is None:
            self._models = _ModelsLearned(models)
            self.registry.register(self._models)
        self._models.models = models

    def count_frozen(self) -> None:
        """Set ``gc_frozen_objects`` (the worker calls this every :data:`FROZEN_COUNT_INTERVAL_S`).

        Not read at each scrape: ``gc.get_freeze_count`` walks every frozen object, holding the
        GIL (31 ms for the 238,000 objects of a step that learned the Taobao log; 57 ms for
        3 million small ones), and Prometheus scrapes a worker every 5 s (deploy/prometheus):
        the event loop and the step would stop that long each time."""
        self.gc_frozen.set(gc.get_freeze_count())

    def set_scorer(self, provider: str, version: str) -> None:
        self.scorer_info.clear()
        self.scorer_info.labels(provider, version).set(1)

    def set_models(self, versions: dict[str, str]) -> None:
        self.model_info.clear()
        for model, version in versions.items():
            self.model_info.labels(model, version).set(1)


class _ModelsLearned:
    """A collector: the events each online model has learned, read when scraped."""

    def __init__(self, models: Callable[[], object]) -> None:
        self.models = models

    def collect(self):
        family = GaugeMetricFamily("streamrec_model_events_learned", "Events the online models learned "
                                   "(each event of every input partition once with STREAMREC_LEARN_ALL_PARTITIONS)",
                                   labels=["model"])
        recommender = self.models()
        if recommender is not None:
            family.add_metric(["recommender"], getattr(recommender, "n_learned", 0))
            for name, learner in list(getattr(recommender, "learners", {}).items()):
                family.add_metric([name], getattr(learner, "n_learned", 0))
        yield family
