"""``streamrec retrain``: retrain the Transformer beside the workers, on the events they consume.

The online learners learn each event as it comes; the Transformer knows only the log it was
trained on, and a day later it misses the day. This command reads the clicks and purchases
topics from their oldest retained record (outside any consumer group: it takes no work or
offsets from a worker), keeps the latest ``--window`` events, and every ``--every`` seconds
trains a new Transformer on them (and on ``--dataset``, the log the first model was trained
on, when given), with the architecture of the ``CURRENT`` version, and registers it as
``CURRENT`` (running workers hot-swap to it within seconds) when its HR@10 on held-out events
newer than the ``CURRENT`` version's data is no worse than that version's on the same events by
more than ``--gate-tolerance`` (gpu_scorer/retraining.py); a fit the gate
holds back is registered, and ``CURRENT`` stays (``--no-gate``: every fit). What that serves is measured by
``streamrec evaluate --retrain-every``, which fits the same way (docs/evaluation.md: on
YooChoose, every two hours moved HR@20 by +0.0078 on the validation day, +0.0007 on the test day).
It creates no topic: the workers do, and a prefix whose clicks or purchases topic does not
exist (no worker ran with it, or a typo) stops it at start with one line naming them.
A partition added to a topic while it runs is read from its oldest record too, and to its end
before the next fit, once the client's metadata shows it (refreshed every five minutes; looked
at every ``LOOK_S``).

Once it reads, Kafka failing (a broker restarting) costs it nothing it has read: a ``KafkaError``
is logged once per outage and tried again with back-off (:class:`_Outage`), and kafka-python's
own lines, several a second while a broker is down, once a minute each
(:func:`_kafka_logs_thinned`); only a failure at start, before anything is read, ends it.

Forget requests are honoured: a user's events at or before the request's ``ts`` never enter a
fit after it is read (the versions registered before it keep what they learned: the next fit
replaces them as CURRENT, whatever the gate says, and each is deleted once ``--keep`` newer ones
are registered).
Values that break the events' contract are skipped and counted (the workers dead-letter
them), with the door the peers and replays use (``Bounds.rereading``): a ``ts`` too far ahead
of the clock is refused, an event or erasure the workers refused for it included, and a value
whose decoding raises anything is skipped too.

:class:`EventWindow` is the pure part:

>>> from stream.records import ClickEvent, ForgetRequest, encode
>>> w = EventWindow(max_events=3)
>>> for n, user in enumerate(["u1", "u2", "u1", "u2"]):
...     w.add_event(encode(ClickEvent(event_id=f"e{n}", user_id=user, item_id=f"i{n}", ts=1_000 + n)))
>>> w.add_event(b"{not json")
>>> [(x.user_id, x.item_id) for x in w.interactions()]  # the latest three, oldest first
[('u2', 'i1'), ('u1', 'i2'), ('u2', 'i3')]
>>> w.add_forget(encode(ForgetRequest(user_id="u2", request_id="r1", ts=1_002)))
>>> [(x.user_id, x.item_id) for x in w.interactions()], w.invalid
([('u1', 'i2'), ('u2', 'i3')], 1)
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from gpu_scorer.errors import ModelLoadError
from gpu_scorer.registry import ModelRegistry
from gpu_scorer.train_cli import (
    DEFAULT_MODEL_DIR,
    INSTALL_TRAIN,
    check_device,
    check_registry_dir,
    missing_train_packages,
    registry_path,
)
from online_models import Interaction
from online_models.datasets import FORMATS, SEED_MAX, read_interactions
from stream import logs
from stream.connections import ISOLATION_LEVEL
from stream.decoding import decode_event, decode_forget
from stream.errors import counted, described
from stream.kafka_sockets import close_failed_connects
from stream.logs import Thinned
from stream.records import DEFAULT_BOUNDS, Bounds
from stream.retry import Backoff
from stream.settings import LOG_LEVELS, Settings, log_level
from stream.step_inputs import to_interaction
from stream.tail import stop_on_signals
from stream.topics import require_topics

log = logging.getLogger("streamrec.retrain")
#: seconds between two looks for partitions added to the topics while it runs
LOOK_S = 30.0


class EventWindow:
    """The latest ``max_events`` clicks and purchases read, as interactions, and the users'
    erasures (user -> the latest forget request's ``ts``)."""

    def __init__(self, max_events: int = 1_000_000, bounds: Bounds = DEFAULT_BOUNDS,
                 clock: Callable[[], int] = lambda: time.time_ns() // 1_000_000) -> None:
        self.events: deque[Interaction] = deque(maxlen=max_events)
        self.erased: dict[str, int] = {}
        self.bounds = bounds.rereading()  # a ts too far ahead stays refused; its age was judged when it arrived
        self.clock = clock
        self.read = 0  # events kept since the start
        self.erasures = 0  # forget requests taken since the start
        self.invalid = 0  # values skipped: they break the events' contract

    def add_event(self, value: bytes | None) -> None:
        try:
            ev = decode_event(value, self.bounds, self.clock())
        except Exception:  # noqa: BLE001 - InvalidEvent, or a decoder's bug: the workers dead-letter both
            self.invalid += 1
            return
        self.events.append(to_interaction(ev))
        self.read += 1

    def add_forget(self, value: bytes | None) -> None:
        try:  # the workers' clock window too: an erasure they refused (ts far ahead) erases nothing here
            req = decode_forget(value, self.bounds, self.clock())
        except Exception:  # noqa: BLE001 - as for an event
            self.invalid += 1
            return
        self.erased[req.user_id] = max(req.ts, self.erased.get(req.user_id, req.ts))
        self.erasures += 1

    @property
    def erased_through(self) -> int | None:
        """The latest ``ts`` of the forget requests taken (None before any): a fit honours every
        request up to it, and its manifest says so (``data.erased_through``)."""
        return max(self.erased.values(), default=None)

    @property
    def mark(self) -> tuple[int, int]:
        """What was taken so far (events, erasures): a fit is due only when it moved since the
        last one. An erasure alone moves it, so that on a quiet stream the next fit still
        replaces the versions that hold the erased user's events."""
        return self.read, self.erasures

    def interactions(self, seed: Iterable[Interaction] = ()) -> list[Interaction]:
        """``seed`` then the window, without the erased users' events at or before their erasure."""
        erased = self.erased
        return [x for source in (seed, self.events) for x in source
                if x.user_id not in erased or x.ts > erased[x.user_id]]


def retrain(
    every: Annotated[float, typer.Option("--every", min=1, metavar="SECONDS",
                                         help="Seconds between two fits (a fit waits for at least one new event).")] = 7200.0,
    window: Annotated[int, typer.Option("--window", min=1, max=1_000_000_000, metavar="EVENTS",
                                        help="Train on at most this many of the latest events read from Kafka.")] = 1_000_000,
    dataset: Annotated[Path | None, typer.Option(
        "--dataset", "-d", help="A log every fit also trains on, before the events read (the log the first model was trained on).")] = None,
    format: Annotated[str, typer.Option("--format", "-f", help="--dataset's format: taobao, yoochoose, otto or synthetic.")] = "synthetic",
    model_dir: Annotated[Path, typer.Option(
        "--model-dir", envvar="STREAMREC_MODEL_DIR", parser=registry_path, metavar="PATH",
        help="Model registry the workers load from; each fit registers a version there and makes it CURRENT (see --gate).")] = DEFAULT_MODEL_DIR,
    keep: Annotated[int, typer.Option(
        "--keep", min=1, metavar="VERSIONS",
        help="After each version it registers, delete all but the VERSIONS newest in --model-dir (never the one "
             "CURRENT names). An erased user's events stay only in versions fitted before the forget request: "
             "once a fit after it is registered, at most VERSIONS-1 of them (with 1, none once that fit is CURRENT). "
             "A version the gate held back counts among the newest: it stays until VERSIONS newer ones are registered.")] = 5,
    gate: Annotated[bool, typer.Option(
        "--gate/--no-gate",
        help="Champion/challenger gate: a fit becomes CURRENT only when its HR@10 on held-out events (up to 2,000 "
             "users' last event newer than what the CURRENT version was fitted on and not dated ahead of the "
             "clock, set aside from the fit: the version served trains on them at the next fit) is not "
             "worse than the CURRENT version's on the same events by more than --gate-tolerance and by more than "
             "chance explains (a one-sided paired sign test at 5%, on the events one model hits and the other "
             "misses); otherwise it is registered, and CURRENT stays. --no-gate makes every fit that passes its "
             "parity check CURRENT. Not gated: the first model (no CURRENT), a fit with fewer than 50 such events "
             "or whose CURRENT does not say what it was fitted on (a version of an older streamrec train or "
             "retrain), and a fit after a forget request the CURRENT version's fit had not read (its manifest's "
             "data.erased_through).")] = True,
    gate_tolerance: Annotated[float, typer.Option(
        "--gate-tolerance", metavar="HR",
        help="How much lower (absolute, 0 to 1) a fit's held-out HR@10 may be than the CURRENT version's and "
             "still replace it.")] = 0.01,
    once: Annotated[bool, typer.Option("--once", help="Read the topics to their end, fit once and exit: 0 when a version was made CURRENT, 1 when none was (nothing to train on, the fit failed, the gate held it back, or SIGTERM or Ctrl-C came first; for a scheduler such as cron).")] = False,
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Random seed of each fit.")] = 0,
    device: Annotated[str, typer.Option(help="Training device: auto, cuda or cpu.")] = "auto",
    loglevel: Annotated[str | None, typer.Option(
        "--loglevel", "-l", help="debug, info, warning or error (default STREAMREC_LOG_LEVEL, else info).",
        show_default=False)] = None,
) -> None:
    """Retrain the Transformer beside the workers, on the events they consume, every --every seconds.

    Reads the clicks and purchases topics from their oldest record (no consumer group), fits a
    Transformer with the CURRENT version's architecture on the latest --window events (after
    --dataset when given), checks ONNX Runtime against PyTorch and makes it CURRENT (the workers
    hot-swap to it) unless its held-out HR@10 is worse than CURRENT's by more than --gate-tolerance
    and by more than chance explains, then deletes all but the --keep newest versions. Forget requests are honoured:
    an erased user's events enter no later fit, and stay in at most --keep minus one older versions
    once one is registered. Kafka failing while it runs (a broker restarting) keeps what was read:
    it tries again with back-off, and logs the outage once. SIGTERM or Ctrl-C stops it after the
    fit in hand. It creates no topic: without the clicks and purchases topics of
    STREAMREC_TOPIC_PREFIX (a worker creates them when it starts) it stops at once.
    Example:

      streamrec retrain --every 3600 --dataset ../shared/data/yoochoose-100k/yoochoose-clicks-100k_train_full.txt -f yoochoose
    """
    # the format before the settings are read (a wrong STREAMREC_LOG_FORMAT is said by them, below)
    # STREAMREC_LOG_LEVEL as the worker and serve read it (it was checked, then ignored); a wrong
    # one is refused by the settings below, naming the variable
    from_env = os.environ.get("STREAMREC_LOG_LEVEL", "").strip() or "info"
    logs.configure(log_level(loglevel, from_env if from_env.lower() in LOG_LEVELS else "info"),
                   os.environ.get("STREAMREC_LOG_FORMAT", "text"))
    if not math.isfinite(every):  # inf passed the range: one fit, then never another
        raise typer.BadParameter(f"{every} is not a number of seconds (for a single fit, use --once)",
                                 param_hint="--every")
    if not (math.isfinite(gate_tolerance) and 0 <= gate_tolerance <= 1):  # HR@10 is a share: 0 to 1
        raise typer.BadParameter(f"{gate_tolerance} is not a share of held-out events between 0 and 1 "
                                 "(to make every fit CURRENT, use --no-gate)", param_hint="--gate-tolerance")
    if dataset is None and format != "synthetic":  # read nothing: the fits never saw the log it names
        raise typer.BadParameter(f"--format {format} describes --dataset, which is not given: add --dataset LOG "
                                 "(the log every fit also trains on) or drop --format", param_hint="--format")
    if dataset is not None and format == "synthetic":
        raise typer.BadParameter("give the log's --format (taobao, yoochoose or otto)", param_hint="--format")
    if format not in FORMATS:  # was said only once Kafka answered (and not at all while it did not)
        raise typer.BadParameter(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}", param_hint="--format")
    if dataset is not None and dataset.is_dir():  # as was a --dataset that does not exist: after Kafka
        raise typer.BadParameter(f"{dataset} is a folder; give the log file every fit also trains on",
                                 param_hint="--dataset")
    if dataset is not None and not dataset.exists():
        raise typer.BadParameter(f"dataset {dataset} does not exist", param_hint="--dataset")
    check_device(device, "--device", training=True)
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))  # its INFO is per connection
    close_failed_connects()  # it reads for days: each broker outage's refused attempts, closed (stream/kafka_sockets.py)
    missing = missing_train_packages()
    if missing:
        typer.secho(f"streamrec retrain needs {' and '.join(missing)}, not installed here: {INSTALL_TRAIN}", fg="red", err=True)
        raise typer.Exit(code=1)
    # torch-bound, as in `streamrec train` (gpu_scorer/train_cli.py)
    from gpu_scorer import retraining, training

    base: list[Interaction] = []
    settings = Settings.from_env()
    check_registry_dir(model_dir)
    registry = ModelRegistry(model_dir)
    try:
        architecture = retraining.architecture_of(registry)
    except ModelLoadError as exc:  # the served version's manifest, whose architecture a fit keeps
        raise typer.BadParameter(f"{exc}: fix or remove that version, or point CURRENT at a good one",
                                 param_hint="--model-dir") from None
    topics = settings.topics
    kafka = settings.kafka
    # the workers create the topics: a prefix no worker uses (a typo) must not make a set of its
    # own and fit nothing, every --every seconds; before --dataset is read, which takes a while
    require_topics(settings, topics.inputs)
    if dataset is not None:
        try:
            base = list(read_interactions(dataset, format))
        except (ValueError, OSError) as exc:
            raise typer.BadParameter(str(exc), param_hint="--dataset") from None
        log.info("read %s from %s; every fit trains on them too", counted(len(base), "event"), dataset)
    retrainer = retraining.Retrainer(registry, architecture, training.TrainConfig(seed=seed, progress=False, device=device),
                                     settings.scorer_device, gate_tolerance=gate_tolerance if gate else None)
    events = EventWindow(window, settings.bounds)
    try:
        # earliest: a position that retention (or a topic made again) left behind reads on from the oldest
        # record still there; kafka-python's default, latest, skipped every retained event up to the end
        consumer = KafkaConsumer(**kafka.client_options(), client_id="streamrec-retrain", group_id=None,
                                 enable_auto_commit=False, auto_offset_reset="earliest", bootstrap_timeout_ms=30_000,
                                 isolation_level=ISOLATION_LEVEL)  # never trains on aborted transactions' events
        names = (*topics.inputs, topics.forget)
        partitions = _added_partitions(consumer, names, set())
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        end = consumer.end_offsets(partitions)
    except KafkaError as exc:
        raise kafka.unavailable(exc) from None
    log.info("reading %s from their oldest records; a fit every %g s on the latest %d events, registered in %s "
             "(architecture %s)", ", ".join(sorted({tp.topic for tp in partitions})), every, window, model_dir,
             architecture or "the defaults")
    caught_up = False
    made_current = False  # with --once, none (nothing to train on, a failed fit, the gate, a stop before the fit) exits 1
    fitted_at: tuple[int, int] | None = None
    next_fit = 0.0  # the first fit once the backlog is read
    next_look = 0.0  # for partitions added to the topics: once the backlog is read, then every LOOK_S
    outage = _Outage()
    try:
        with stop_on_signals() as stop, _kafka_logs_thinned():
            while not stop.is_set():
                try:  # a Kafka call that fails keeps the window: back off, and read on once the broker is back
                    for tp, records in consumer.poll(timeout_ms=500, max_records=5000).items():
                        add = events.add_forget if tp.topic == topics.forget else events.add_event
                        for record in records:
                            add(record.value)
                    reading = True  # the backlog, or partitions added to the topics: no fit before they are read
                    if not caught_up:
                        # None where the broker did not answer within its request timeout (kafka-python):
                        # not read yet; the next look, once it is back, says
                        caught_up = all((at := consumer.position(tp)) is not None and at >= end[tp]
                                        for tp in partitions)
                        if caught_up:
                            log.info("read the topics' backlog: %s kept, %s skipped (invalid)",
                                     counted(len(events.events), "event"), counted(events.invalid, "value"))
                    elif time.monotonic() >= next_look:
                        added = _added_partitions(consumer, names, end.keys())
                        if added:  # read from their oldest record, and to their end before the next fit
                            added_end = consumer.end_offsets(added)  # first: a failure here changes nothing
                            partitions += added
                            consumer.assign(partitions)
                            consumer.seek_to_beginning(*added)
                            end.update(added_end)
                            caught_up = False
                            log.info("reading the partitions added to the topics from their oldest records: %s",
                                     ", ".join(f"{tp.topic}[{tp.partition}]" for tp in added))
                        next_look = time.monotonic() + LOOK_S
                        reading = bool(added)
                    else:
                        reading = False
                except KafkaError as exc:
                    stop.wait(outage.failed(exc, len(events.events)))
                    continue
                outage.over()
                if reading:
                    continue
                if time.monotonic() < next_fit or events.mark == fitted_at:
                    if once:
                        break
                    continue
                registered, made_current = _fit(retrainer, events, base)
                if registered:
                    _prune(registry, keep)
                fitted_at = events.mark
                next_fit = time.monotonic() + every
                if once:
                    break
    finally:
        consumer.close(autocommit=False)
    if once and not made_current:
        if stop.is_set():
            log.warning("stopped before a version was registered")
        raise typer.Exit(code=1)


