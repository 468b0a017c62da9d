"""One typed settings object per process, read from ``STREAMREC_*`` environment variables.

Every setting has a default that works on a developer's machine after ``make up``. Nothing
connects at import time; :func:`Settings.from_env` only reads and checks values.

>>> s = Settings.from_env({"STREAMREC_TOP_K": "10", "STREAMREC_REDIS_URL": "redis://:hunter2@db:6379/0"})
>>> s.top_k, s.topics.clicks
(10, 'streamrec.clicks')
>>> "hunter2" in repr(s)
False
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar

from gpu_scorer.layout import model_dir_problem
from online_models.recommender import RecommenderConfig
from stream.connections import KafkaConnection, RedisConnection, mask_url
from stream.errors import ConfigError, clipped
from stream.records import MAX_DEPTH, MAX_PRICE, MAX_QUANTITY, Bounds

#: most events in one micro-batch (the models keep a ranked list per user until it is recorded)
MAX_BATCH_SIZE = 16_384
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: what STREAMREC_LOG_LEVEL and the commands' --loglevel accept
LOG_LEVELS = ("debug", "info", "warning", "error")
#: ``STREAMREC_*`` variables that are not settings: read by deploy/ files, not by a process
#: the settings that name one of a few words, read without regard to case or surrounding spaces
#: (`STREAMREC_SCORER_DEVICE=CPU`, `STREAMREC_LOG_LEVEL=' info'`), as the security protocol, the
#: SASL mechanism and the booleans are
FOLDED = frozenset({"STREAMREC_SCORER_DEVICE", "STREAMREC_LOG_LEVEL", "STREAMREC_LOG_FORMAT"})
OTHER_VARIABLES = frozenset({"STREAMREC_IMAGE_TAG", "STREAMREC_WORKERS", "STREAMREC_DEPLOY_TOOLS"})
LOG_FORMATS = ("text", "json")


def log_level(flag: str | None, default: str = "info") -> str:
    """The logging level a command's ``--loglevel`` (else ``default``, STREAMREC_LOG_LEVEL's)
    names, upper case; a :class:`ConfigError` for anything else.

    >>> log_level(None, "info"), log_level("Debug")
    ('INFO', 'DEBUG')
    """
    level = (flag or default).strip()
    if level.lower() not in LOG_LEVELS:
        raise ConfigError(f"--loglevel {level!r}: expected debug, info, warning or error")
    return level.upper()


#: API requests in progress in ``streamrec serve`` (waiting for a computing thread included)
#: beyond which a new one is answered 503 at once: an overloaded server sheds load instead of
#: queueing requests until every one of them is late (and the store's connections run out)
MAX_IN_FLIGHT = 16
#: STREAMREC_SERVE_RESERVED_SLOTS' default: of those 16, the slots no one client may take
#: (stream/serve_clients.py, docs/operations.md "serve's clients")
RESERVED_SLOTS = 4

#: the most items in a list, candidates, recent items, remembered event ids or partitions
MAX_LIST = 100_000
#: the most items or users an online model keeps
MAX_TABLE = 1_000_000_000
#: the longest duration a setting takes: ten years, in seconds
MAX_SECONDS = 10 * 365 * 86_400

#: the longest STREAMREC_BATCH_TIMEOUT_MS: a minute (the window is milliseconds; past a minute the
#: number is a unit mistaken, and a trickle's events would wait that long, or for ever, to be handled)
MAX_BATCH_TIMEOUT_MS = 60_000
#: the longest STREAMREC_KAFKA_SESSION_TIMEOUT_S: Faust's Kafka request timeout (90 s), which its
#: consumer refuses a session to exceed (ImproperlyConfigured once Kafka answered, a crash)
MAX_SESSION_TIMEOUT_S = 90
#: the largest STREAMREC_REPLICATION_FACTOR: Kafka's CreateTopics request holds it in 16 bits
MAX_REPLICATION_FACTOR = 32_767

#: Kafka's longest topic name
MAX_TOPIC_NAME = 249

#: fewest users (and candidates) in the scorer's CUDA-graph shape: every load re-runs the
#: registered parity sample (4 users x 9 candidates, gpu_scorer/export.py ``parity_sample``)
#: through that fixed shape, so a smaller one would refuse every version
MIN_SCORER_SHAPE = 16


@dataclass(frozen=True)
class TopicNames:
    """The eight topics, all under one prefix (``STREAMREC_TOPIC_PREFIX``)."""

    prefix: str = "streamrec."

    @property
    def clicks(self) -> str:
        return f"{self.prefix}clicks"

    @property
    def purchases(self) -> str:
        return f"{self.prefix}purchases"

    @property
    def recommendations(self) -> str:
        return f"{self.prefix}recommendations"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}dlq"

    @property
    def forget(self) -> str:
        """ForgetRequests (erase a user), co-partitioned with the inputs."""
        return f"{self.prefix}forget"

    @property
    def impressions(self) -> str:
        """ImpressionEvents (what the site showed), co-partitioned with the inputs."""
        return f"{self.prefix}impressions"

    @property
    def searches(self) -> str:
        """SearchEvents (a user searched), co-partitioned with the inputs."""
        return f"{self.prefix}searches"

    @property
    def items(self) -> str:
        """ItemEvents (the catalogue), compacted, keyed by item: every worker reads all of it."""
        return f"{self.prefix}items"

    @property
    def inputs(self) -> tuple[str, str]:
        return (self.clicks, self.purchases)

    @property
    def consumed(self) -> tuple[str, ...]:
        """What the worker's agent reads: the inputs, the forget requests, the impressions and
        the searches (co-partitioned: a user's messages reach the worker that owns their state)."""
        return (self.clicks, self.purchases, self.forget, self.impressions, self.searches)

    @property
    def all(self) -> tuple[str, ...]:
        return (self.clicks, self.purchases, self.recommendations, self.dlq, self.forget, self.impressions,
                self.searches, self.items)


def _env(name: str, default: str, help: str, secret: bool = False):
    return field(default=default, metadata={"env": name, "help": help, "secret": secret})


@dataclass(frozen=True)
class Settings:
    """Every knob of a streamrec process, with its environment variable beside it."""

    #: field name -> the command-line option that gave its value (:meth:`with_options`; see :meth:`named`)
    options_given: ClassVar[Mapping[str, str]] = MappingProxyType({})

    kafka_bootstrap: str = _env("STREAMREC_KAFKA_BOOTSTRAP", "127.0.0.1:9092", "Kafka bootstrap servers, host:port[,host:port]")
    kafka_security_protocol: str = _env("STREAMREC_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT", "how every client reaches Kafka: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
    kafka_sasl_mechanism: str = _env("STREAMREC_KAFKA_SASL_MECHANISM", "", "with SASL_*: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512")
    kafka_sasl_username: str = _env("STREAMREC_KAFKA_SASL_USERNAME", "", "with SASL_*: the Kafka user")
    kafka_sasl_password: str = _env("STREAMREC_KAFKA_SASL_PASSWORD", "", "with SASL_*: the Kafka user's password", secret=True)
    kafka_ssl_cafile: str = _env("STREAMREC_KAFKA_SSL_CAFILE", "", "with SSL or SASL_SSL: PEM file of the CA(s) that signed the brokers' certificates (empty: the system's)")
    kafka_ssl_certfile: str = _env("STREAMREC_KAFKA_SSL_CERTFILE", "", "with SSL or SASL_SSL: PEM client certificate, for brokers that ask for one (mutual TLS)")
    kafka_ssl_keyfile: str = _env("STREAMREC_KAFKA_SSL_KEYFILE", "", "with SSL or SASL_SSL: PEM private key of the client certificate (empty: in the certificate file)")
    redis_url: str = _env("STREAMREC_REDIS_URL", "redis://127.0.0.1:6379/0", "Redis URL for user state: redis://[user:password@]host:port/db, rediss:// for TLS", secret=True)
    redis_ssl_ca_file: str = _env("STREAMREC_REDIS_SSL_CA_FILE", "", "with rediss://: PEM file of the CA that signed the Redis server's certificate (empty: the system's)")
    topic_prefix: str = _env("STREAMREC_TOPIC_PREFIX", "streamrec.", "prefix of every topic name (at most 234 characters: Kafka's names are at most 249)")
    top_k: int = _env("STREAMREC_TOP_K", str(RecommenderConfig.k), "items per recommendation")
    model_dir: Path = _env("STREAMREC_MODEL_DIR", "models", "the Transformer scorer's model registry (empty: models, as `streamrec train` and `retrain` read it)")
    metrics_port: int = _env("STREAMREC_METRICS_PORT", "9464", "port of the Prometheus /metrics endpoint (0: off)")
    scorer_device: str = _env("STREAMREC_SCORER_DEVICE", "auto", "auto, cuda or cpu")
    # The three CUDA options below apply only where the scorer runs on CUDA; on the CPU they are
    # ignored (no ONNX rewrite, no onnx package needed, the CPU's 64 users per call). Defaults
    # from the H100 figures in docs/scorer.md (GPU, 2026-11-23; bench/scorer_bench.py, 100
    # candidates, ORT p50 / p99 per call):
    # - max batch 256: the split OnnxScorer already made on CUDA, and the largest measured
    #   CUDA-graph shape that paid (at 4,096 users a graph lost: 4.57 against 4.01 ms).
    # - CUDA graph on: a graph of 256 users took 0.40 / 0.52 ms against 1.05 / 1.55 ms without
    #   one at 256 and 0.93 / 1.47 ms (another run 0.61 / 1.08) at 64, the smallest batch
    #   measured: a small batch padded to 256 still costs less than an uncaptured call, and a
    #   backlog batch of 2,000 users is the same 8 calls as before, each 2.6x cheaper.
    # - fp16 off: on top of a graph it saved 0.03 ms at 64 users (0.24 -> 0.21 ms p50); its
    #   gain is at large uncaptured batches (4,096: 3.30 against 4.01 ms), which the split at
    #   256 never makes; its scores are only within 0.1 of float32 (the parity tolerance goes
    #   from 1e-2 to 0.1) and its effect on ranking quality was not measured.
    scorer_cuda_graph: bool = _env("STREAMREC_SCORER_CUDA_GRAPH", "true", "on CUDA, replay the Transformer as a CUDA graph captured for STREAMREC_SCORER_MAX_BATCH users x STREAMREC_CANDIDATES candidates (smaller calls are padded to it, larger ones split); ignored on the CPU; needs the onnx package (a core dependency), without it off with a warning")
    scorer_fp16: bool = _env("STREAMREC_SCORER_FP16", "false", "on CUDA, run the Transformer's weights in float16 (faster at large batches; scores within 0.1 of float32); ignored on the CPU; needs the onnx package (a core dependency), without it off with a warning")
    scorer_max_batch: int = _env("STREAMREC_SCORER_MAX_BATCH", "256", f"on CUDA, most users per Transformer call, and the CUDA graph's batch: a bigger batch is split ({MIN_SCORER_SHAPE} to {MAX_BATCH_SIZE}); ignored on the CPU, which calls with at most 64")
    scorer_threads: int = _env("STREAMREC_SCORER_THREADS", "0", "CPU threads of the Transformer's ONNX Runtime session (0: half the usable cores, 1 to 4; 0 to 1024)")
    app_id: str = _env("STREAMREC_APP_ID", "streamrec", "Faust app id; also the Kafka consumer group")
    partitions: int = _env("STREAMREC_PARTITIONS", "4", "partitions of the input topics when streamrec creates them")
    batch_size: int = _env("STREAMREC_BATCH_SIZE", "2000", "most events in one micro-batch")
    batch_timeout_ms: int = _env("STREAMREC_BATCH_TIMEOUT_MS", "10", f"longest wait, in milliseconds, from its first event, to fill a micro-batch (with a fetch that waits as long: one fetch a batch; docs/operations.md); 0 to {MAX_BATCH_TIMEOUT_MS:,} (0: what has arrived, at once)")
    fetch_max_wait_ms: int = _env("STREAMREC_FETCH_MAX_WAIT_MS", "10", "longest a fetch from the input topics waits for more records than one (a backlog fills each fetch at once), lengthened up to 5x while batches take longer to handle, so that a saturated worker fetches about once a batch; 0: answer with the first record, as Faust does, at more CPU per event on a steady trickle (stream/consumer.py)")
    recent_items: int = _env("STREAMREC_RECENT_ITEMS", "50", "length of each user's recent-item sequence")
    n_candidates: int = _env("STREAMREC_CANDIDATES", str(RecommenderConfig.n_candidates), "candidates scored per recommendation")
    blend_weights: str = _env("STREAMREC_BLEND_WEIGHTS", "", "blend weights over the defaults, e.g. mf=0.2 (covisit, reminder, trending, mf, session_hybrid, transformer, and reranker for the click re-ranker; 0: off)")
    exclude_purchased: bool = _env("STREAMREC_EXCLUDE_PURCHASED", str(RecommenderConfig.exclude_purchased).lower(), "never recommend an item the user bought")
    max_items: int = _env("STREAMREC_MAX_ITEMS", str(RecommenderConfig.max_items), "items each online model keeps (counts, neighbours, factors); past it the least recently seen or least weighty go")
    max_users: int = _env("STREAMREC_MAX_USERS", str(RecommenderConfig.max_users), "users and sessions each online model keeps (histories, sessions, user factors); past it the least recently active go")
    dedupe_window: int = _env("STREAMREC_DEDUPE_WINDOW", "256", "latest event ids (64-bit fingerprints of them) kept per user to catch a producer's duplicates")
    state_ttl_s: int = _env("STREAMREC_STATE_TTL_S", "2592000", "idle time after which a user's state expires (0: never)")
    session_timeout_s: int = _env("STREAMREC_KAFKA_SESSION_TIMEOUT_S", "30", f"seconds after which a worker that stops heartbeating is replaced (1 to {MAX_SESSION_TIMEOUT_S}, and within the brokers' group.min/max.session.timeout.ms, 6 to 1,800 by default, which the worker checks once they answer)")
    snapshot_interval_s: int = _env("STREAMREC_SNAPSHOT_INTERVAL_S", "300", "how often the online models are snapshotted to Redis")
    snapshot_fork: bool = _env("STREAMREC_SNAPSHOT_FORK", "true", "write the model snapshot in a forked child process, so the worker stops only for the fork (stream/snapshots.py); false: on the event loop")
    learn_all_partitions: bool = _env("STREAMREC_LEARN_ALL_PARTITIONS", "true", "the online models also learn the input partitions other workers of the group own, read with a consumer of their own, each event once (one model across workers; stream/peers.py); false: each worker's models learn its own partitions only")
    gc_freeze: bool = _env("STREAMREC_GC_FREEZE", "true", "freeze what survives a young garbage collection, so the collector never walks the long-lived heap (short pauses; stream/gcpolicy.py)")
    log_level: str = _env("STREAMREC_LOG_LEVEL", "info", "debug, info, warning or error")
    log_format: str = _env("STREAMREC_LOG_FORMAT", "text", "text (a line a record, for a terminal) or json (a JSON object a line, for a log collector) of the worker's, serve's and retrain's logs")
    max_future_s: int = _env("STREAMREC_MAX_FUTURE_S", "3600", "an event whose ts is further ahead of the worker's clock is dead-lettered (ts_out_of_window); at least 1 (there is no off)")
    max_event_age_s: int = _env("STREAMREC_MAX_EVENT_AGE_S", "0", "an event whose ts is further behind the worker's clock is dead-lettered (0: any age, as a replay of an old log needs)")
    max_quantity: int = _env("STREAMREC_MAX_QUANTITY", "10000", "largest quantity accepted (at most 10000; number_too_large)")
    max_price: int = _env("STREAMREC_MAX_PRICE", "1000000000000", "largest price accepted (at most 10^12; number_too_large)")
    max_json_depth: int = _env("STREAMREC_MAX_JSON_DEPTH", "32", "deepest nesting of arrays and objects in an event (at most 32; too_deep)")
    replication_factor: int = _env("STREAMREC_REPLICATION_FACTOR", "1", f"replicas of each topic streamrec creates (3 in production; 1 to {MAX_REPLICATION_FACTOR:,})")
    variants: str = _env("STREAMREC_VARIANTS", "", "an experiment: a TOML or JSON file of arms (blend weights, learners off, model, candidates, or a popularity/shuffle baseline) with traffic shares; a user's arm is a stable hash of (experiment, user id); empty: one configuration for all (stream/experiments.py)")
    attribution_window_s: int = _env("STREAMREC_ATTRIBUTION_WINDOW_S", "1800", "a click or purchase without a rec_id is credited to the user's last list when it holds the item and came at most this long (event time) after the event that triggered the list")
    raw_retention_h: int = _env("STREAMREC_RAW_RETENTION_H", "168", "retention.ms, in hours, of the topics that hold what sites sent (clicks, purchases, impressions, dead letters, forget requests) when streamrec creates or aligns them: a forgotten user's raw events are gone from Kafka this long after their last one (docs/operations.md, Security); the recommendations topic is compacted instead")
    min_insync_replicas: int = _env("STREAMREC_MIN_INSYNC_REPLICAS", "1", "min.insync.replicas of each topic streamrec creates (2 with 3 replicas): with acks=all a write needs this many")
    pseudonym_key: str = _env("STREAMREC_PSEUDONYM_KEY", "", "secret of the keyed hash (HMAC-SHA256) the worker stores and learns user ids as, so that user state and model snapshots never hold a site's ids (recommendations still go out under them; stream/pseudonyms.py); empty: raw ids; changing it starts every user afresh", secret=True)
    serve_port: int = _env("STREAMREC_SERVE_PORT", "8080", "port of `streamrec serve`'s HTTP API (--port overrides it)")
    serve_trusted_proxies: str = _env("STREAMREC_SERVE_TRUSTED_PROXIES", "", "addresses or networks (10.0.0.0/8) of the reverse proxies in front of `streamrec serve`, comma-separated, whose X-Forwarded-For it believes: a request through one counts against its client's share of the requests in progress (STREAMREC_SERVE_RESERVED_SLOTS), not the proxy's; empty: X-Forwarded-For is never read, and each connection's own address is the client")
    serve_reserved_slots: int = _env("STREAMREC_SERVE_RESERVED_SLOTS", str(RESERVED_SLOTS), f"how many of the {MAX_IN_FLIGHT} API requests `streamrec serve` takes in progress no one client may hold: kept for the others, so one client alone may hold the other {MAX_IN_FLIGHT - RESERVED_SLOTS} by default (0 to {MAX_IN_FLIGHT - 1}; 0: one client may hold all {MAX_IN_FLIGHT} and lock the others out)")
    catalogue: bool = _env("STREAMREC_CATALOGUE", "true", "read the items topic into a catalogue that searches retrieve from (every worker reads all of it, and embeds each item with the text model; stream/catalogue_feed.py); false: searches re-rank only the results they carry")
    search_candidates: int = _env("STREAMREC_SEARCH_CANDIDATES", "50", "items each of BM25 and the text model retrieve per search, fused and re-ranked for the user (docs/search.md: 50 rather than 100 costs 0.17% of NDCG@10 and a quarter of a search's Python)")
    query_student: str = _env("STREAMREC_QUERY_STUDENT", "", "a query encoder distilled from the text model on the catalogue (a file from `streamrec distil-queries`): a query it can read costs about 0.1 ms instead of 3, for some NDCG@10 (docs/search.md, \"A query student\"); empty: every query goes to the text model. Read at start even with STREAMREC_CATALOGUE=false, where it is not used: a file that is no student is refused either way")
    search_personal_weight: float = _env("STREAMREC_SEARCH_PERSONAL_WEIGHT", "0.3", "share of the user's models in a search answer's score, 0 to 1 (0: the query's order alone)")
    query_ttl_s: int = _env("STREAMREC_QUERY_TTL_S", "1800", "how long, in seconds of event time, a user's latest search steers their home-page lists (its matches join their candidates); 0: searches never do")
    snapshot_key: str = _env("STREAMREC_SNAPSHOT_KEY", "", "secret that signs and checks the online models' snapshots (HMAC-SHA256); empty: unsigned", secret=True)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> Settings:
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            name = f.metadata["env"]
            raw = overrides.get(f.name, environ.get(name, f.default))
            if name in FOLDED and isinstance(raw, str):
                raw = raw.strip().lower()
            values[f.name] = _convert(name, f.type, raw)
        settings = cls(**values)
        settings.check()
        return settings

    @classmethod
    def unknown_names(cls, environ: Mapping[str, str] | None = None) -> list[str]:
        """What to say of each ``STREAMREC_*`` variable that names no setting (a misspelling is
        otherwise ignored without a word), with the setting it most resembles.

        >>> Settings.unknown_names({"STREAMREC_TOPK": "5", "STREAMREC_TOP_K": "5", "STREAMREC_WORKERS": "2"})
        ['STREAMREC_TOPK (did you mean STREAMREC_TOP_K?)']
        """
        environ = os.environ if environ is None else environ
        known = [f.metadata["env"] for f in fields(cls)]
        out = []
        for name in sorted(environ):
            if name.startswith("STREAMREC_") and name not in known and name not in OTHER_VARIABLES:
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
                out.append(f"{name} (did you mean {close[0]}?)" if close else name)
        return out

    @classmethod
    def unknown_names_said(cls, environ: Mapping[str, str] | None = None) -> str | None:
        """The one line that says :meth:`unknown_names`, or None when every ``STREAMREC_*`` variable
        names a setting.

        >>> Settings.unknown_names_said({"STREAMREC_TOPK": "5"})
        'ignored: STREAMREC_TOPK (did you mean STREAMREC_TOP_K?) names no setting (`streamrec settings` lists them)'
        """
        unknown = cls.unknown_names(environ)
        if not unknown:
            return None
        return (f"ignored: {', '.join(unknown)} {'names' if len(unknown) == 1 else 'name'} no setting "
                "(`streamrec settings` lists them)")

    @classmethod
    def with_options(cls, **options: tuple[str, str | None]) -> Settings:
        """The environment's settings under a command's options, ``field=(option, value)`` (a value
        of None: the environment's). A value an option gave that is refused is said of the option,
        not of the environment variable the operator did not set (``produce -b localhost``)."""
        given = {name: value for name, (_, value) in options.items() if value is not None}
        try:
            settings = cls.from_env(**given)
        except ConfigError as exc:
            message = str(exc)
            for f in fields(cls):
                env = f.metadata["env"]
                if f.name in given and message.startswith(env):
                    rest = message[len(env):]
                    raise ConfigError(options[f.name][0] + (f" {rest[1:]}" if rest.startswith("=") else rest)) from None
            raise
        object.__setattr__(settings, "options_given", MappingProxyType({name: options[name][0] for name in given}))
        return settings

    def named(self, name: str) -> str:
        """What gave the setting ``name`` (a field's name), as a message names it: the command's
        option where one gave it (:meth:`with_options`), else its environment variable.

        >>> settings = Settings.with_options(topic_prefix=("--topic-prefix", "t."), kafka_bootstrap=("--bootstrap", None))
        >>> settings.named("topic_prefix"), settings.named("kafka_bootstrap")
        ('--topic-prefix', 'STREAMREC_KAFKA_BOOTSTRAP')
        """
        given = self.options_given.get(name)
        return given if given is not None else next(f.metadata["env"] for f in fields(self) if f.name == name)

    def check(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._-]*", self.topic_prefix):
            raise ConfigError(f"STREAMREC_TOPIC_PREFIX={self.topic_prefix!r}: only letters, digits, '.', '_' and '-' are allowed in topic names")
        longest = max(self.topics.all, key=len)
        if len(longest) > MAX_TOPIC_NAME:  # said now, not by the worker once Kafka answered, of a topic name
            raise ConfigError(f"STREAMREC_TOPIC_PREFIX={clipped(self.topic_prefix, 40)!r}: at most "
                              f"{MAX_TOPIC_NAME - len(longest) + len(self.topic_prefix)} characters (Kafka's topic names "
                              f"are at most {MAX_TOPIC_NAME}, and {longest[len(self.topic_prefix):]!r} follows it), saw "
                              f"{len(self.topic_prefix)}")
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", self.app_id):  # a group id, and Faust names topics after it
            raise ConfigError(f"STREAMREC_APP_ID={self.app_id!r}: expected 1 to 200 letters, digits, '.', '_' or '-' "
                              "(it is the consumer group's id, and Faust names a topic after it)")
        if self.scorer_device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"STREAMREC_SCORER_DEVICE={self.scorer_device!r}: expected auto, cuda or cpu")
        for name, value, low in (("STREAMREC_TOP_K", self.top_k, 1), ("STREAMREC_BATCH_SIZE", self.batch_size, 1),
                                 ("STREAMREC_PARTITIONS", self.partitions, 1), ("STREAMREC_RECENT_ITEMS", self.recent_items, 1),
                                 ("STREAMREC_CANDIDATES", self.n_candidates, 1), ("STREAMREC_DEDUPE_WINDOW", self.dedupe_window, 1), ("STREAMREC_BATCH_TIMEOUT_MS", self.batch_timeout_ms, 0),
                                 ("STREAMREC_MAX_ITEMS", self.max_items, 1000), ("STREAMREC_MAX_USERS", self.max_users, 1000),
                                 ("STREAMREC_RAW_RETENTION_H", self.raw_retention_h, 1), ("STREAMREC_SEARCH_CANDIDATES", self.search_candidates, 1),
                                 ("STREAMREC_ATTRIBUTION_WINDOW_S", self.attribution_window_s, 0),
                                 ("STREAMREC_QUERY_TTL_S", self.query_ttl_s, 0),
                                 ("STREAMREC_STATE_TTL_S", self.state_ttl_s, 0),
                                 ("STREAMREC_KAFKA_SESSION_TIMEOUT_S", self.session_timeout_s, 1),
                                 ("STREAMREC_SNAPSHOT_INTERVAL_S", self.snapshot_interval_s, 1)):
            if value < low:
                raise ConfigError(f"{name}={value}: must be at least {low}")
        # sizes of a list, a history and a table: past these the numbers stop fitting the C
        # integers numpy and the models index with (and no list or history is that long)
        for name, value, ceiling in (("STREAMREC_TOP_K", self.top_k, MAX_LIST), ("STREAMREC_CANDIDATES", self.n_candidates, MAX_LIST),
                                     ("STREAMREC_RECENT_ITEMS", self.recent_items, MAX_LIST),
                                     ("STREAMREC_SEARCH_CANDIDATES", self.search_candidates, MAX_LIST),
                                     ("STREAMREC_DEDUPE_WINDOW", self.dedupe_window, MAX_LIST),
                                     ("STREAMREC_PARTITIONS", self.partitions, MAX_LIST),
                                     ("STREAMREC_MAX_ITEMS", self.max_items, MAX_TABLE),
                                     ("STREAMREC_MAX_USERS", self.max_users, MAX_TABLE)):
            if value > ceiling:
                raise ConfigError(f"{name}={value}: at most {ceiling:,}")
        if self.top_k > self.n_candidates:  # lists were cut to the candidates without a word
            raise ConfigError(f"STREAMREC_TOP_K={self.top_k} is more than STREAMREC_CANDIDATES={self.n_candidates}: a list "
                              f"holds at most the candidates scored for it; raise STREAMREC_CANDIDATES to at least "
                              f"{self.top_k}, or lower STREAMREC_TOP_K")
        if not MIN_SCORER_SHAPE <= self.scorer_max_batch <= MAX_BATCH_SIZE:
            raise ConfigError(f"STREAMREC_SCORER_MAX_BATCH={self.scorer_max_batch}: expected {MIN_SCORER_SHAPE} to {MAX_BATCH_SIZE} "
                              f"users per call (a CUDA graph's batch must hold the 4-user parity sample each model load "
                              f"re-checks; a call never holds more users than a micro-batch holds events)")
        if not 0 <= self.scorer_threads <= 1024:
            raise ConfigError(f"STREAMREC_SCORER_THREADS={self.scorer_threads}: expected 0 to 1024 (0: half the usable "
                              "cores, 1 to 4)")
        if not 0.0 <= self.search_personal_weight <= 1.0:
            raise ConfigError(f"STREAMREC_SEARCH_PERSONAL_WEIGHT={self.search_personal_weight}: expected 0 to 1")
        if self.batch_timeout_ms > MAX_BATCH_TIMEOUT_MS:
            raise ConfigError(f"STREAMREC_BATCH_TIMEOUT_MS={self.batch_timeout_ms}: at most {MAX_BATCH_TIMEOUT_MS:,} "
                              "(milliseconds: an event waits this long for company at a trickle)")
        if self.session_timeout_s > MAX_SESSION_TIMEOUT_S:
            raise ConfigError(f"STREAMREC_KAFKA_SESSION_TIMEOUT_S={self.session_timeout_s}: at most {MAX_SESSION_TIMEOUT_S} "
                              "(Faust's Kafka request timeout, which a session may not exceed)")
        if not 0 <= self.fetch_max_wait_ms <= 1000:
            raise ConfigError(f"STREAMREC_FETCH_MAX_WAIT_MS={self.fetch_max_wait_ms}: expected 0 to 1000 (milliseconds)")
        if self.batch_size > MAX_BATCH_SIZE:
            raise ConfigError(f"STREAMREC_BATCH_SIZE={self.batch_size}: at most {MAX_BATCH_SIZE}")
        for name, value, ceiling in (("STREAMREC_MAX_QUANTITY", self.max_quantity, MAX_QUANTITY),
                                     ("STREAMREC_MAX_PRICE", self.max_price, MAX_PRICE),
                                     ("STREAMREC_MAX_JSON_DEPTH", self.max_json_depth, MAX_DEPTH)):
            if not 1 <= value <= ceiling:
                raise ConfigError(f"{name}={value}: expected 1 to {ceiling} (the bound may only be lowered)")
        if self.max_event_age_s < 0:
            raise ConfigError(f"STREAMREC_MAX_EVENT_AGE_S={self.max_event_age_s}: must be 0 or more (0: any age)")
        if self.max_future_s < 1:  # 0 is not "off" here, as it is for the age: it refused any clock skew
            raise ConfigError(f"STREAMREC_MAX_FUTURE_S={self.max_future_s}: must be at least 1 (0 would dead-letter "
                              "every event from a producer whose clock runs a millisecond ahead of the worker's; "
                              "unlike STREAMREC_MAX_EVENT_AGE_S, this bound has no off)")
        # durations: past ten years a number is a typo, and Redis, Kafka and asyncio refuse
        # times that far off (a state TTL of 1e17 s failed every save, forever)
        for name, value, ceiling in (("STREAMREC_STATE_TTL_S", self.state_ttl_s, MAX_SECONDS),
                                     ("STREAMREC_QUERY_TTL_S", self.query_ttl_s, MAX_SECONDS),
                                     ("STREAMREC_ATTRIBUTION_WINDOW_S", self.attribution_window_s, MAX_SECONDS),
                                     ("STREAMREC_SNAPSHOT_INTERVAL_S", self.snapshot_interval_s, MAX_SECONDS),
                                     ("STREAMREC_MAX_FUTURE_S", self.max_future_s, MAX_SECONDS),
                                     ("STREAMREC_MAX_EVENT_AGE_S", self.max_event_age_s, MAX_SECONDS),
                                     ("STREAMREC_RAW_RETENTION_H", self.raw_retention_h, MAX_SECONDS // 3600)):
            if value > ceiling:
                raise ConfigError(f"{name}={value}: at most {ceiling:,} (ten years)")
        for name, secret in (("STREAMREC_PSEUDONYM_KEY", self.pseudonym_key), ("STREAMREC_SNAPSHOT_KEY", self.snapshot_key)):
            try:
                secret.encode()
            except UnicodeEncodeError:  # bytes that are not UTF-8 in the environment: lone surrogates
                raise ConfigError(f"{name} is not UTF-8 text (the keyed hash reads the key as UTF-8); its value "
                                  "is not shown") from None
        if self.replication_factor > MAX_REPLICATION_FACTOR:
            raise ConfigError(f"STREAMREC_REPLICATION_FACTOR={self.replication_factor}: at most {MAX_REPLICATION_FACTOR:,} "
                              "(Kafka sends a replication factor as a 16-bit number)")
        if self.replication_factor < 1 or not 1 <= self.min_insync_replicas <= self.replication_factor:
            raise ConfigError(f"STREAMREC_REPLICATION_FACTOR={self.replication_factor}, STREAMREC_MIN_INSYNC_REPLICAS="
                              f"{self.min_insync_replicas}: expected 1 <= min.insync.replicas <= replication factor")
        if self.blend_weights.strip() and not re.fullmatch(r"\s*[\w+-]+\s*=\s*[0-9.]+\s*(,\s*[\w+-]+\s*=\s*[0-9.]+\s*)*,?\s*",
                                                          self.blend_weights):
            raise ConfigError(f"STREAMREC_BLEND_WEIGHTS={self.blend_weights!r}: expected name=weight[,name=weight], "
                              "each weight a plain decimal number (no exponent), e.g. mf=0.2")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError(f"STREAMREC_LOG_LEVEL={self.log_level!r}: expected debug, info, warning or error")
        if self.log_format.strip().lower() not in LOG_FORMATS:
            raise ConfigError(f"STREAMREC_LOG_FORMAT={self.log_format!r}: expected text or json")
        if not self.kafka_bootstrap.strip():
            raise ConfigError("STREAMREC_KAFKA_BOOTSTRAP is empty: expected host:port[,host:port]")
        self.kafka.check()
        if not 1 <= self.serve_port <= 65535:
            raise ConfigError(f"STREAMREC_SERVE_PORT={self.serve_port}: expected a port 1-65535")
        try:
            self.serve_proxies  # noqa: B018 - parsed to be checked
        except ValueError as exc:
            raise ConfigError(f"STREAMREC_SERVE_TRUSTED_PROXIES={clipped(self.serve_trusted_proxies, 200)!r}: {exc}") from None
        if not 0 <= self.serve_reserved_slots < MAX_IN_FLIGHT:
            raise ConfigError(f"STREAMREC_SERVE_RESERVED_SLOTS={self.serve_reserved_slots}: expected 0 to {MAX_IN_FLIGHT - 1} "
                              f"(of the {MAX_IN_FLIGHT} requests serve has in progress, those one client may not take)")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"STREAMREC_METRICS_PORT={self.metrics_port}: expected a port 0-65535 (0: off)")
        self.redis.check()

    def topic_configs(self) -> dict[str, dict[str, str]]:
        """The configs of each topic streamrec creates (and the worker aligns at start): what
        sites sent is kept ``STREAMREC_RAW_RETENTION_H`` hours; the recommendations topic is
        compacted (at most a day after a write), so a forgotten user's tombstone removes their
        lists, and kept as long (docs/events.md)."""
        topics = self.topics
        isr = {"min.insync.replicas": str(self.min_insync_replicas)}
        # segment.ms: Kafka deletes whole segments, never the one being written, which rolls after
        # 7 days by default; rolled daily (or sooner, with a shorter retention), a record is gone
        # at most that much after the retention
        raw = {**isr, "cleanup.policy": "delete", "retention.ms": str(self.raw_retention_h * 3_600_000),
               "segment.ms": str(self.raw_segment_h * 3_600_000)}
        # compacted within a day (max.compaction.lag.ms), so a tombstone removes a forgotten user's
        # lists by then; and deleted after the retention too, so nobody's latest list is kept forever
        lists = {**isr, "cleanup.policy": "compact,delete", "retention.ms": str(self.raw_retention_h * 3_600_000),
                 "max.compaction.lag.ms": str(min(24, self.raw_retention_h) * 3_600_000)}
        # the catalogue: the latest value per item, kept until a tombstone removes it
        catalogue = {**isr, "cleanup.policy": "compact"}
        return {topics.clicks: raw, topics.purchases: raw, topics.dlq: raw, topics.forget: raw,
                topics.impressions: raw, topics.searches: raw, topics.recommendations: lists, topics.items: catalogue}

    @property
    def raw_segment_h(self) -> int:
        """Hours after which the raw topics roll a segment (``segment.ms``): a day, or the
        retention when that is shorter."""
        return min(24, self.raw_retention_h)

    @property
    def forgotten_kept_ms(self) -> int:
        """How long after a forget request's bound the models still refuse the user's older
        events: the raw topics' retention, their segment roll and an hour of slack (the
        broker's retention check, clocks), after which Kafka holds none of those events."""
        return (self.raw_retention_h + self.raw_segment_h + 1) * 3_600_000

    @property
    def topics(self) -> TopicNames:
        return TopicNames(self.topic_prefix)

    @property
    def kafka(self) -> KafkaConnection:
        """How every Kafka client of this process connects (stream/connections.py)."""
        return KafkaConnection(self.kafka_bootstrap, self.kafka_security_protocol.strip().upper(),
                               self.kafka_sasl_mechanism.strip().upper(), self.kafka_sasl_username,
                               self.kafka_sasl_password, self.kafka_ssl_cafile, self.kafka_ssl_certfile,
                               self.kafka_ssl_keyfile, given_by=self.named("kafka_bootstrap"))

    @property
    def redis(self) -> RedisConnection:
        """How every Redis client of this process connects (stream/connections.py)."""
        return RedisConnection(self.redis_url, self.redis_ssl_ca_file)

    @property
    def scorer_cuda_options(self) -> dict[str, bool | int]:
        """The :class:`~gpu_scorer.runtime.OnnxScorer` options that apply only on CUDA
        (``HotSwapScorer(cuda_options=...)`` leaves them out where the model runs on the CPU).
        A CUDA graph's candidate width is the worker's candidate count: a list never holds
        more (``Recommender.candidates_many``), and padding to a wider shape is work for nothing."""
        return {"cuda_graph": self.scorer_cuda_graph, "fp16": self.scorer_fp16, "max_batch": self.scorer_max_batch,
                "max_cands": max(self.n_candidates, MIN_SCORER_SHAPE)}

    @property
    def serve_proxies(self) -> tuple[IPNetwork, ...]:
        """``STREAMREC_SERVE_TRUSTED_PROXIES``' networks (ValueError: one that is not).

        >>> Settings.from_env({"STREAMREC_SERVE_TRUSTED_PROXIES": " 10.0.0.0/8, 192.168.1.7,, ::1 "}).serve_proxies
        (IPv4Network('10.0.0.0/8'), IPv4Network('192.168.1.7/32'), IPv6Network('::1/128'))
        >>> Settings.from_env({"STREAMREC_SERVE_TRUSTED_PROXIES": "10.0.0.0/8,proxy"})
        Traceback (most recent call last):
        ...
        stream.errors.ConfigError: STREAMREC_SERVE_TRUSTED_PROXIES='10.0.0.0/8,proxy': 'proxy' is not an IP address or network (such as 10.0.0.7 or 10.0.0.0/8)
        """
        networks = []
        for part in self.serve_trusted_proxies.split(","):
            if part.strip():
                try:
                    networks.append(ipaddress.ip_network(part.strip(), strict=False))
                except ValueError:
                    raise ValueError(f"{clipped(part.strip(), 60)!r} is not an IP address or network (such as 10.0.0.7 "
                                     "or 10.0.0.0/8)") from None
        return tuple(networks)

    @property
    def bounds(self) -> Bounds:
        """What the worker refuses at the door beyond the schemas (stream/records.py)."""
        return Bounds(max_depth=self.max_json_depth, max_future_ms=self.max_future_s * 1000,
                      max_age_ms=self.max_event_age_s * 1000, max_quantity=self.max_quantity, max_price=self.max_price)

    def describe(self) -> list[tuple[str, str, str]]:
        """(environment variable, value with secrets masked, help) for ``--help`` and start-up logs."""
        rows = []
        for f in fields(self):
            value = str(getattr(self, f.name))
            if f.metadata["secret"]:
                value = mask_url(value) if "://" in value else ("***" if value else "")
            rows.append((f.metadata["env"], value, f.metadata["help"]))
        return rows

    def __repr__(self) -> str:
        inner = ", ".join(f"{env}={value}" for env, value, _ in self.describe())
        return f"Settings({inner})"

    __str__ = __repr__


def _convert(name: str, typ, raw):
    if not isinstance(raw, str):
        return raw
    typ = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    try:
        if typ == "int":
            return int(raw)
        if typ == "bool":
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typ == "Path":
            # empty is unset, as `streamrec train --model-dir`'s option reads the same variable: not
            # Path("") (the working folder), where the worker looked while train wrote ./models
            problem = model_dir_problem(raw)  # 'models ' or '~/models': the worker looked elsewhere, without a model
            if problem:
                raise ConfigError(f"{name}={raw!r}: {problem}")
            return Path(raw) if raw else Path(_default_of(name))
        if typ == "float":
            value = float(raw)
            if value != value:
                raise ValueError(raw)
            return value
    except ValueError:
        expected = {"int": "an integer", "bool": "true or false", "float": "a number"}.get(typ, typ)
        raise ConfigError(f"{name}={clipped(raw, 80)!r}: expected {expected}") from None
    return raw


def _default_of(name: str) -> str:
    """The default of the setting read from the environment variable ``name``."""
    return next(f.default for f in fields(Settings) if f.metadata["env"] == name)
