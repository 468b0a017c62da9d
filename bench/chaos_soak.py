"""A research tool, not a test: a randomized chaos soak. 2 `streamrec worker`s on a real broker and Redis, a steady producer,
and a fault injector (kill -9 / SIGTERM / SIGSTOP past the session timeout of a worker, kill -9
of the broker, Redis stopped, two faults overlapping). At the end, the oracle: every valid
event applied exactly once to its user's state, invalid ones on the DLQ (and nothing else),
every learner of each worker learned every event once, workers alive and ready, nothing
uncommitted, /readyz unready while a service was down.

    eval "$(make -s up KAFKA_PORT=29092 REDIS_PORT=26379)"
    .venv/bin/python bench/chaos_soak.py --seed 2 --duration 600 --rate 250 \
        --kafka-port 29092 --redis-port 26379

It found, in round 2's forty-fifth session, a replay that failed twice leaving a gap in the
models, a worker that exited at start, and a batch of a new assignment that moved the models
past the events another worker had handled (seed 2: 1,883 of 117,857 never learned); each has
a test of its own now. It prints the checks as JSON and writes them, with the workers' logs, to
--out (bench-out/chaos-<seed>-<time> by default).

Needs the broker and Redis of `make up KAFKA_PORT=... REDIS_PORT=...` from this checkout
(their data dirs .run/kafka and .run/redis: the injector stops and starts them)."""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

import redis  # noqa: E402
from kafka import KafkaProducer  # noqa: E402
from workerkit import (  # noqa: E402
    WorkerProcess,
    applied_counts,
    http_get,
    read_all,
    unread,
)

from stream.records import ClickEvent, PurchaseEvent, decode_dead_letter, encode  # noqa: E402
from stream.topics import ensure_topics  # noqa: E402

T0 = time.monotonic()


def now() -> float:
    return round(time.monotonic() - T0, 2)


def log(*a) -> None:
    print(f"[{now():8.2f}]", *a, flush=True)


class Services:
    def __init__(self, kafka_port: int, redis_port: int, run_dir: Path) -> None:
        self.kafka_port, self.redis_port = kafka_port, redis_port
        self.kafka_dir = run_dir / "kafka"
        self.redis_dir = run_dir / "redis"

    def _sh(self, script: str, args: list[str], cmd: str) -> tuple[int, str]:
        p = subprocess.run(["bash", str(ROOT / "deploy" / script), *args, cmd], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, stdin=subprocess.DEVNULL)
        return p.returncode, (p.stdout + p.stderr).strip()

    def kafka(self, cmd: str) -> tuple[int, str]:
        return self._sh("kafka/kafka.sh", ["--port", str(self.kafka_port), "--controller-port",
                                            str(self.kafka_port + 1), "--data-dir", str(self.kafka_dir)], cmd)

    def redis(self, cmd: str) -> tuple[int, str]:
        return self._sh("redis/redis.sh", ["--port", str(self.redis_port), "--data-dir", str(self.redis_dir)], cmd)

    def kafka_kill9(self) -> None:
        pid = int((self.kafka_dir / "kafka.pid").read_text().strip())
        os.kill(pid, signal.SIGKILL)
        while True:
            try:
                os.kill(pid, 0)
                st = Path(f"/proc/{pid}/status").read_text()
                if "State:\tZ" in st:
                    break
            except (ProcessLookupError, FileNotFoundError):
                break
            time.sleep(0.05)


class Slot:
    """One of the two workers: restarted as the faults ask; every incarnation logs to its own file."""

    def __init__(self, name: str, env: dict[str, str], port: int, logdir: Path) -> None:
        self.name, self.env, self.port, self.logdir = name, env, port, logdir
        self.n = 0
        self.w: WorkerProcess | None = None
        self.lock = threading.Lock()
        self.expected_down = False  # a fault is stopping/holding it
        self.stopped = False  # SIGSTOPped
        self.unexpected_exits: list[dict] = []
        self.logs: list[Path] = []

    def start(self) -> None:
        self.n += 1
        path = self.logdir / f"{self.name}-{self.n}.log"
        self.logs.append(path)
        self.w = WorkerProcess(self.env, path, metrics_port=self.port).start()
        log(f"{self.name}: started incarnation {self.n} pid {self.w.proc.pid}")

    def alive(self) -> bool:
        return self.w is not None and self.w.proc.poll() is None

    def ready(self) -> tuple[int, str]:
        return http_get(f"http://127.0.0.1:{self.port}/readyz", timeout=2)


