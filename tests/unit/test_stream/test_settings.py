"""Settings: every variable parsed, every bad value refused with its name, secrets never shown."""

from __future__ import annotations

import logging
import os
from dataclasses import fields
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stream.cli import app, warn_unknown_names
from stream.errors import ConfigError, StreamrecError
from stream.pipeline import RecommendationStep
from stream.settings import Settings, TopicNames, mask_url
from stream.step_inputs import recommender_config


def test_defaults_match_the_design():
    s = Settings.from_env({})
    assert s.kafka_bootstrap == "127.0.0.1:9092"
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.topic_prefix == "streamrec." and s.top_k == 20 and s.scorer_device == "auto"
    assert s.exclude_purchased is True and s.model_dir == Path("models")


def test_every_field_has_an_environment_variable_and_help():
    names = [f.metadata["env"] for f in fields(Settings)]
    assert all(n.startswith("STREAMREC_") for n in names) and len(set(names)) == len(names)
    assert all(f.metadata["help"] for f in fields(Settings))


def test_values_are_read_and_converted():
    s = Settings.from_env({
        "STREAMREC_KAFKA_BOOTSTRAP": "k1:9093,k2:9093", "STREAMREC_TOP_K": "5", "STREAMREC_MODEL_DIR": "/tmp/m",
        "STREAMREC_EXCLUDE_PURCHASED": "No", "STREAMREC_SCORER_DEVICE": "cpu", "STREAMREC_TOPIC_PREFIX": "test-1_",
        "STREAMREC_BATCH_TIMEOUT_MS": "0",
    })
    assert (s.kafka_bootstrap, s.top_k, s.model_dir) == ("k1:9093,k2:9093", 5, Path("/tmp/m"))
    assert (s.exclude_purchased, s.scorer_device, s.batch_timeout_ms) == (False, "cpu", 0)


@pytest.mark.parametrize(("raw", "value"), [("1", True), ("true", True), ("YES", True), (" on ", True),
                                            ("0", False), ("False", False), ("no", False), ("off", False)])
def test_booleans(raw, value):
    assert Settings.from_env({"STREAMREC_EXCLUDE_PURCHASED": raw}).exclude_purchased is value


@pytest.mark.parametrize(("name", "raw", "field", "value"), [
    ("STREAMREC_SCORER_DEVICE", "CPU", "scorer_device", "cpu"), ("STREAMREC_SCORER_DEVICE", " Cuda\n", "scorer_device", "cuda"),
    ("STREAMREC_LOG_LEVEL", " info", "log_level", "info"), ("STREAMREC_LOG_LEVEL", "WARNING", "log_level", "warning"),
    ("STREAMREC_LOG_FORMAT", "JSON ", "log_format", "json"),
])
def test_a_setting_of_a_few_words_is_read_without_regard_to_case_or_spaces(name, raw, field, value):
    """As the security protocol and the booleans were: `CPU` and `' info'` were refused."""
    assert getattr(Settings.from_env({name: raw}), field) == value


def test_overrides_win_over_the_environment():
    s = Settings.from_env({"STREAMREC_TOP_K": "5"}, top_k=7, topic_prefix="x.")
    assert s.top_k == 7 and s.topics.clicks == "x.clicks"


def test_the_process_environment_is_the_default(monkeypatch):
    monkeypatch.setenv("STREAMREC_TOP_K", "3")
    assert Settings.from_env().top_k == 3


