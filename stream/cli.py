"""``streamrec``: the command line. Each command lives with its package; this module gathers them."""

from __future__ import annotations

import asyncio
import logging

import typer
from prometheus_client import REGISTRY

from gpu_scorer.train_cli import train
from online_models import Recommender
from online_models.datasets import DatasetError
from stream import gcpolicy, logs
from stream.app import Worker, check_model_dir, create_app
from stream.broker_wait import BrokerWait, StopRequested
from stream.distil_cli import distil_queries
from stream.errors import ConfigError, StreamrecError, run_command
from stream.evaluate_cli import evaluate
from stream.experiments import load_experiment
from stream.forget import forget
from stream.health import Health, serve
from stream.produce import produce
from stream.prometheus import Metrics
from stream.redrive import redrive
from stream.report import report
from stream.retrain_cli import retrain
from stream.serve import run_server
from stream.settings import Settings, log_level
from stream.state import access_check
from stream.tail import tail
from stream.threads import one_blas_thread
from stream.topics import (
    align_topic_configs,
    check_copartitioned,
    check_topic_access,
    ensure_streamrec_topics,
    session_timeout_range,
)
from stream.version import version_text

app = typer.Typer(
    name="streamrec",
    help=(
        "Streaming, online-learning recommender. Click and purchase events in (Kafka), fresh top-K "
        "recommendations out. Settings come from STREAMREC_* environment variables: see `streamrec settings`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print streamrec's version and its main libraries', then exit (the worker and serve log it at start)."),
) -> None:
    pass


@app.command()
def worker(
    loglevel: str = typer.Option(None, "--loglevel", "-l", help="debug, info, warning or error (default STREAMREC_LOG_LEVEL)"),
) -> None:
    """Run a Faust worker: consume events, learn, recommend, publish.

    Start as many as the input topics have partitions; they share the work as one consumer group.
    SIGTERM or Ctrl-C finishes the batch in hand, commits and exits; a second Ctrl-C or SIGTERM
    exits at once, status 130 or 143 (nothing is lost: that batch is not committed, and the next
    owner of its partitions handles it again). A Kafka broker that does not answer at start is
    waited for (/readyz says why), not an exit.
    """
    settings = Settings.from_env()
    level = log_level(loglevel, settings.log_level)
    logs.configure(level, settings.log_format)  # and the Kafka client's repeated errors thinned (stream/logs.py)
    # short collector pauses, and none over the models' long-lived heap (stream/gcpolicy.py)
    gcpolicy.configure(freeze=settings.gc_freeze)
    one_blas_thread()  # numpy's BLAS threads would spin on the other core between batches (stream/threads.py)
    log = logging.getLogger("streamrec")
    log.info("%s", version_text())  # what a bug report asks first
    log.info("settings: %s", settings)
    warn_unknown_names(log)
    if settings.variants:  # a wrong experiment file is said now, not after Kafka answers
        log.info("experiment: %s", load_experiment(settings.variants, [*Recommender.DEFAULT_LEARNERS, *Recommender.EXTRA_SOURCES]).describe())
    # everything that can be refused without Kafka is refused before it is reached: the model
    # registry's folder, the metrics port, the blend weights, the query student, the scorer
    check_model_dir(settings)
    metrics = Metrics(REGISTRY)
    health = Health()
    if settings.metrics_port:
        serve(settings.metrics_port, REGISTRY, health)  # /metrics, /healthz, /readyz (it logs where)
    faust_app = create_app(settings, metrics=metrics, health=health)  # connects to nothing
    # a Redis that refuses the login (a wrong password), or a command the worker needs (an ACL
    # without EVALSHA or SET), is said now: the worker would retry it forever
    settings.redis.check_login(probe=access_check(settings.topic_prefix, writes=True))
    # a broker that does not answer yet is waited for (unready, alive), not a crash loop;
    # one that refuses the login or a server that is not Kafka still stops it (stream/broker_wait.py)
    wait = BrokerWait(settings.kafka, health)
    try:
        with wait.stopped_by_signals():
            wait.run(lambda: prepare_topics(settings, log))
    except StopRequested as stop:  # as a worker's first signal: exit 0, nothing consumed to commit
        log.info("%s while waiting for Kafka: stopping before the worker started", stop.name)
        return
    # STREAMREC_LOG_FORMAT=json: Faust sets logging up again as it starts, in its own format unless told
    Worker(faust_app, loglevel=level.lower(), quiet=True,
           logging_config=logs.handler_config(settings.log_format, level)).execute_from_commandline()


def prepare_topics(settings: Settings, log: logging.Logger) -> None:
    """The worker's start-up steps on Kafka, before Faust starts: its topics created (or checked
    co-partitioned), its session timeout checked against the brokers' range, and the topics'
    configs aligned. ServiceUnavailable when the broker goes away."""
    created = ensure_streamrec_topics(settings)
    if created:
        log.info("created topics %s with %d partitions", ", ".join(created), settings.partitions)
    check_copartitioned(settings.kafka, settings.topics.consumed)
    check_topic_access(settings)
    check_session_timeout(settings)
    try:  # topics made before: a compacted recommendations topic, raw topics' retention (docs/operations.md)
        align_topic_configs(settings.kafka, settings.topic_configs())
    except StreamrecError as exc:
        log.warning("%s; the worker runs on, but an erasure is not complete until they are set", exc)