class Soak:
    def __init__(self, args) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.out = Path(args.out) if args.out else ROOT / "bench-out" / f"chaos-{args.seed}-{int(time.time())}"
        self.out.mkdir(parents=True)
        self.bootstrap = f"127.0.0.1:{args.kafka_port}"
        self.redis_url = f"redis://127.0.0.1:{args.redis_port}/0"
        self.prefix = f"soak{args.seed}x{int(time.time()) % 100000}."
        self.group = f"{self.prefix}worker"
        self.svc = Services(args.kafka_port, args.redis_port, Path(args.run_dir))
        self.kafka_lock, self.redis_lock = threading.Lock(), threading.Lock()
        self.faults: list[dict] = []
        self.snapshots: list = []
        self.down: list[dict] = []  # service outages {svc, start, end}
        self.ready_samples: list[tuple[float, str, int, int, str]] = []
        self.halt = threading.Event()
        self.producing = threading.Event()
        self.produced_done = threading.Event()
        self.expected: dict[str, int] = {}
        self.valid_pos: set[tuple[str, int, int]] = set()
        self.invalid: dict[tuple[str, int, int], str] = {}
        self.send_errors: list[str] = []
        self.n_valid = 0
        self.n_invalid = 0
        env = dict(os.environ)
        env.update({
            "STREAMREC_KAFKA_BOOTSTRAP": self.bootstrap,
            "STREAMREC_REDIS_URL": self.redis_url,
            "STREAMREC_TOPIC_PREFIX": self.prefix,
            "STREAMREC_APP_ID": self.group,
            "STREAMREC_PARTITIONS": "4",
            "STREAMREC_MODEL_DIR": str(self.out / "models"),
            "STREAMREC_BATCH_TIMEOUT_MS": "5",
            "STREAMREC_SNAPSHOT_INTERVAL_S": str(args.snapshot_interval),
            "STREAMREC_KAFKA_SESSION_TIMEOUT_S": str(args.session_timeout),
            "STREAMREC_LOG_LEVEL": "info",
            "PYTHONUNBUFFERED": "1",
        })
        self.slots = [Slot("w0", env, args.metrics_base, self.out), Slot("w1", env, args.metrics_base + 1, self.out)]

    # ------------------------------------------------------------------ producer
    def make_event(self, n: int):
        r = self.rng_events
        user = f"u{r.randrange(self.args.users)}"
        item = f"i{int(r.paretovariate(1.2)) % 3000}"
        ts = time.time_ns() // 1_000_000
        if n % self.args.invalid_every == self.args.invalid_every - 1:
            kind = ("malformed_json", "too_deep", "missing_field")[(n // self.args.invalid_every) % 3]
            if kind == "malformed_json":
                value = b'{"event_id": "bad-%d", "type": "cli' % n
            elif kind == "too_deep":
                value = json.dumps({"event_id": f"bad-{n}", "type": "click", "user_id": user, "item_id": item,
                                    "ts": ts, "extra": json.loads("[" * 40 + "]" * 40)}).encode()
            else:
                value = json.dumps({"event_id": f"bad-{n}", "type": "click", "item_id": item, "ts": ts}).encode()
            return "clicks", user.encode(), value, kind, None
        if r.random() < 0.1:
            ev = PurchaseEvent(event_id=f"s{self.args.seed}-{n}", user_id=user, item_id=item, ts=ts, session_id=f"{user}-s")
            return "purchases", user.encode(), encode(ev), None, user
        ev = ClickEvent(event_id=f"s{self.args.seed}-{n}", user_id=user, item_id=item, ts=ts, session_id=f"{user}-s")
        return "clicks", user.encode(), encode(ev), None, user

    def producer(self) -> None:
        self.rng_events = random.Random(self.args.seed * 7919)
        prod = KafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5, acks="all", enable_idempotence=True,
                             retries=2**31 - 1, max_block_ms=600_000, delivery_timeout_ms=900_000,
                             request_timeout_ms=10_000, reconnect_backoff_max_ms=1000)
        lock = threading.Lock()

        def done(kind, user, md=None, exc=None):
            with lock:
                if exc is not None:
                    self.send_errors.append(repr(exc))
                    return
                pos = (md.topic, md.partition, md.offset)
                if kind is None:
                    self.valid_pos.add(pos)
                    self.expected[user] = self.expected.get(user, 0) + 1
                else:
                    self.invalid[pos] = kind

        n = 0
        step = max(1, self.args.rate // 20)
        nxt = time.monotonic()
        try:
            while self.producing.is_set():
                for _ in range(step):
                    topic, key, value, kind, user = self.make_event(n)
                    n += 1
                    if kind is None:
                        self.n_valid += 1
                    else:
                        self.n_invalid += 1
                    fut = prod.send(f"{self.prefix}{topic}", key=key, value=value)
                    fut.add_callback(lambda md, kind=kind, user=user: done(kind, user, md=md))
                    fut.add_errback(lambda exc, kind=kind, user=user: done(kind, user, exc=exc))
                nxt += 0.05
                d = nxt - time.monotonic()
                if d > 0:
                    time.sleep(d)
                else:
                    nxt = time.monotonic()
            log(f"producer: stopping after {n} records; flushing")
            prod.flush(900)
        except BaseException as exc:  # noqa: BLE001
            self.send_errors.append("producer thread: " + traceback.format_exc())
            log("producer failed", exc)
        finally:
            prod.close(30)
            self.produced_done.set()
            log(f"producer: done ({self.n_valid} valid, {self.n_invalid} invalid, {len(self.send_errors)} errors)")

    # ------------------------------------------------------------------ watchers
    def poller(self) -> None:
        while not self.halt.is_set():
            for s in self.slots:
                if s.w is None:
                    continue
                try:
                    st, body = s.ready()
                except Exception as exc:  # noqa: BLE001 - a worker killed mid-answer
                    st, body = 0, repr(exc)
                fails = ",".join(re.findall(r"^(\w+): FAIL", body, re.M)) if st == 503 else ""
                self.ready_samples.append((now(), s.name, s.n, st, fails))
            self.halt.wait(0.7)

    def snapshot_poller(self) -> None:
        """Every second, the models' snapshot in Redis when it changed: (t, n_learned, learned offsets)."""
        from online_models import Recommender
        client = redis.Redis.from_url(self.redis_url, socket_timeout=2, socket_connect_timeout=2)
        last = None
        while not self.halt.is_set():
            try:
                blob = client.get(f"{self.prefix}models:snapshot")
                if blob and blob != last:
                    last = blob
                    m = Recommender.restore(blob)
                    self.snapshots.append((now(), m.n_learned, dict(m.learned_offsets)))
            except Exception:  # noqa: BLE001 - Redis away
                pass
            self.halt.wait(1.0)

    def watchdog(self) -> None:
        while not self.halt.is_set():
            for s in self.slots:
                with s.lock:
                    if s.w is not None and not s.expected_down and s.w.proc.poll() is not None:
                        rc = s.w.proc.returncode
                        rec = {"t": now(), "slot": s.name, "incarnation": s.n, "rc": rc, "tail": s.w.log_tail(30)}
                        s.unexpected_exits.append(rec)
                        log(f"!!! {s.name} exited unexpectedly rc={rc}; restarting")
                        s.start()
            self.halt.wait(1)

    # ------------------------------------------------------------------ faults
    def f_kill9_worker(self, s: Slot, rec: dict) -> None:
        with s.lock:
            s.expected_down = True
            s.w.stop(signal.SIGKILL)
        time.sleep(self.rng.uniform(0, 4))
        with s.lock:
            s.start()
            s.expected_down = False

    def f_sigterm_worker(self, s: Slot, rec: dict) -> None:
        with s.lock:
            s.expected_down = True
            t = time.monotonic()
            try:
                rc = s.w.stop(signal.SIGTERM, timeout=90)
            except AssertionError as exc:
                rc = "timeout"
                rec["error"] = str(exc)[-3000:]
            rec["rc"], rec["stop_s"] = rc, round(time.monotonic() - t, 1)
            if rc != 0:
                log(f"!!! {s.name} SIGTERM rc={rc} after {rec['stop_s']} s")
        time.sleep(self.rng.uniform(0, 3))
        with s.lock:
            s.start()
            s.expected_down = False

    def f_sigstop_worker(self, s: Slot, rec: dict) -> None:
        hold = self.args.session_timeout + self.rng.uniform(3, 12)
        rec["hold_s"] = round(hold, 1)
        with s.lock:
            s.expected_down = True
            s.stopped = True
            s.w.proc.send_signal(signal.SIGSTOP)
        time.sleep(hold)
        with s.lock:
            s.w.proc.send_signal(signal.SIGCONT)
            s.stopped = False
            s.expected_down = False

    def f_broker(self, _s, rec: dict) -> None:
        self._outage(rec, "kafka", self.kafka_lock, self.svc.kafka_kill9, lambda: self.svc.kafka("start"))

    def f_redis(self, _s, rec: dict) -> None:
        self._outage(rec, "redis", self.redis_lock, lambda: self.svc.redis("stop"), lambda: self.svc.redis("start"))

    def _outage(self, rec: dict, name: str, lock: threading.Lock, stop, start) -> None:
        """A service down for 4 to 25 s (the fault's length is drawn, not a wait on anything),
        recorded in ``self.down`` for the judge; a start that fails is logged and tried once more."""
        hold = self.rng.uniform(4, 25)
        rec["hold_s"] = round(hold, 1)
        with lock:
            stop()
            out = {"svc": name, "start": now()}
            self.down.append(out)
            time.sleep(hold)
            for _ in range(2):
                rc, text = start()
                out["end"] = now()
                if rc == 0:
                    return
                rec["error"] = text
                log(f"!!! {name} start failed", text)

    KINDS = {"kill9_worker": (f_kill9_worker, True), "sigterm_worker": (f_sigterm_worker, True),
             "sigstop_worker": (f_sigstop_worker, True), "kill9_broker": (f_broker, False),
             "redis_restart": (f_redis, False)}

    def busy(self, kind: str, slot: Slot | None) -> bool:
        if kind == "kill9_broker":
            return self.kafka_lock.locked()
        if kind == "redis_restart":
            return self.redis_lock.locked()
        return slot.expected_down

    def launch(self, kind: str, threads: list, overlap: bool) -> bool:
        fn, on_worker = self.KINDS[kind]
        slot = None
        if on_worker:
            free = [s for s in self.slots if not s.expected_down]
            if not free:
                return False
            slot = self.rng.choice(free)
            slot.expected_down = True  # reserved (the fault sets it again under its lock)
        elif self.busy(kind, None):
            return False
        rec = {"kind": kind, "target": slot.name if slot else kind.split("_")[-1], "t": now(), "overlap": overlap}
        self.faults.append(rec)
        log(f"FAULT {kind} {rec['target']}{' (overlapping)' if overlap else ''}")

        def run():
            try:
                fn(self, slot, rec)
            except BaseException:  # noqa: BLE001
                rec["error"] = traceback.format_exc()
                log("!!! fault failed", rec["error"])
                if slot is not None:
                    slot.expected_down = False
            rec["end"] = now()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        threads.append(t)
        return True

    def injector(self, until: float) -> list:
        threads: list[threading.Thread] = []
        kinds = list(self.KINDS)
        weights = [3, 2, 2, 2, 2]
        while time.monotonic() < until:
            time.sleep(self.rng.uniform(5, 20))
            if time.monotonic() >= until:
                break
            if self.rng.random() < 0.25:
                a, b = self.rng.sample(kinds, 2)
                self.launch(a, threads, True)
                time.sleep(self.rng.uniform(0, 3))
                self.launch(b, threads, True)
            else:
                self.launch(self.rng.choices(kinds, weights)[0], threads, False)
        return threads

    # ------------------------------------------------------------------ the run
    def wait(self, cond, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got = cond()
            except AssertionError:
                raise
            except Exception as exc:  # noqa: BLE001
                got = None
                last = exc  # noqa: F841
            if got:
                return got
            time.sleep(1)
        raise TimeoutError(what)

    def run(self) -> dict:
        a = self.args
        log(f"prefix {self.prefix}, out {self.out}")
        ensure_topics(self.bootstrap, [f"{self.prefix}{t}" for t in ("clicks", "purchases", "recommendations", "dlq")], 4)
        for s in self.slots:
            s.start()
        self.wait(lambda: all(s.ready()[0] == 200 for s in self.slots), 180, "both workers ready")
        log("both ready")
        threading.Thread(target=self.poller, daemon=True).start()
        threading.Thread(target=self.watchdog, daemon=True).start()
        threading.Thread(target=self.snapshot_poller, daemon=True).start()
        self.producing.set()
        pt = threading.Thread(target=self.producer, daemon=True)
        pt.start()
        time.sleep(10)
        until = time.monotonic() + a.duration
        threads = self.injector(until)
        log("faults stop; waiting for fault threads")
        for t in threads:
            t.join(300)
        self.producing.clear()
        self.produced_done.wait(900)
        pt.join(60)
        fault_end = now()
        log(f"faults and producing over at {fault_end}")
        report = {"seed": a.seed, "prefix": self.prefix, "duration_s": a.duration, "rate": a.rate,
                  "valid_sent": self.n_valid, "invalid_sent": self.n_invalid,
                  "valid_acked": len(self.valid_pos), "invalid_acked": len(self.invalid),
                  "send_errors": self.send_errors[:20], "faults": self.faults, "outages": self.down}
        checks: dict[str, object] = {}
        client = redis.Redis.from_url(self.redis_url)
        # 1. exactly once
        t = time.monotonic()
        last = {}

        def exact():
            counts = applied_counts(client, self.prefix, self.expected)
            last["counts"] = counts
            twice = {u: (counts[u], n) for u, n in self.expected.items() if counts[u] > n}
            if twice:
                last["twice"] = twice
                return "twice"
            return counts == self.expected

        try:
            got = self.wait(exact, a.drain_timeout, "exactly once")
            checks["exactly_once"] = "PASS" if got is True else f"FAIL: applied twice {dict(list(last['twice'].items())[:20])}"
        except TimeoutError:
            counts = last.get("counts", {})
            short = {u: (counts.get(u), n) for u, n in self.expected.items() if counts.get(u) != n}
            checks["exactly_once"] = (f"FAIL: {len(short)} users differ, applied {sum(counts.values())} of "
                                      f"{sum(self.expected.values())}: {dict(list(short.items())[:20])}")
        checks["exactly_once_wait_s"] = round(time.monotonic() - t, 1)
        log("exactly_once:", checks["exactly_once"])
        # 2. committed
        topics = [f"{self.prefix}clicks", f"{self.prefix}purchases"]
        try:
            left = {}

            def committed():
                left.clear()
                left.update(unread(self.bootstrap, self.group, topics))
                return not left
            self.wait(committed, 180, "all committed")
            checks["all_committed"] = "PASS"
        except Exception as exc:  # noqa: BLE001
            checks["all_committed"] = f"FAIL: {left} {exc!r}"
        log("all_committed:", checks["all_committed"])
        # 3. workers alive and ready
        try:
            self.wait(lambda: all(s.ready()[0] == 200 for s in self.slots), 120, "ready")
            checks["ready_at_end"] = "PASS"
        except TimeoutError:
            checks["ready_at_end"] = "FAIL: " + "; ".join(f"{s.name}: {s.ready()}" for s in self.slots)
        checks["alive_at_end"] = "PASS" if all(s.alive() for s in self.slots) else "FAIL"
        log("ready:", checks["ready_at_end"], "alive:", checks["alive_at_end"])
        # 4. lag metric: 0 once every worker's lag timer (every 2 s) has run after the last
        # commit (read at once, it showed the backlog of the last fault as its previous tick saw it)
        lags = {}

        def no_lag():
            lags.update({s.name: s.w.metric_total("streamrec_consumer_lag") for s in self.slots})
            return not any(lags.values())
        try:
            self.wait(no_lag, 30, "the lag gauges at 0")
            checks["consumer_lag_metric"] = "PASS"
        except TimeoutError:
            checks["consumer_lag_metric"] = f"FAIL: {lags}"
        # 5. learners on each worker
        learners = ("recommender", "covisit", "reminder", "trending")
        n = len(self.valid_pos)

        def learned_all():
            out = {s.name: {m: s.w.metric("streamrec_model_events_learned", model=m) for m in learners} for s in self.slots}
            last["learned"] = out
            return all(v == n for d in out.values() for v in d.values()) or any(v > n for d in out.values() for v in d.values())
        try:
            self.wait(learned_all, 120, "learned")
        except TimeoutError:
            pass
        lv = last.get("learned", {})
        checks["learned_per_worker"] = lv
        checks["learned"] = ("PASS" if all(v == n for d in lv.values() for v in d.values())
                             else f"FAIL (events {n}): {lv}")
        log("learned:", checks["learned"])
        # snapshot in Redis
        try:
            from online_models import Recommender
            blob = client.get(f"{self.prefix}models:snapshot")
            snap = Recommender.restore(blob) if blob else None
            checks["snapshot_learned"] = ({"recommender": snap.n_learned, **{k: snap.learners[k].n_learned for k in learners[1:]}}
                                          if snap else None)
        except Exception as exc:  # noqa: BLE001
            checks["snapshot_learned"] = repr(exc)
        # 5b. each snapshot seen: n_learned against the valid events at or below its learned offsets
        by_source: dict[str, list[int]] = {}
        for (t, p, o) in self.valid_pos:
            by_source.setdefault(f"{t}:{p}", []).append(o)
        for offs in by_source.values():
            offs.sort()
        import bisect
        bad_snaps, first_bad = 0, None
        for (ts, n_learned, offsets) in self.snapshots:
            want = sum(bisect.bisect_right(by_source.get(src, []), off) for src, off in offsets.items())
            if want != n_learned:
                bad_snaps += 1
                if first_bad is None:
                    first_bad = {"t": ts, "n_learned": n_learned, "valid_at_or_below_offsets": want, "offsets": offsets}
        checks["snapshots_seen"] = len(self.snapshots)
        checks["snapshots_inconsistent"] = bad_snaps
        checks["first_inconsistent_snapshot"] = first_bad
        if first_bad is not None:
            i = next(k for k, s in enumerate(self.snapshots) if s[0] == first_bad["t"])
            if i > 0:
                prev = self.snapshots[i - 1]
                checks["snapshot_before_it"] = {"t": prev[0], "n_learned": prev[1], "offsets": prev[2]}
        log("snapshots:", len(self.snapshots), "inconsistent:", bad_snaps)
        # 6. DLQ
        letters = [decode_dead_letter(r.value) for r in read_all(self.bootstrap, f"{self.prefix}dlq")]
        at = {}
        for d in letters:
            at.setdefault((d.topic, d.partition, d.offset), []).append(d.code)
        valid_on_dlq = [(k, v) for k, v in at.items() if k in self.valid_pos]
        stray = [(k, v) for k, v in at.items() if k not in self.valid_pos and k not in self.invalid]
        missing = [k for k in self.invalid if k not in at]
        wrong = [(k, at[k], want) for k, want in self.invalid.items() if k in at and set(at[k]) != {want}]
        dup = sum(1 for v in at.values() if len(v) > 1)
        checks["dlq"] = {"letters": len(letters), "distinct": len(at), "duplicates": dup,
                         "valid_on_dlq": valid_on_dlq[:20], "n_valid_on_dlq": len(valid_on_dlq), "stray": stray[:10],
                         "missing": missing[:20], "n_missing": len(missing), "wrong_code": wrong[:10]}
        checks["dlq_ok"] = "PASS" if not (valid_on_dlq or missing or wrong or stray) else "FAIL"
        log("dlq:", checks["dlq_ok"], checks["dlq"]["letters"], "letters")
        # 7. readyz during outages
        grace = a.ready_grace
        bad = []
        for o in self.down:
            end = o.get("end", fault_end)
            for (ts, name, inc, st, _fails) in self.ready_samples:
                if o["start"] + grace <= ts <= end - 1 and st == 200:
                    bad.append((o["svc"], o["start"], end, ts, name, inc))
        checks["ready_during_outage"] = {"outages_longer_than_grace": sum(1 for o in self.down if o.get("end", fault_end) - o["start"] > grace + 1),
                                         "ok_samples_while_down": bad[:30], "n": len(bad)}
        # how soon was each outage noticed
        noticed = []
        for o in self.down:
            end = o.get("end", fault_end)
            firsts = {}
            for (ts, name, _inc, st, _fails) in self.ready_samples:
                if o["start"] <= ts <= end and st != 200 and name not in firsts:
                    firsts[name] = round(ts - o["start"], 1)
            noticed.append({"svc": o["svc"], "len": round(end - o["start"], 1), "unready_after": firsts})
        checks["outage_noticed"] = noticed
        # 8. worker exits and logs
        checks["unexpected_exits"] = [e for s in self.slots for e in s.unexpected_exits]
        sigterm = [f for f in self.faults if f["kind"] == "sigterm_worker"]
        checks["sigterm"] = [(f.get("rc"), f.get("stop_s")) for f in sigterm]
        errs: dict[str, int] = {}
        tracebacks = 0
        for s in self.slots:
            for p in s.logs:
                text = p.read_text(errors="replace") if p.exists() else ""
                tracebacks += text.count("Traceback")
                for line in text.splitlines():
                    if re.search(r"\b(ERROR|CRITICAL)\b|Traceback|Crashed reason|Restarting dead", line):
                        key = re.sub(r"\d+", "N", line[line.find("]") + 1:][:160]) if "]" in line else line[:160]
                        errs[key] = errs.get(key, 0) + 1
        checks["tracebacks"] = tracebacks
        checks["error_lines"] = dict(sorted(errs.items(), key=lambda kv: -kv[1])[:60])
        unready = {}
        for (_ts, _name, _inc, st, fails) in self.ready_samples:
            unready[f"{st}:{fails}"] = unready.get(f"{st}:{fails}", 0) + 1
        checks["ready_sample_hist"] = unready
        report["checks"] = checks
        report["fault_counts"] = {}
        for f in self.faults:
            report["fault_counts"][f["kind"]] = report["fault_counts"].get(f["kind"], 0) + 1
        report["overlapping"] = sum(1 for f in self.faults if f["overlap"])
        report["wall_s"] = now()
        client.close()
        return report

    def shutdown(self) -> None:
        self.halt.set()
        self.producing.clear()
        for s in self.slots:
            if s.w is not None and s.w.proc.poll() is None:
                if s.stopped:
                    s.w.proc.send_signal(signal.SIGCONT)
                s.w.proc.send_signal(signal.SIGTERM)
                try:
                    s.w.proc.wait(60)
                except subprocess.TimeoutExpired:
                    s.w.proc.kill()
        # services back up for the next run
        self.svc.kafka("start")
        self.svc.redis("start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=1, help="the faults' and the events' random seed")
    p.add_argument("--duration", type=float, default=720, help="seconds of faults, then the workers drain and are checked")
    p.add_argument("--rate", type=int, default=250, help="events a second")
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--invalid-every", type=int, default=400, help="one invalid event in this many")
    p.add_argument("--kafka-port", type=int, default=29092, help="the broker `make up KAFKA_PORT=...` started")
    p.add_argument("--redis-port", type=int, default=26379, help="the Redis `make up REDIS_PORT=...` started")
    p.add_argument("--metrics-base", type=int, default=29500, help="the workers' metrics ports: this and the next")
    p.add_argument("--session-timeout", type=int, default=10)
    p.add_argument("--snapshot-interval", type=int, default=15)
    p.add_argument("--drain-timeout", type=float, default=420, help="seconds the workers get to catch up after the faults")
    p.add_argument("--ready-grace", type=float, default=12, help="seconds an outage may last before /readyz must say unready")
    p.add_argument("--out", default=None, help="where the report and the logs go")
    p.add_argument("--run-dir", default=str(ROOT / ".run"), help="the data dirs of `make up`'s broker and Redis (kafka/, redis/)")
    args = p.parse_args()
    soak = Soak(args)
    try:
        report = soak.run()
    finally:
        soak.shutdown()
    (soak.out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps({k: v for k, v in report.items() if k not in ("faults",)}, indent=1, default=str))


if __name__ == "__main__":
    main()