@pytest.mark.parametrize(
    ("name", "raw", "says"),
    [
        ("STREAMREC_TOP_K", "ten", "an integer"),
        ("STREAMREC_TOP_K", "0", "at least 1"),
        ("STREAMREC_METRICS_PORT", "9464.5", "an integer"),
        ("STREAMREC_PARTITIONS", "0", "at least 1"),
        ("STREAMREC_BATCH_SIZE", "-1", "at least 1"),
        ("STREAMREC_BATCH_TIMEOUT_MS", "-1", "at least 0"),
        ("STREAMREC_FETCH_MAX_WAIT_MS", "-1", "0 to 1000"),
        ("STREAMREC_FETCH_MAX_WAIT_MS", "1001", "0 to 1000"),
        ("STREAMREC_FETCH_MAX_WAIT_MS", "soon", "an integer"),
        ("STREAMREC_LEARN_ALL_PARTITIONS", "sometimes", "true or false"),
        ("STREAMREC_RECENT_ITEMS", "0", "at least 1"),
        ("STREAMREC_CANDIDATES", "0", "at least 1"),
        ("STREAMREC_EXCLUDE_PURCHASED", "maybe", "true or false"),
        ("STREAMREC_SCORER_DEVICE", "tpu", "auto, cuda or cpu"),
        ("STREAMREC_SCORER_CUDA_GRAPH", "maybe", "true or false"),
        ("STREAMREC_SCORER_FP16", "2", "true or false"),
        ("STREAMREC_SCORER_MAX_BATCH", "many", "an integer"),
        ("STREAMREC_SCORER_MAX_BATCH", "0", "16 to 16384"),
        ("STREAMREC_SCORER_MAX_BATCH", "15", "parity sample"),
        ("STREAMREC_SCORER_MAX_BATCH", "16385", "16 to 16384"),
        ("STREAMREC_SCORER_THREADS", "abc", "an integer"),
        ("STREAMREC_APP_ID", "a b/c", "letters, digits"),
        ("STREAMREC_APP_ID", "", "1 to 200"),
        ("STREAMREC_APP_ID", "ü", "letters, digits"),
        ("STREAMREC_SCORER_THREADS", "-1", "0 to 1024"),
        ("STREAMREC_SCORER_THREADS", "1025", "0 to 1024"),
        ("STREAMREC_TOP_K", "9223372036854775808", "at most 100,000"),
        ("STREAMREC_CANDIDATES", "100001", "at most 100,000"),
        ("STREAMREC_RECENT_ITEMS", "1000000", "at most 100,000"),
        ("STREAMREC_MAX_USERS", "10000000000", "at most 1,000,000,000"),
        ("STREAMREC_STATE_TTL_S", "-5", "at least 0"),
        ("STREAMREC_STATE_TTL_S", "100000000000000000", "at most 315,360,000 (ten years)"),
        ("STREAMREC_QUERY_TTL_S", "315360001", "at most 315,360,000 (ten years)"),
        ("STREAMREC_ATTRIBUTION_WINDOW_S", "10000000000", "at most 315,360,000"),
        ("STREAMREC_SNAPSHOT_INTERVAL_S", "10000000000", "at most 315,360,000"),
        ("STREAMREC_MAX_EVENT_AGE_S", "10000000000", "at most 315,360,000"),
        ("STREAMREC_MAX_FUTURE_S", "10000000000", "at most 315,360,000"),
        # 0 is "off" for the age but not here: every event from a clock a millisecond ahead was dead-lettered
        ("STREAMREC_MAX_FUTURE_S", "0", "at least 1"),
        ("STREAMREC_MAX_FUTURE_S", "-1", "at least 1"),
        ("STREAMREC_MAX_EVENT_AGE_S", "-1", "0 or more (0: any age)"),
        ("STREAMREC_RAW_RETENTION_H", "87601", "at most 87,600 (ten years)"),
        ("STREAMREC_KAFKA_SESSION_TIMEOUT_S", "0", "at least 1"),
        ("STREAMREC_SNAPSHOT_INTERVAL_S", "-1", "at least 1"),
        ("STREAMREC_KAFKA_BOOTSTRAP", "host:9092:x", "is not host:port"),
        ("STREAMREC_KAFKA_BOOTSTRAP", "localhost:abc", "is not host:port"),
        ("STREAMREC_KAFKA_BOOTSTRAP", "b1:9092,:", "':' is not host:port"),
        # commas alone: Faust refused it with a traceback, serve's reader tried localhost:9092
        ("STREAMREC_KAFKA_BOOTSTRAP", ",", "names no server"),
        ("STREAMREC_KAFKA_BOOTSTRAP", " , ,", "names no server"),
        # a host no name resolves, waited for as a broker that does not answer, for ever
        ("STREAMREC_KAFKA_BOOTSTRAP", "PLAINTEXT://b1:9092", "drop the scheme"),
        ("STREAMREC_KAFKA_BOOTSTRAP", "b1:9092 b2:9092", "separate servers with commas, not ';' or spaces"),
        ("STREAMREC_KAFKA_BOOTSTRAP", "b 1:9092", "is not host:port"),
        # a ':' in the host crashed Faust's URL parser with a traceback
        ("STREAMREC_KAFKA_BOOTSTRAP", "kafka-1:9092;kafka-2:9092", "separate servers with commas, not ';'"),
        ("STREAMREC_KAFKA_BOOTSTRAP", "::1:9092", "put an IPv6 address in brackets, as [::1]:9092"),
        ("STREAMREC_KAFKA_BOOTSTRAP", "h:1:29092", "is not host:port: put an IPv6 address in brackets"),
        ("STREAMREC_KAFKA_BOOTSTRAP", "u:p@h:29092", "a login goes in the STREAMREC_KAFKA_SASL_* settings"),
        # hosts no name can ever resolve, waited for as a broker that does not answer, for ever
        ("STREAMREC_KAFKA_BOOTSTRAP", "h#x:29092", "'h#x:29092' is not host:port"),
        ("STREAMREC_KAFKA_BOOTSTRAP", "h?x:29092", "'h?x:29092' is not host:port"),
        ("STREAMREC_KAFKA_BOOTSTRAP", "h%zz:29092", "'h%zz:29092' is not host:port"),
        ("STREAMREC_KAFKA_BOOTSTRAP", "a..b:29092", "'a..b:29092' is not host:port"),
        ("STREAMREC_KAFKA_BOOTSTRAP", "[kafka]:9092", "'[kafka]:9092' is not host:port"),
        ("STREAMREC_TOPIC_PREFIX", "streamrec/", "topic names"),
        # a folder no one meant: the worker ranked without its Transformer, saying only "no model under models "
        ("STREAMREC_MODEL_DIR", "models ", "starts or ends with a space"),
        ("STREAMREC_BLEND_WEIGHTS", "mf=1e5", "a plain decimal number (no exponent)"),
        ("STREAMREC_MODEL_DIR", "~/models", "'~' is expanded by a shell only"),
        ("STREAMREC_REDIS_URL", "127.0.0.1:6379", "redis://"),
        ("STREAMREC_SERVE_RESERVED_SLOTS", "16", "0 to 15"),
        ("STREAMREC_SERVE_RESERVED_SLOTS", "-1", "0 to 15"),
        ("STREAMREC_SERVE_RESERVED_SLOTS", "a few", "an integer"),
        # a window in the wrong unit: a trickle's events waited that long (for ever) to be handled
        ("STREAMREC_BATCH_TIMEOUT_MS", "60001", "at most 60,000"),
        ("STREAMREC_BATCH_TIMEOUT_MS", "1000000000000000000", "at most 60,000"),
        # past Faust's request timeout its consumer refused the session once Kafka answered: a crash
        ("STREAMREC_KAFKA_SESSION_TIMEOUT_S", "91", "at most 90"),
        ("STREAMREC_KAFKA_SESSION_TIMEOUT_S", "1000000000000000000", "at most 90"),
        # Kafka's CreateTopics holds it in 16 bits: topic creation failed to encode the request
        ("STREAMREC_REPLICATION_FACTOR", "32768", "at most 32,767"),
        ("STREAMREC_REPLICATION_FACTOR", "1000000000000000000", "at most 32,767"),
    ],
)
def test_bad_values_name_the_variable_and_what_was_seen(name, raw, says):
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: raw})
    message = str(info.value)
    assert message.startswith(f"{name}=") and raw.strip() in message and says in message
    assert isinstance(info.value, StreamrecError)