#: back-off between two tries while Kafka fails: 1 s, doubling, at most 30 s
OUTAGE_BACKOFF = Backoff(base_s=1.0, factor=2.0, cap_s=30.0, jitter=0.1)
#: seconds during which each of kafka-python's own warnings and errors is logged once
KAFKA_LOG_EVERY_S = 60.0


class _Outage:
    """Kafka failing while retrain runs (a broker restarting): one line when it starts, one when
    it is over, and ``OUTAGE_BACKOFF``'s delays between the tries meanwhile."""

    def __init__(self, backoff: Backoff | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.backoff, self.clock = backoff or OUTAGE_BACKOFF, clock
        self.since: float | None = None
        self.tries = 0
        self._delays = self.backoff.delays()

    def failed(self, exc: Exception, kept: int) -> float:
        """Note a failure; the seconds to wait before the next try."""
        delay = next(self._delays)
        if self.since is None:
            self.since = self.clock()
            log.warning("Kafka failed (%s): keeping the %s read, trying again with back-off (%.0f s, "
                        "doubling up to %.0f s) until it answers; logged once until then", described(exc),
                        counted(kept, "event"), delay, self.backoff.cap_s)
        self.tries += 1
        return delay

    def over(self) -> None:
        """Kafka answered: a line where it had failed, and short delays for the next outage."""
        if self.since is None:
            return
        log.warning("Kafka answers again after %.0f s (%s); reading on", self.clock() - self.since,
                    counted(self.tries, "failed try", "failed tries"))
        self.since, self.tries, self._delays = None, 0, self.backoff.delays()


class _ToRoot(logging.Handler):
    """Hands the records its filters let through on to the root logger's handlers."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger().handle(record)


@contextmanager
def _kafka_logs_thinned(every_s: float = KAFKA_LOG_EVERY_S,
                        clock: Callable[[], float] = time.monotonic) -> Iterator[None]:
    """While the block runs, kafka-python's records go through one :class:`~stream.logs.Thinned`:
    each warning or error at most once every ``every_s``, the next one saying how many like it
    were held back (its INFO, a line per connection, is off: ``retrain`` sets the ``kafka``
    logger to WARNING). With the broker down it logs several lines a second, on a logger per
    module (``kafka.cluster``, ``kafka.net.manager``, ...); a filter on a logger sees only what
    is logged on that one, so the filter is a handler's, on ``kafka``, whose records go on to the
    root's handlers."""
    kafka_log = logging.getLogger("kafka")
    handler, propagate = _ToRoot(), kafka_log.propagate
    handler.addFilter(Thinned(every_s, clock))
    kafka_log.addHandler(handler)
    kafka_log.propagate = False
    try:
        yield
    finally:
        kafka_log.removeHandler(handler)
        kafka_log.propagate = propagate


def _added_partitions(consumer: KafkaConsumer, topic_names: Iterable[str],
                      known: Iterable[TopicPartition]) -> list[TopicPartition]:
    """The topics' partitions not in ``known``, as the consumer's metadata has them (refreshed
    by the client every ``metadata_max_age_ms``, five minutes)."""
    known = set(known)
    found = [TopicPartition(t, p) for t in topic_names for p in sorted(consumer.partitions_for_topic(t) or ())]
    return [tp for tp in found if tp not in known]


def _prune(registry: ModelRegistry, keep: int) -> None:
    """Delete all but the ``keep`` newest versions (and CURRENT's); a failure is logged: the
    next fit prunes again."""
    try:
        pruned = registry.prune(keep)
    except OSError as exc:
        log.error("the old versions could not be deleted (%s); the next fit tries again", exc)
        return
    if pruned:
        log.info("deleted %d old version(s) (%s), keeping the %d newest and CURRENT's", len(pruned),
                 ", ".join(pruned), keep)


def _fit(retrainer, events: EventWindow, base: list[Interaction]) -> tuple[bool, bool]:
    """Fit and register a version; whether one was registered, and whether it was made CURRENT
    (a failure is logged: the next fit may work, and CURRENT stays as it was; so does a fit the
    gate holds back, registered all the same)."""
    interactions = events.interactions(base)
    started = time.monotonic()
    log.info("fitting on %s (%s read from Kafka, %s)...", counted(len(interactions), "event"),
             counted(len(events.events), "event"), counted(len(events.erased), "erased user"))
    overrule = _erasures_current_lacks(retrainer.registry, events)
    try:
        version, metrics = retrainer.fit(interactions, {"source": "streamrec retrain",
                                                        "erased_through": events.erased_through}, overrule=overrule)
    except ValueError as exc:  # nothing to train on yet
        log.warning("no fit: %s", exc)
        return False, False
    except OSError as exc:  # the registry's disk (full, read-only): the operator's to fix, not a bug to trace
        log.error("the fit could not be registered (%s); CURRENT stays as it was, and the next fit tries again", exc)
        return False, False
    except Exception:  # noqa: BLE001 - a failed fit (its parity check, a full disk) leaves CURRENT as it was; the next one may work
        log.exception("the fit failed; CURRENT stays as it was")
        return False, False
    gate = metrics.get("gate")
    if gate is not None and not gate["passed"] and not gate.get("overruled"):
        _held_back(retrainer.registry, version, gate)
        return True, False
    if gate is not None and not gate["passed"]:
        log.warning("gate: %s would have been held back (HR@10 %s against %s for %s), but %s: it replaces it, "
                    "as a fit that honours the erasures", version, _figure(gate["new_hr@10"]),
                    _figure(gate["current_hr@10"]), gate["current"], gate["overruled"])
    if gate is not None and gate.get("current_error"):
        log.warning("gate: CURRENT could not be scored (%s); %s replaces it", gate["current_error"], version)
    if gate is not None and gate.get("undecided"):
        log.info("gate: nothing fair to compare on (%s); %s replaces %s", gate["undecided"], version, gate["current"])
    compared = "" if gate is None or gate["current_hr@10"] is None else \
        f"; {gate['current']} had {gate['current_hr@10']:.4f} on the same {gate['held_out']} held-out events"
    log.info("registered %s as CURRENT in %.0f s (validation HR@10 %.4f, best epoch %s%s): the workers hot-swap to it",
             version, time.monotonic() - started, metrics.get("val_hr@10", float("nan")), metrics.get("best_epoch"),
             compared)
    return True, True


def _figure(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"


def _erasures_current_lacks(registry: ModelRegistry, events: EventWindow) -> str | None:
    """Why the next fit must replace ``CURRENT`` whatever the gate says, or None: ``CURRENT``'s
    manifest honours no forget request as late as the latest one read (its ``data.erased_through``
    is older, or missing: a version from ``streamrec train``, or fitted before any), so it may
    still hold an erased user's events, which the fit does not."""
    through = events.erased_through
    if through is None:
        return None
    try:
        current = registry.pointed()
        honoured = registry.manifest(current).get("data", {}).get("erased_through") if current else None
    except ModelLoadError:  # no CURRENT to serve: the gate lets the fit through anyway
        return None
    if current is None or (isinstance(honoured, int) and honoured >= through):
        return None
    return f"{current} was fitted before the forget request(s) read since (the latest at ts {through})"


def _held_back(registry: ModelRegistry, version: str, gate: dict) -> None:
    """The one line a fit the gate held back is logged with: both figures, and what to do."""
    figures = (f"its HR@10 on {gate['held_out']} held-out events (newer than {gate['current']}'s data, set aside "
               f"from the fit) is {gate['new_hr@10']:.4f}, against {gate['current_hr@10']:.4f} for {gate['current']} "
               f"(tolerance {gate['tolerance']:g}; {gate['current_only']} event(s) only {gate['current']} hit, "
               f"{gate['new_only']} only the fit: a lead that large by chance has p = {gate['p_value']:.2g})")
    log.warning("gate: registered %s but did not make it CURRENT: %s; %s keeps serving. To serve %s anyway: "
                "echo %s > %s (it is deleted once --keep newer versions are registered); to make every fit "
                "CURRENT: --no-gate or a larger --gate-tolerance", version, figures, gate["current"], version,
                version, registry.root / "CURRENT")


__all__ = ["EventWindow", "retrain"]