def check_session_timeout(settings: Settings) -> None:
    """A :class:`ConfigError` when the brokers would refuse the worker's session timeout: its
    consumer's join failed once (InvalidSessionTimeoutError, logged) and it then waited, unready,
    for ever. Not checked where the brokers do not say their range."""
    allowed = session_timeout_range(settings.kafka)
    if allowed is not None and not allowed[0] <= settings.session_timeout_s <= allowed[1]:
        raise ConfigError(f"STREAMREC_KAFKA_SESSION_TIMEOUT_S={settings.session_timeout_s}: the brokers at "
                          f"{settings.kafka_bootstrap} take {allowed[0]:g} to {allowed[1]:g} s "
                          "(group.min.session.timeout.ms, group.max.session.timeout.ms); a worker asking for "
                          "another one is never let into its group")


def listen_host(value: str) -> str:
    """``serve --host``: a host name or an address, said as a usage error when it cannot be one
    (bytes that are not UTF-8 reached the socket layer as a traceback).

    >>> listen_host("0.0.0.0"), listen_host("::1")
    ('0.0.0.0', '::1')
    """
    try:
        value.encode()
    except UnicodeEncodeError:  # bytes that are not UTF-8 in argv arrive as lone surrogates
        raise typer.BadParameter("not UTF-8 text; give a host name or an address, e.g. 0.0.0.0 or ::") from None
    if not value or any(c.isspace() or not c.isprintable() for c in value):
        raise typer.BadParameter(f"{value!r}: expected a host name or an address, e.g. 0.0.0.0 (every address) or ::")
    return value


@app.command("serve")
def serve_api(
    port: int = typer.Option(None, "--port", "-p", min=1, max=65535, help="TCP port of the HTTP API (default STREAMREC_SERVE_PORT, 8080)."),
    host: str = typer.Option("0.0.0.0", "--host", help="Address to listen on.", callback=listen_host),
    loglevel: str = typer.Option(None, "--loglevel", "-l", help="debug, info, warning or error (default STREAMREC_LOG_LEVEL)"),
) -> None:
    """Serve the HTTP API beside the workers: personalised search, fresh recommendations, similar items.

    GET /v1/search?q=TEXT&user_id=U&k=20, /v1/users/U/recommendations?k=20, /v1/items/I/similar?k=20,
    /healthz, /readyz. User state comes from Redis; the models and the catalogue from the workers'
    snapshots in Redis, then the items topic (docs/search.md). SIGTERM or Ctrl-C stops it, within
    about 10 s (the requests in hand are answered first); a second exits at once, status 130 or 143.
    """
    settings = Settings.from_env()
    level = log_level(loglevel, settings.log_level)
    logs.configure(level, settings.log_format)  # and the Kafka client's repeated errors thinned (stream/logs.py)
    # as in the worker: the models, the catalogue and its indexes are a long-lived heap that
    # full collections would walk on every few hundred requests (stream/gcpolicy.py)
    gcpolicy.configure(freeze=settings.gc_freeze)
    one_blas_thread()  # its computing threads are the parallelism (stream/threads.py)
    logging.getLogger("streamrec").info("%s", version_text())
    warn_unknown_names(logging.getLogger("streamrec"))
    everyone = [str(net) for net in settings.serve_proxies if net.prefixlen == 0]
    if everyone:  # every client may then name any address, and take the slots kept for others
        logging.getLogger("streamrec").warning(
            "STREAMREC_SERVE_TRUSTED_PROXIES holds %s, which believes every client's X-Forwarded-For: name only "
            "the proxies in front of serve", " and ".join(everyone))
    check_model_dir(settings)  # as the worker: a file there hid every model serve looked for
    # a wrong password, or an ACL without the reads serve makes, is said at start, not as a /readyz
    # that never turns ready
    settings.redis.check_login(probe=access_check(settings.topic_prefix, writes=False))
    asyncio.run(run_server(settings, port or settings.serve_port, host))


def warn_unknown_names(log: logging.Logger) -> None:
    """A misspelt setting (STREAMREC_TOPK) was ignored without a word: said once at start."""
    unknown = Settings.unknown_names_said()
    if unknown:
        log.warning("%s", unknown)


@app.command("settings")
def show_settings() -> None:
    """Print every setting, its environment variable and its current value (secrets masked)."""
    settings = Settings.from_env()
    width = max(len(env) for env, _, _ in settings.describe())
    for env, value, help_text in settings.describe():
        typer.echo(f"{env:<{width}}  {value:<28}  {help_text}")
    unknown = Settings.unknown_names_said()
    if unknown:  # where a misspelt one is looked for: it showed the default without a word
        typer.secho(unknown, fg="yellow", err=True)


app.command("produce")(produce)
app.command("tail")(tail)
app.command("forget")(forget)
app.command("redrive")(redrive)
app.command("report")(report)
app.command("train")(train)
app.command("retrain")(retrain)
app.command("evaluate")(evaluate)
app.command("distil-queries")(distil_queries)


def main() -> None:
    run_command(app, "streamrec", (StreamrecError, DatasetError))  # DatasetError: a log read as it is sent (produce)


if __name__ == "__main__":
    main()