def test_host_names_addresses_and_bracketed_ipv6_are_bootstrap_servers():
    kafka = Settings.from_env({"STREAMREC_KAFKA_BOOTSTRAP": "my_kafka-1.example.com:9092,10.0.0.7:9093,"
                                                            "[fe80::1]:9094,kafka.:9095"}).kafka
    assert kafka.servers() == [("my_kafka-1.example.com", 9092), ("10.0.0.7", 9093), ("fe80::1", 9094), ("kafka.", 9095)]


def test_the_longest_batch_window_session_and_largest_replication_are_taken():
    s = Settings.from_env({"STREAMREC_BATCH_TIMEOUT_MS": "60000", "STREAMREC_KAFKA_SESSION_TIMEOUT_S": "90",
                           "STREAMREC_REPLICATION_FACTOR": "32767"})
    assert (s.batch_timeout_ms, s.session_timeout_s, s.replication_factor) == (60_000, 90, 32_767)


def test_a_topic_prefix_too_long_for_kafka_is_refused_naming_the_setting():
    """A 300-character prefix was taken; the worker refused "topic name 'ppp...'" only once
    Kafka answered, and did not say which setting made it."""
    assert Settings.from_env({"STREAMREC_TOPIC_PREFIX": "p" * 234}).topics.recommendations == "p" * 234 + "recommendations"
    with pytest.raises(ConfigError, match=r"STREAMREC_TOPIC_PREFIX='p+…': at most 234 characters .* saw 235"):
        Settings.from_env({"STREAMREC_TOPIC_PREFIX": "p" * 235})


