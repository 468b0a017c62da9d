"""The README's quick start ("Running it yourself"), run line by line exactly as written.

The lines are read from README.md's code block, so the README and this test cannot drift: a
line this test does not know how to check fails it. Each line runs through ``bash -c`` in the
repository root, as a developer would type it, with the environment pointed away from a
developer's own stack:

- ``make up`` / ``make down`` on free loopback ports (``KAFKA_PORT``, ``KAFKA_CONTROLLER_PORT``,
  ``REDIS_PORT``) and data dirs under ``.run/test-quickstart-*`` (``KAFKA_DATA_DIR``,
  ``REDIS_DATA_DIR``, which deploy/kafka/kafka.sh and deploy/redis/redis.sh read); the broker
  stops by itself should this test die (``KAFKA_WATCH_PID``);
- a private model registry (``STREAMREC_MODEL_DIR``), topic prefix, consumer group and metrics port.

The long-running lines (``worker``, ``produce``, ``tail``, ``serve``) start as processes in
order, as in separate terminals: tail starts while produce sends. Then the outcomes are
checked: train registered a version, the worker became ready on it, the catalogue was sent and
indexed, produce sent 20,000 events, the worker handled them all and published
recommendations, tail printed them and stops on Ctrl-C, serve answers a search and a user's
recommendations and stops on SIGTERM, distil-queries writes a query student into the model
registry, the worker stops on SIGTERM with exit 0, and
``make down`` stops both servers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import redis
from ports import free_ports
from workerkit import ROOT, http_get, read_all, wait_for

from stream.records import decode_recommendation

README = ROOT / "README.md"
RUN_DIR = ROOT / ".run"
N_EVENTS = 20_000  # the produce line's --limit


def quick_start_lines() -> list[str]:
    """The lines of the bash block under "## Running it yourself", as written."""
    section = README.read_text().split("## Running it yourself", 1)
    assert len(section) == 2, "README.md has no section 'Running it yourself'"
    block = re.search(r"```bash\n(.*?)```", section[1], flags=re.S)
    assert block, "the section 'Running it yourself' has no ```bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def command_of(line: str) -> str:
    """``up``, ``down`` or the streamrec command a quick-start line runs."""
    if re.match(r'eval "\$\(make -s up\)"', line):
        return "up"
    if re.match(r"make down(\s|$)", line):
        return "down"
    found = re.match(r"\.venv/bin/streamrec ([a-z-]+)", line)
    assert found, f"the quick-start test does not know how to run README line {line!r}"
    if found.group(1) == "produce" and "catalogue" in line.split("#")[0]:
        return "produce-catalogue"
    return found.group(1)


class Terminal:
    """One long-running README line in the background, its output in a log file."""

    def __init__(self, line: str, env: dict[str, str], log: Path) -> None:
        self.line, self.log = line, log
        with open(log, "wb") as out:
            # its own session: a Ctrl-C or SIGTERM goes to what the line runs, as from a terminal
            self.proc = subprocess.Popen(["bash", "-c", line], cwd=ROOT, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, n: int = 40) -> str:
        return f"--- {self.line}\n" + "\n".join(self.output().splitlines()[-n:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def assert_alive(self) -> None:
        assert self.alive(), f"exited {self.proc.returncode}:\n{self.tail()}"

    def signal(self, sig: int, timeout: float = 60) -> int:
        """Send ``sig`` to the line's process group (as a terminal does); its exit status."""
        if self.alive():
            os.killpg(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            raise AssertionError(f"did not stop within {timeout} s of {signal.Signals(sig).name}:\n{self.tail()}") from None

    def kill(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def run(line: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["bash", "-c", line], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"{line!r} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done


def run_exporting(line: str, env: dict[str, str], timeout: float) -> dict[str, str]:
    """Run ``line`` in a shell and return the variables it set there (``eval "$(make -s up)"``)."""
    done = run(line + "\nenv -0", env, timeout)
    after = dict(item.split("=", 1) for item in done.stdout.split("\0") if "=" in item)
    return {k: v for k, v in after.items() if env.get(k) != v and k not in ("_", "SHLVL", "PWD", "OLDPWD")}


def test_the_readme_quick_start_runs_as_written(tmp_path, topic_prefix):
    lines = quick_start_lines()
    commands = [command_of(line) for line in lines]
    assert commands == ["up", "train", "worker", "produce", "produce-catalogue", "serve", "distil-queries", "tail",
                        "evaluate", "forget", "redrive", "report", "down"], \
        f"the quick start changed ({commands}): teach this test its new lines"
    by_command = dict(zip(commands, lines, strict=True))
    assert f"--limit {N_EVENTS}" in by_command["produce"]

    kafka_port, controller_port, redis_port, metrics_port, serve_port = free_ports(5)
    data = RUN_DIR / f"test-quickstart-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    app_id = f"{topic_prefix}worker"
    # nothing of the developer's settings or of a calling make leaks in
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("STREAMREC_") and k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
    env.update({
        "KAFKA_PORT": str(kafka_port), "KAFKA_CONTROLLER_PORT": str(controller_port), "REDIS_PORT": str(redis_port),
        "KAFKA_DATA_DIR": str(data / "kafka"), "REDIS_DATA_DIR": str(data / "redis"), "KAFKA_WATCH_PID": str(os.getpid()),
        "STREAMREC_MODEL_DIR": str(tmp_path / "models"), "STREAMREC_TOPIC_PREFIX": topic_prefix,
        "STREAMREC_APP_ID": app_id, "STREAMREC_METRICS_PORT": str(metrics_port), "PYTHONUNBUFFERED": "1",
        "STREAMREC_SERVE_PORT": str(serve_port),
    })
    terminals: list[Terminal] = []
    stack_up = True  # from the first try on: `make down` is harmless when nothing runs
    try:
        # eval "$(make -s up)": the broker and the server on our ports, and the two exports
        exported = run_exporting(by_command["up"], env, 600)
        assert exported == {"STREAMREC_KAFKA_BOOTSTRAP": f"127.0.0.1:{kafka_port}",
                            "STREAMREC_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}, exported
        env.update(exported)
        run("make -s status", env, 60)  # both servers of these data dirs run and answer

        # train: a version registered in the private registry and made CURRENT
        trained = run(by_command["train"], env, 600)
        current = (tmp_path / "models" / "CURRENT").read_text().strip()
        assert re.fullmatch(r"v\d{4}", current) and (tmp_path / "models" / current).is_dir(), current
        assert f"registered {current}" in trained.stdout, trained.stdout

        # worker: ready (/readyz) on the trained model
        worker = Terminal(by_command["worker"], env, tmp_path / "worker.log")
        terminals.append(worker)
        metrics = f"http://127.0.0.1:{metrics_port}"

        def ready() -> bool:
            worker.assert_alive()
            return http_get(f"{metrics}/readyz")[0] == 200

        wait_for(ready, 120, f"the worker to be ready\n{worker.tail()}")
        assert f'version="{current}"' in http_get(f"{metrics}/metrics")[1], "the worker does not serve the trained model"

        # the catalogue for search: sent, then embedded and indexed by the worker
        catalogue = run(by_command["produce-catalogue"], env, 120)
        assert re.search(rf"^sent 2,000 items to {topic_prefix}items ", catalogue.stdout, flags=re.M), catalogue.stdout

        def indexed() -> float:
            worker.assert_alive()
            found = re.search(r"^streamrec_catalogue_items (\S+)$", http_get(f"{metrics}/metrics")[1], flags=re.M)
            return found is not None and float(found.group(1)) == 2000

        wait_for(indexed, 600, f"the worker to index the catalogue\n{worker.tail()}")

        # produce in one terminal, tail in another while it sends
        produce = Terminal(by_command["produce"], env, tmp_path / "produce.log")
        terminals.append(produce)
        tail = Terminal(by_command["tail"], env, tmp_path / "tail.log")
        terminals.append(tail)
        assert produce.proc.wait(120) == 0, produce.tail()
        assert re.search(rf"^sent {N_EVENTS:,} events ", produce.output(), flags=re.M), produce.tail()
        topics = [f"{topic_prefix}clicks", f"{topic_prefix}purchases"]
        on_topics = sum(len(read_all(exported["STREAMREC_KAFKA_BOOTSTRAP"], t)) for t in topics)
        assert on_topics == N_EVENTS, f"{on_topics} events on {topics}"

        def consumed() -> float:
            _, body = http_get(f"{metrics}/metrics")
            return sum(float(v) for v in re.findall(r"^streamrec_events_consumed_total\{[^}]*\} (\S+)$", body, flags=re.M))

        wait_for(lambda: worker.assert_alive() or consumed() == N_EVENTS, 120, f"the worker to handle every event\n{worker.tail()}")
        recs = [decode_recommendation(r.value) for r in read_all(exported["STREAMREC_KAFKA_BOOTSTRAP"], f"{topic_prefix}recommendations")]
        assert recs and any(rec.items for rec in recs), "the worker published no recommendation"
        users = {rec.user_id for rec in recs}

        def tail_lines() -> list[str]:  # "user  item score, ...  latency N ms  after EVENT  models"
            tail.assert_alive()
            return [line for line in tail.output().splitlines()
                    if re.match(r"(\S+)  \S+ \d+\.\d{3}.*  latency -?\d+ ms  after \S+", line)
                    and line.split(" ", 1)[0] in users]

        wait_for(lambda: len(tail_lines()) >= 100, 60, f"tail to print recommendations\n{tail.tail()}")
        assert tail.signal(signal.SIGINT) == 0, tail.tail()  # Ctrl-C

        # serve: the HTTP API answers a search and a user's recommendations, then stops on SIGTERM
        serve = Terminal(by_command["serve"], env, tmp_path / "serve.log")
        terminals.append(serve)
        api = f"http://127.0.0.1:{serve_port}"
        wait_for(lambda: serve.assert_alive() or http_get(f"{api}/readyz")[0] == 200, 600, f"serve to be ready\n{serve.tail()}")
        shopper = sorted(users)[0]
        status, body = http_get(f"{api}/v1/search?q=running+shoes&user_id={shopper}&k=5")
        assert status == 200 and len(json.loads(body)["items"]) == 5, body

        def recommended() -> list:  # the worker's first snapshot follows its first batch within seconds
            serve.assert_alive()  # (it came at the first 300 s interval, and serve ranked with empty models)
            if "the workers' snapshot is loaded" not in json.loads(http_get(f"{api}/readyz")[1])["detail"]:
                return []
            status, body = http_get(f"{api}/v1/users/{shopper}/recommendations")
            assert status == 200, body
            return json.loads(body)["items"]

        wait_for(recommended, 60, f"serve to load the worker's snapshot and recommend to {shopper}\n{serve.tail()}")
        assert serve.signal(signal.SIGTERM) == 0, serve.tail()

        # distil-queries: a query student fitted on the demo catalogue, in the model registry
        distilled = run(by_command["distil-queries"], env, 600)
        student = tmp_path / "models" / "query-student.npz"
        assert student.is_file() and f"STREAMREC_QUERY_STUDENT={student}" in distilled.stdout, distilled.stdout

        # evaluate: offline; the quick start needs nothing from ../shared
        assert "../shared" not in by_command["evaluate"], by_command["evaluate"]
        evaluated = run(by_command["evaluate"], env, 600)
        assert "served" in evaluated.stdout, evaluated.stdout

        # forget: the request goes out, and the worker tombstones the user's lists
        forgotten = re.search(r"streamrec forget (\S+)", by_command["forget"]).group(1)
        assert forgotten in users, f"{forgotten} had no list: the README forgets a user the quick start never made"
        sent = run(by_command["forget"], env, 120)
        assert f"sent for user {forgotten}" in sent.stdout, sent.stdout
        wait_for(lambda: any(r.key == forgotten.encode() and r.value is None for r in read_all(
            exported["STREAMREC_KAFKA_BOOTSTRAP"], f"{topic_prefix}recommendations")), 60,
            f"the tombstone for {forgotten}\n{worker.tail()}")

        # redrive --dry-run: reads the dead-letter topic, sends nothing (the quick start dead-letters nothing)
        drove = run(by_command["redrive"], env, 120)
        assert re.search(r"^read \d+ messages? of \S+dlq; would send back 0$", drove.stdout, flags=re.M), drove.stdout

        # report: the worker's counters, one "default" variant without an experiment
        reported = run(by_command["report"], env, 60)
        assert re.search(r"^default \(control\)\s+[\d,]+\s+lists \d+", reported.stdout, flags=re.M), reported.stdout  # users, lists
        assert worker.signal(signal.SIGTERM) == 0, worker.tail()

        # make down: both servers stop
        run(by_command["down"], env, 120)
        stack_up = False
        assert subprocess.run(["make", "-s", "status"], cwd=ROOT, env=env, capture_output=True).returncode != 0
        client = redis.Redis(port=redis_port, socket_connect_timeout=1)
        try:
            client.ping()
            raise AssertionError("Redis still answers after `make down`")
        except redis.ConnectionError:
            pass
        finally:
            client.close()
    finally:
        for terminal in terminals:
            terminal.kill()
        if stack_up:
            subprocess.run(["make", "-s", "down"], cwd=ROOT, env=env, capture_output=True, timeout=120)
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(ROOT / ".run" / "faust" / app_id, ignore_errors=True)