def test_an_empty_model_dir_is_the_default_registry_not_the_working_folder():
    """STREAMREC_MODEL_DIR= (set, empty: a compose file's unset ${VAR}) was Path(""), the working
    folder: the worker looked for models there while `streamrec train`, whose --model-dir option
    reads the same variable and takes empty as unset, registered them in ./models."""
    assert Settings.from_env({"STREAMREC_MODEL_DIR": ""}).model_dir == Path("models")


def test_a_huge_bad_value_is_quoted_clipped():
    """A value pasted by mistake (here 5,000 digits, past int()'s limit) was quoted whole in the
    one-line error."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"STREAMREC_TOP_K": "9" * 5000})
    assert str(info.value).startswith("STREAMREC_TOP_K='999") and "an integer" in str(info.value)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("name", ["STREAMREC_PSEUDONYM_KEY", "STREAMREC_SNAPSHOT_KEY"])
def test_a_secret_that_is_not_utf8_is_refused_without_showing_it(name):
    """Bytes that are not UTF-8 in the environment arrive as lone surrogates: the key could not
    be encoded when the worker or serve first hashed with it (a traceback)."""
    with pytest.raises(ConfigError, match=f"{name} is not UTF-8 text") as info:
        Settings.from_env({name: "s3cret\udcff"})
    assert "s3cret" not in str(info.value)


SECRET_URL = "redis://app:hunter2@db.internal:6380/1"


def test_redis_password_is_masked_in_repr_str_and_describe():
    s = Settings.from_env({"STREAMREC_REDIS_URL": SECRET_URL})
    assert s.redis_url == SECRET_URL  # the real value stays usable
    for shown in (repr(s), str(s), *(value for _, value, _ in s.describe())):
        assert "hunter2" not in shown
    assert "STREAMREC_REDIS_URL=redis://app:***@db.internal:6380/1" in repr(s)


def test_a_bad_redis_url_with_a_password_is_refused_without_showing_it():
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"STREAMREC_REDIS_URL": "http://:hunter2@db:6379/0"})
    assert "hunter2" not in str(info.value) and "STREAMREC_REDIS_URL" in str(info.value)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
        ("rediss://user:pw@h:1/0", "rediss://user:***@h:1/0"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("redis://user@h:6379/0", "redis://user@h:6379/0"),
    ],
)
def test_mask_url(url, masked):
    assert mask_url(url) == masked


def test_mask_url_hides_a_password_that_contains_an_at_sign():
    assert "s3cret" not in mask_url("redis://:p@s3cret@h:6379/0")


def test_describe_lists_every_variable_once():
    rows = Settings.from_env({}).describe()
    assert [env for env, _, _ in rows] == [f.metadata["env"] for f in fields(Settings)]


def test_topic_names_share_the_prefix():
    t = TopicNames("dev.")
    assert t.all == ("dev.clicks", "dev.purchases", "dev.recommendations", "dev.dlq", "dev.forget", "dev.impressions",
                     "dev.searches", "dev.items")
    assert t.inputs == ("dev.clicks", "dev.purchases")
    assert t.consumed == ("dev.clicks", "dev.purchases", "dev.forget", "dev.impressions", "dev.searches")


def test_topic_configs_keep_raw_data_for_the_retention_and_compact_the_lists():
    s = Settings.from_env({"STREAMREC_TOPIC_PREFIX": "x.", "STREAMREC_RAW_RETENTION_H": "24",
                           "STREAMREC_MIN_INSYNC_REPLICAS": "1"})
    configs = s.topic_configs()
    assert set(configs) == set(s.topics.all)
    for name in ("x.clicks", "x.purchases", "x.dlq", "x.forget", "x.impressions", "x.searches"):
        assert configs[name]["retention.ms"] == str(24 * 3_600_000) and configs[name]["cleanup.policy"] == "delete"
        assert configs[name]["segment.ms"] == str(24 * 3_600_000)  # rolled daily: gone at most a day late
    assert configs["x.recommendations"]["cleanup.policy"] == "compact,delete"
    assert configs["x.recommendations"]["max.compaction.lag.ms"] == str(24 * 3_600_000)
    assert configs["x.items"]["cleanup.policy"] == "compact" and "retention.ms" not in configs["x.items"]  # kept until a tombstone
    with pytest.raises(ConfigError, match="STREAMREC_RAW_RETENTION_H"):
        Settings.from_env({"STREAMREC_RAW_RETENTION_H": "0"})
    week = Settings.from_env({})
    assert week.topic_configs()["streamrec.clicks"]["segment.ms"] == str(24 * 3_600_000)
    assert week.forgotten_kept_ms == (168 + 24 + 1) * 3_600_000
    short = Settings.from_env({"STREAMREC_RAW_RETENTION_H": "6"})
    assert short.topic_configs()["streamrec.clicks"]["segment.ms"] == str(6 * 3_600_000)
    assert Settings.from_env({"STREAMREC_TOPIC_PREFIX": ""}).topics.dlq == "dlq"


def test_settings_are_frozen():
    s = Settings.from_env({})
    with pytest.raises(AttributeError):
        s.top_k = 3


def test_blend_weights_are_checked_when_read():
    assert Settings.from_env({"STREAMREC_BLEND_WEIGHTS": "mf=0.2, trending=0"}).blend_weights == "mf=0.2, trending=0"
    for bad in ("mf", "mf=x", "=1", "mf=0.2;covisit=1"):
        with pytest.raises(ConfigError, match="STREAMREC_BLEND_WEIGHTS"):
            Settings.from_env({"STREAMREC_BLEND_WEIGHTS": bad})


def test_the_worker_blend_takes_the_weights_over_the_defaults():
    default = recommender_config(Settings.from_env({}))
    assert default.weights["mf"] == 0.0 and default.weights["covisit"] == 1.0
    config = recommender_config(Settings.from_env({"STREAMREC_BLEND_WEIGHTS": "mf=0.2,trending=0"}))
    assert config.weights["mf"] == 0.2 and config.weights["trending"] == 0.0 and config.weights["covisit"] == 1.0
    with pytest.raises(ConfigError, match="sessionknn"):
        recommender_config(Settings.from_env({"STREAMREC_BLEND_WEIGHTS": "sessionknn=1"}))
    # float("9" * 400) is infinite: its lists would publish "score": null
    for huge in ("9" * 400, "2000000"):
        with pytest.raises(ConfigError, match="from 0 to 1e"):
            recommender_config(Settings.from_env({"STREAMREC_BLEND_WEIGHTS": f"covisit={huge}"}))


def test_a_blend_weight_given_twice_is_refused():
    """mf=0.2,mf=0 ran with the last (mf off), silently."""
    with pytest.raises(ConfigError, match="STREAMREC_BLEND_WEIGHTS='mf=0.2,mf=0': mf is given twice"):
        recommender_config(Settings.from_env({"STREAMREC_BLEND_WEIGHTS": "mf=0.2,mf=0"}))


def test_the_scorer_cuda_options_default_to_the_measured_choice():
    """CUDA graph on at 256 users a call, fp16 off (docs/scorer.md, GPU); candidates as the worker's."""
    s = Settings.from_env({})
    assert (s.scorer_cuda_graph, s.scorer_fp16, s.scorer_max_batch) == (True, False, 256)
    assert s.scorer_cuda_options == {"cuda_graph": True, "fp16": False, "max_batch": 256, "max_cands": 50}


def test_the_scorer_cuda_options_are_read():
    s = Settings.from_env({"STREAMREC_SCORER_CUDA_GRAPH": "off", "STREAMREC_SCORER_FP16": "yes",
                           "STREAMREC_SCORER_MAX_BATCH": "16384", "STREAMREC_CANDIDATES": "200"})
    assert s.scorer_cuda_options == {"cuda_graph": False, "fp16": True, "max_batch": 16384, "max_cands": 200}
    # the CUDA graph's candidate width holds the 9-candidate parity sample a load re-checks
    assert Settings.from_env({"STREAMREC_CANDIDATES": "5", "STREAMREC_TOP_K": "5"}).scorer_cuda_options["max_cands"] == 16
    assert Settings.from_env({"STREAMREC_SCORER_MAX_BATCH": "16"}).scorer_max_batch == 16


def test_a_loglevel_flag_is_checked_like_the_setting():
    from stream.settings import log_level

    assert log_level(None, "warning") == "WARNING" and log_level("Error") == "ERROR"
    with pytest.raises(ConfigError, match="--loglevel 'foo': expected debug, info, warning or error"):
        log_level("foo")


def test_a_taken_metrics_port_is_a_sentence_not_a_traceback():
    import socket

    from prometheus_client import CollectorRegistry

    from stream.health import Health, HealthServer

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigError, match="cannot serve metrics and health on 127.0.0.1:"):
            HealthServer(taken.getsockname()[1], CollectorRegistry(), Health(), addr="127.0.0.1")


def test_more_items_a_list_than_candidates_is_refused():
    """STREAMREC_TOP_K=40 with STREAMREC_CANDIDATES=5 served lists of 5 without a word."""
    with pytest.raises(ConfigError, match="STREAMREC_TOP_K=40 is more than STREAMREC_CANDIDATES=5") as info:
        Settings.from_env({"STREAMREC_TOP_K": "40", "STREAMREC_CANDIDATES": "5"})
    assert "raise STREAMREC_CANDIDATES to at least 40" in str(info.value)
    assert Settings.from_env({"STREAMREC_TOP_K": "5", "STREAMREC_CANDIDATES": "5"}).top_k == 5


@pytest.mark.parametrize("weights", ["covisit=0,reminder=0,trending=0",
                                     "covisit=0,reminder=0,trending=0,mf=0,session_hybrid=0,transformer=3"])
def test_a_blend_with_every_learner_off_is_refused_at_start(weights):
    """Only the learners propose candidates: with all of them at 0 (an operator wanting "the
    Transformer alone") every list the worker published was empty, without a word."""
    with pytest.raises(ConfigError, match="leaves every learner at weight 0") as info:
        RecommendationStep.from_settings(Settings.from_env({"STREAMREC_BLEND_WEIGHTS": weights}))
    assert str(info.value).startswith(f"STREAMREC_BLEND_WEIGHTS={weights!r}")
    assert RecommendationStep.from_settings(Settings.from_env({"STREAMREC_BLEND_WEIGHTS": "covisit=0,reminder=0"}))


def test_a_misspelt_setting_is_said_at_start_with_the_name_it_resembles(monkeypatch, caplog):
    """STREAMREC_TOPK=5 or STREAMREC_BATCHSIZE=0 started a worker on the defaults without a word."""
    for name in [n for n in os.environ if n.startswith("STREAMREC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("STREAMREC_TOPK", "5")
    monkeypatch.setenv("STREAMREC_BATCHSIZE", "0")
    monkeypatch.setenv("STREAMREC_TOP_K", "5")
    monkeypatch.setenv("STREAMREC_WORKERS", "2")  # deploy/compose.yaml's, not a setting
    with caplog.at_level(logging.WARNING, logger="streamrec"):
        warn_unknown_names(logging.getLogger("streamrec"))
    said = [r.getMessage() for r in caplog.records]
    assert said == ["ignored: STREAMREC_BATCHSIZE (did you mean STREAMREC_BATCH_SIZE?), STREAMREC_TOPK (did you "
                    "mean STREAMREC_TOP_K?) name no setting (`streamrec settings` lists them)"], said


def test_streamrec_settings_says_a_misspelt_setting_beside_the_defaults_it_lists(monkeypatch):
    """`streamrec settings`, where one looks for it, listed STREAMREC_TOP_K's default for
    STREAMREC_TOPK=5 without a word (the worker and serve say it at start)."""
    for name in [n for n in os.environ if n.startswith("STREAMREC_")]:
        monkeypatch.delenv(name)
    result = CliRunner().invoke(app, ["settings"], env={"STREAMREC_TOPK": "5"})
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == ("ignored: STREAMREC_TOPK (did you mean STREAMREC_TOP_K?) names no setting "
                                     "(`streamrec settings` lists them)"), result.stderr
    assert CliRunner().invoke(app, ["settings"]).stderr == ""
