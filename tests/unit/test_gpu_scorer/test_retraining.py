"""A retrained version: the served one's architecture on more data, registered as CURRENT."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import time
from types import SimpleNamespace

import msgspec
import numpy as np
import pytest
import torch
import typer
from kafka import TopicPartition
from retrain_consumer import FakeRetrainConsumer as FakeConsumer
from tiny_models import register_tiny
from typer.testing import CliRunner

from gpu_scorer import registry as registry_module
from gpu_scorer import retraining, train_cli, training
from gpu_scorer.errors import ModelLoadError
from gpu_scorer.registry import ModelRegistry
from gpu_scorer.retraining import Retrainer, architecture_of
from gpu_scorer.train_cli import train
from gpu_scorer.training import TrainConfig, scorer_rank_metrics
from gpu_scorer.vocab import Vocab
from online_models import Interaction
from online_models.datasets import synthetic_interactions
from stream import retrain_cli
from stream.evaluate_cli import evaluate
from stream.records import ClickEvent, ForgetRequest, encode
from stream.retrain_cli import retrain
from stream.settings import TopicNames

QUICK = TrainConfig(epochs=2, progress=False)


def _fake_kafka(monkeypatch, consumer: type) -> None:
    monkeypatch.setattr(retrain_cli, "KafkaConsumer", consumer)
    monkeypatch.setattr(retrain_cli, "require_topics", lambda settings, names: None)


def test_a_retrained_version_keeps_the_served_architecture_and_becomes_current(tmp_path):
    registry = ModelRegistry(tmp_path)
    assert architecture_of(registry) == {}  # nothing registered: the defaults
    log = list(synthetic_interactions(n_events=600, n_users=40, n_items=80, seed=1))
    first, _ = Retrainer(registry, {"dim": 16, "n_heads": 2, "max_len": 8}, QUICK).fit(log[:400])
    served = architecture_of(registry)
    assert served["dim"] == 16 and served["max_len"] == 8
    second, metrics = Retrainer(registry, served, QUICK).fit(log, {"source": "test"})
    assert registry.latest() == second != first and metrics["epochs_run"] >= 1
    manifest = registry.manifest(second)
    assert {k: manifest["config"][k] for k in served} == served
    assert manifest["data"]["events"] == len(log) and manifest["data"]["retrained"] and manifest["parity"]["ok"]
    assert Retrainer(registry, served, QUICK).load(second).version == second


@pytest.mark.parametrize(("key", "value", "said"), [("dim", "abc", "dim='abc'"), ("max_len", float("nan"), "max_len=nan"),
                                                 ("n_heads", 3, "n_heads=3 does not divide"),
                                                 ("dropout", 1.5, "dropout=1.5")])
def test_a_served_manifest_whose_architecture_cannot_be_fitted_is_a_model_load_error(tmp_path, key, value, said):
    """A hand-edited manifest (dim "abc", max_len NaN) reached the fit, and retrain logged a
    TypeError's traceback from the model's constructor and exited 1."""
    registry = ModelRegistry(tmp_path)
    log = list(synthetic_interactions(n_events=300, n_users=30, n_items=40, seed=1))
    version, _ = Retrainer(registry, {"dim": 16, "n_heads": 2, "max_len": 8}, QUICK).fit(log)
    path = registry.path(version) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["config"][key] = value
    path.write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match=re.escape(said)):
        architecture_of(registry)


def test_evaluate_with_retraining_refuses_a_scorer_whose_manifest_cannot_be_fitted(tmp_path):
    """retrain refused it in one line; `evaluate --retrain-every` reached the same check with no
    catch, and ended in a ModelLoadError traceback."""
    version = register_tiny(tmp_path)
    manifest = json.loads((tmp_path / version / "manifest.json").read_text())
    manifest["config"]["dim"] = "abc"
    (tmp_path / version / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(_cli("evaluate"), ["evaluate", "-n", "50", "-m", "served", "--retrain-every", "60",
                                                   "--scorer-model", str(tmp_path)],
                                env={"COLUMNS": "500", "STREAMREC_SCORER_DEVICE": "cpu"})
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "dim='abc'" in text and "--scorer-model" in text, (text, result.exception)


def test_a_fit_leaves_the_callers_thread_count_as_it_was(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        log = list(synthetic_interactions(n_events=200, n_users=20, n_items=40, seed=2))
        Retrainer(ModelRegistry(tmp_path), {"dim": 16, "max_len": 8}, QUICK, threads=1).fit(log)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _cli(*commands):
    app = typer.Typer()
    for name in commands:
        app.command(name)({"train": train, "retrain": retrain, "evaluate": evaluate}[name])
    app.command("noop")(lambda: None)
    return app


def test_retrain_refuses_a_registry_whose_current_manifest_is_unreadable_and_a_window_too_large(tmp_path):
    version = register_tiny(tmp_path)
    (tmp_path / version / "manifest.json").write_text('{"broken')
    runner = CliRunner()
    result = runner.invoke(_cli("retrain"), ["retrain", "--once", "--model-dir", str(tmp_path)], env={"COLUMNS": "500"})
    assert result.exit_code == 2 and "unreadable manifest" in result.output and "--model-dir" in result.output
    huge = runner.invoke(_cli("retrain"), ["retrain", "--once", "--window", str(10**20), "--model-dir", str(tmp_path)],
                         env={"COLUMNS": "500"})
    assert huge.exit_code == 2 and "--window" in huge.output


def test_train_refuses_more_threads_than_it_could_start(tmp_path):
    result = CliRunner().invoke(_cli("train"), ["train", "--threads", "99999999999", "--model-dir", str(tmp_path)],
                                env={"COLUMNS": "500"})
    assert result.exit_code == 2 and "--threads" in result.output and "Traceback" not in result.output


def test_retrain_into_a_folder_it_cannot_write_is_refused_before_reading_kafka(tmp_path, monkeypatch):
    monkeypatch.setattr(train_cli.os, "access", lambda path, mode: not mode & os.W_OK)  # a read-only mount (root ignores modes)
    result = CliRunner().invoke(_cli("retrain"), ["retrain", "--once", "--model-dir", str(tmp_path)],
                                env={"COLUMNS": "500"})
    assert result.exit_code == 2 and "cannot be written" in result.output, result.output


def test_retrain_once_stopped_before_its_fit_exits_1(tmp_path, monkeypatch):
    """A scheduler that stops `retrain --once` mid-backlog must not read success: no version was
    registered (found by a review: it exited 0)."""
    class Consumer(FakeConsumer):  # a large backlog, and SIGTERM while it is read
        END = 1_000_000

        def poll(self, timeout_ms, max_records):
            self.polls += 1
            if self.polls == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return {}

    _fake_kafka(monkeypatch, Consumer)
    result = CliRunner().invoke(_cli("retrain"), ["retrain", "--once", "--model-dir", str(tmp_path / "m"),
                                                  "--device", "cpu"])
    assert result.exit_code == 1 and not (tmp_path / "m" / "CURRENT").exists()


def _no_gpu(monkeypatch):
    """This machine as one without a GPU, for ONNX Runtime and for torch, whatever it has."""
    monkeypatch.setattr(train_cli, "cuda_unavailable", lambda: "no NVIDIA driver (libcuda) found")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_a_gpu_the_machine_lacks_is_refused_before_the_training(tmp_path, monkeypatch):
    """`train --serve-device cuda` trained for minutes, then failed loading the model (a traceback)."""
    _no_gpu(monkeypatch)
    runner = CliRunner()
    for command, args, hint in (
        ("train", ["--limit", "300", "--serve-device", "cuda"], "--serve-device / STREAMREC_SCORER_DEVICE"),
        ("train", ["--limit", "300", "--device", "cuda"], "--device"),
        ("retrain", ["--once", "--device", "cuda"], "--device"),
    ):
        result = runner.invoke(_cli(command), [command, "--model-dir", str(tmp_path / "m"), *args],
                               env={"COLUMNS": "500"})
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and f"Invalid value for {hint}: 'cuda', but" in text, (command, args, text)
        assert "use cpu, or auto" in text and "read 300 events" not in text
    result = runner.invoke(_cli("evaluate"), ["evaluate", "-n", "50", "-m", "served", "--retrain-every", "60"],
                           env={"COLUMNS": "500", "STREAMREC_SCORER_DEVICE": "cuda"})
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "Invalid value for STREAMREC_SCORER_DEVICE: 'cuda', but" in text, text


def test_retrain_refuses_an_interval_that_is_not_a_number_of_seconds(tmp_path):
    """--every inf fitted once and never again; -f taobao without --dataset read nothing, silently."""
    runner = CliRunner()
    for args, hint, says in ((["--every", "inf"], "--every", "inf is not a number of seconds"),
                             (["--every", "nan"], "--every", ""),
                             (["--every", "-5"], "--every", ""),
                             (["--every", "0"], "--every", ""),
                             (["-f", "taobao"], "--format", "--format taobao describes --dataset, which is not given")):
        result = runner.invoke(_cli("retrain"), ["retrain", "--once", "--model-dir", str(tmp_path), *args],
                               env={"COLUMNS": "500"})
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and f"Invalid value for {hint}" in text.replace("'", "") and says in text, text


@pytest.mark.parametrize(("args", "hint", "says"), [
    (["-d", "{tmp}/log.csv", "-f", "parquet"], "--format", "unknown format 'parquet'; choose one of taobao"),
    (["-d", "{tmp}/missing.csv", "-f", "taobao"], "--dataset", "missing.csv does not exist"),
    (["-d", "{tmp}", "-f", "taobao"], "--dataset", "is a folder; give the log file"),
])
def test_retrain_refuses_a_dataset_or_format_it_cannot_read_before_reaching_kafka(tmp_path, monkeypatch, args, hint,
                                                                                   says):
    """Each was said only once Kafka answered: with the broker away, the user read of Kafka, not of the typo."""
    def kafka(*args, **kwargs):
        raise AssertionError("reached Kafka before the options were checked")

    monkeypatch.setattr(retrain_cli, "require_topics", kafka)
    monkeypatch.setattr(retrain_cli, "KafkaConsumer", kafka)
    (tmp_path / "log.csv").write_text("1,10,100,pv,1511544070\n1,11,100,pv,1511544080\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = CliRunner().invoke(_cli("retrain"), ["retrain", "--once", "--model-dir", str(tmp_path / "m"), *args],
                                env={"COLUMNS": "500"})
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and f"Invalid value for {hint}:" in text and says in text, (text, result.exception)


@pytest.mark.parametrize("command", ["train", "retrain"])
def test_an_empty_model_dir_is_refused_not_taken_as_the_current_folder(tmp_path, monkeypatch, command):
    """`--model-dir ""` (a shell variable that was not set) was Path(""): train wrote its version
    and CURRENT into the folder it ran in. An empty STREAMREC_MODEL_DIR is still the default."""
    monkeypatch.chdir(tmp_path)
    args = [command, "--model-dir", "", *(["--once"] if command == "retrain" else [])]
    result = CliRunner().invoke(_cli(command), args, env={"COLUMNS": "500"})
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "Invalid value for '--model-dir'" in text and "an empty path" in text, text
    assert list(tmp_path.iterdir()) == []


def test_a_refused_train_leaves_the_process_thread_count_as_it_was(tmp_path):
    """A refused `train` had set torch's threads already (a later fit in the process trained on 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = CliRunner().invoke(_cli("train"), ["train", "--threads", "1", "--serve-device", "tpu",
                                                    "--model-dir", str(tmp_path)], env={"COLUMNS": "500"})
        assert result.exit_code == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_retrain_reading_its_backlog_while_the_broker_is_down_waits_for_it(tmp_path, monkeypatch):
    """kafka-python's ``position`` gives None when the broker does not answer within its request
    timeout (30 s; a real broker stopped after ``end_offsets``): ``None >= end`` ended retrain
    with a TypeError's traceback. It now reads on, and goes on once the broker is back."""
    class Consumer(FakeConsumer):  # the broker is down for the first two looks at the position, then back
        looks = 0

        def position(self, tp):
            self.looks += 1
            return None if self.looks <= 2 else 0

    _fake_kafka(monkeypatch, Consumer)
    result = CliRunner().invoke(_cli("retrain"), ["retrain", "--once", "--model-dir", str(tmp_path / "m"),
                                                  "--device", "cpu"])
    # caught up, then nothing to train on: the exit status of a run that registered nothing
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.exception


def test_train_onto_a_full_disk_says_so_in_one_line(tmp_path, monkeypatch):
    """The registry's disk filled up during the training: the export's OSError reached the
    operator as a traceback (seen with a 300 KiB tmpfs as --model-dir)."""
    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(src), None, str(dst))

    monkeypatch.setattr(registry_module.shutil, "copyfile", full)
    # the command sets torch's threads for the process; CPU training is deterministic per thread
    # count, so the tests after this one (test_training's same-seed check) need them back
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    result = CliRunner().invoke(_cli("train"), ["train", "--limit", "300", "--epochs", "1", "--dim", "16", "--max-len", "8",
                                                "--device", "cpu", "--no-progress", "--model-dir", str(tmp_path / "m")],
                                env={"COLUMNS": "500"})
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.exception
    assert "No space left on device" in result.output and "CURRENT is as it was" in result.output, result.output
    assert [p.name for p in (tmp_path / "m").iterdir()] == []  # no staging folder left behind


def test_retrain_reads_on_from_the_oldest_record_when_retention_passes_it(tmp_path, monkeypatch):
    """retrain reads from the oldest retained record, which is what retention deletes next. Its
    consumer had kafka-python's default reset, ``latest``: on a real broker, a reader at offset 10
    whose log start moved to 30 (``delete_records``, as retention does) jumped to the end, 50,
    and never read offsets 30-49, which were still there; with ``earliest`` it read on from 30."""
    made = {}

    class Consumer(FakeConsumer):
        def __init__(self, **kw):
            super().__init__()
            made.update(kw)

    _fake_kafka(monkeypatch, Consumer)
    result = CliRunner().invoke(_cli("retrain"), ["retrain", "--once", "--model-dir", str(tmp_path / "m"),
                                                  "--device", "cpu"])
    assert result.exit_code == 1 and made["auto_offset_reset"] == "earliest", (result.exception, made)


def test_an_erasure_on_a_quiet_stream_still_brings_a_fit(tmp_path, monkeypatch):
    """A fit waited for a new event, so on a quiet stream the served versions kept an erased
    user's events as long as nothing else came: the erasure alone now makes the next fit due."""
    forget = TopicPartition(TopicNames().forget, 0)
    request = SimpleNamespace(value=encode(ForgetRequest(user_id="u1", request_id="r1", ts=1_700_000_000_000)))
    fits = []

    class Consumer(FakeConsumer):  # an empty backlog, then one forget request, then nothing
        def poll(self, timeout_ms, max_records):
            self.polls += 1
            time.sleep(0.01)
            if self.polls == 400:  # fail-safe: stop a run that never fits again
                os.kill(os.getpid(), signal.SIGTERM)
            return {forget: [request]} if self.polls == 3 else {}

    def fit(retrainer, events, base):
        fits.append((events.read, len(events.erased)))
        if len(fits) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return True, True

    _fake_kafka(monkeypatch, Consumer)
    monkeypatch.setattr(retrain_cli, "_fit", fit)
    result = CliRunner().invoke(_cli("retrain"), ["retrain", "--every", "1", "--model-dir", str(tmp_path / "m"),
                                                  "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert fits == [(0, 0), (0, 1)]


def _register_stand_in(registry: ModelRegistry) -> str:
    """A version that is no real model (the pruning reads none)."""
    onnx = registry.root.parent / "stand-in.onnx"
    onnx.write_bytes(b"not read")
    return registry.register(onnx, Vocab(["i1", "i2"]), config={})


def test_retrain_deletes_all_but_the_keep_newest_versions_after_each_one_it_registers(tmp_path, monkeypatch):
    """Nothing pruned the registry: every fit added a version, and the old ones kept what they
    had learned of the users erased since."""
    registry = ModelRegistry(tmp_path / "m")
    for _ in range(3):
        _register_stand_in(registry)

    def fit(retrainer, events, base):
        _register_stand_in(retrainer.registry)
        return True, True

    _fake_kafka(monkeypatch, FakeConsumer)
    monkeypatch.setattr(retrain_cli, "_fit", fit)
    runner = CliRunner()
    result = runner.invoke(_cli("retrain"), ["retrain", "--once", "--keep", "2", "--model-dir", str(registry.root),
                                             "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert registry.versions() == ["v0003", "v0004"] and registry.pointed() == "v0004"  # and no traceback
    result = runner.invoke(_cli("retrain"), ["retrain", "--once", "--keep", "1", "--model-dir", str(registry.root),
                                             "--device", "cpu"])
    assert result.exit_code == 0 and registry.versions() == ["v0005"], result.output
    for bad in ("0", "-3", "two"):
        refused = runner.invoke(_cli("retrain"), ["retrain", "--once", "--keep", bad, "--model-dir", str(registry.root)],
                                env={"COLUMNS": "500"})
        assert refused.exit_code == 2 and "--keep" in refused.output and "Traceback" not in refused.output, refused.output
    assert registry.versions() == ["v0005"]
    help_text = runner.invoke(_cli("retrain"), ["retrain", "--help"], env={"COLUMNS": "500"}).output
    assert "--keep" in help_text and "at most VERSIONS-1 of them" in help_text, help_text


def test_retrain_reads_a_partition_added_to_a_topic_while_it_runs_from_its_oldest_record(tmp_path, monkeypatch):
    """The partitions were assigned once, at start: a partition added to the clicks topic
    afterwards was never read, and its users' events never entered a fit."""
    added = TopicPartition(TopicNames().clicks, 1)
    click = SimpleNamespace(value=encode(ClickEvent(event_id="e1", user_id="u1", item_id="i1",
                                                    ts=time.time_ns() // 1_000_000 - 60_000)))
    fits, sought = [], []

    class Consumer(FakeConsumer):  # one partition of each topic, empty; then a second clicks partition, one click
        def __init__(self, **kw):
            super().__init__()
            self.started, self.assigned, self.read = False, [], set()

        def partitions_for_topic(self, topic):
            return {0, 1} if self.started and topic == added.topic else {0}

        def assign(self, partitions):
            self.assigned = list(partitions)

        def seek_to_beginning(self, *partitions):
            sought.extend(partitions)

        def end_offsets(self, partitions):
            self.started = True  # the metadata shows the new partition from now on
            return {tp: int(tp == added) for tp in partitions}

        def poll(self, timeout_ms, max_records):
            if added in self.assigned and added not in self.read:
                self.read.add(added)
                return {added: [click]}
            return {}

        def position(self, tp):
            return int(tp in self.read)

    def fit(retrainer, events, base):
        fits.append([(x.user_id, x.item_id) for x in events.interactions()])
        return True, True

    _fake_kafka(monkeypatch, Consumer)
    monkeypatch.setattr(retrain_cli, "_fit", fit)
    result = CliRunner().invoke(_cli("retrain"), ["retrain", "--once", "--model-dir", str(tmp_path / "m"),
                                                  "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert added in sought and fits == [[("u1", "i1")]], (sought, fits)


def _older_and_all(n_users: int = 80) -> tuple[list, list]:
    """A log's older two thirds (a first fit's) and the whole of it: most users have events newer
    than the first fit's data, which the gate compares on."""
    log = list(synthetic_interactions(n_events=12 * n_users, n_users=n_users, n_items=80, seed=1))
    cut = sorted(x.ts for x in log)[len(log) * 2 // 3]
    return [x for x in log if x.ts <= cut], log


def _garbled_items(sequences, *args, **kw):
    """``train`` after a bug that garbles every item id: a fit that knows none of the items it
    is judged on, which the gate must hold back. (A bug that shifted the item table by seven
    rows cost only 3 of 72 held-out hits on this log, 9 events to 6: within chance, and it
    passes now. The synthetic users repeat items, which any model's residual path still ranks.)"""
    return training.train({user: [f"garbled-{item}" for item in items] for user, items in sequences.items()},
                          *args, **kw)


def test_a_fit_worse_than_current_on_the_same_held_out_events_is_registered_but_not_made_current(tmp_path,
                                                                                                  monkeypatch):
    """Every fit that passed its parity check became CURRENT: a bad one (here: a bug that garbles
    every item id before the training) was served by every worker at once. The gate
    scores both on held-out events newer than CURRENT's data and keeps CURRENT; both figures are
    in the new version's manifest."""
    registry = ModelRegistry(tmp_path)
    older, log = _older_and_all()
    arch = {"dim": 16, "n_heads": 2, "max_len": 8}
    good, metrics = Retrainer(registry, arch, QUICK, gate_tolerance=0.01).fit(older)
    assert "gate" not in metrics and "gate" not in registry.manifest(good)  # the first model: no gate
    assert registry.manifest(good)["data"]["trained_through"] == max(x.ts for x in older)

    monkeypatch.setattr(retraining, "train", _garbled_items)
    bad, metrics = Retrainer(registry, arch, QUICK, gate_tolerance=0.01).fit(log)
    gate = registry.manifest(bad)["gate"]
    assert registry.pointed() == good != bad and metrics["gate"] == gate
    assert gate["current"] == good and gate["passed"] is False and gate["held_out"] >= retraining.MIN_GATE_EVENTS
    assert gate["new_hr@10"] < gate["current_hr@10"] - 0.01, gate
    assert gate["p_value"] < retraining.GATE_SIGNIFICANCE and gate["current_only"] > gate["new_only"], gate
    lenient, _ = Retrainer(registry, arch, QUICK, gate_tolerance=1.0).fit(log)
    assert registry.pointed() == lenient and registry.manifest(lenient)["gate"]["passed"] is True


def _ranks_hitting(hits: list[bool]):
    """A stand-in for a model's ranks of the held-out events: 1 (a hit) or 0 (a miss), in order."""
    def ranks(*args, **kw):
        return [1 if h else 0 for h in hits]
    return ranks


@pytest.mark.parametrize(("current_only", "new_only", "both", "passed"), [
    (5, 2, 25, True),    # CURRENT 0.05 ahead on 60 events, by 5 events to 2: p = 0.23, chance
    (12, 0, 20, False),  # 0.20 ahead, every event that tells them apart: p = 0.0002, held back
])
def test_the_gate_holds_a_fit_back_only_when_current_s_lead_is_more_than_chance(tmp_path, monkeypatch, current_only,
                                                                                new_only, both, passed):
    """HR@10 over a few hundred held-out events moves in steps of several thousandths: a fit that
    trailed CURRENT by a handful of events (more than the 0.01 tolerance) was held back, newer
    items and erasures with it. Now CURRENT's lead must also beat chance on the events exactly one
    model hits (a one-sided sign test); the counts and the p-value are in the record."""
    registry = ModelRegistry(tmp_path)
    older, log = _older_and_all()
    arch = {"dim": 16, "n_heads": 2, "max_len": 8}
    first, _ = Retrainer(registry, arch, QUICK, gate_tolerance=0.01).fit(older)
    held = len(retraining.hold_out_newer(log, max(x.ts for x in older), seed=QUICK.seed)[1])
    assert held >= max(retraining.MIN_GATE_EVENTS, current_only + new_only + both)
    rest = held - current_only - new_only - both
    current = [True] * current_only + [False] * new_only + [True] * both + [False] * rest
    new = [False] * current_only + [True] * new_only + [True] * both + [False] * rest
    monkeypatch.setattr(retraining, "scorer_ranks", _ranks_hitting(current))
    monkeypatch.setattr(retraining, "model_ranks", _ranks_hitting(new))
    fit, metrics = Retrainer(registry, arch, QUICK, gate_tolerance=0.01).fit(log)
    gate = metrics["gate"]
    assert gate["current_hr@10"] - gate["new_hr@10"] == pytest.approx((current_only - new_only) / held)
    assert gate["current_hr@10"] - gate["new_hr@10"] > 0.01
    assert (gate["current_only"], gate["new_only"]) == (current_only, new_only)
    assert gate["p_value"] == pytest.approx(retraining.paired_p_value(current_only, new_only))
    assert gate["passed"] is passed and (registry.pointed() == fit) is passed, gate


def test_the_gate_compares_on_events_newer_than_current_s_data_which_the_fit_sets_aside(tmp_path, monkeypatch):
    """The gate scored CURRENT on the fit's own validation users' last items, which CURRENT had
    mostly trained on: it won by memory (YooChoose: 0.735 against 0.627) and held back a fit on a
    day more data. Now the held-out events are each sampled user's last one newer than CURRENT's
    data, and the fit does not train on them either."""
    registry = ModelRegistry(tmp_path)
    older, log = _older_and_all()
    arch = {"dim": 16, "n_heads": 2, "max_len": 8}
    Retrainer(registry, arch, QUICK).fit(older)
    fitted = []

    def recording(sequences, *args, **kw):
        fitted.append(sequences)
        return training.train(sequences, *args, **kw)

    monkeypatch.setattr(retraining, "train", recording)
    _, metrics = Retrainer(registry, arch, QUICK, gate_tolerance=0.01).fit(log)
    cut = max(x.ts for x in older)
    newer_users = {u for u, xs in retraining.sequences_by_user(log).items() if len(xs) >= 3 and xs[-1].ts > cut}
    assert metrics["gate"]["held_out"] == len(newer_users) >= retraining.MIN_GATE_EVENTS, metrics["gate"]
    [sequences] = fitted
    for user in newer_users:  # each one's last event was set aside from the fit
        assert sequences[user] == [x.item_id for x in retraining.sequences_by_user(log)[user][:-1]]


def _a_day_ahead(users: int, first_ts: int | None = None) -> list:
    """Three clicks each of ``users`` users, dated a day ahead of the clock (a producer's clock
    ahead, a log dated in the future: ``--dataset`` is not checked against the clock)."""
    ts = first_ts if first_ts is not None else time.time_ns() // 1_000_000 + 86_400_000
    return [Interaction(f"ahead-{u}", f"i{n}", ts + n) for u in range(users) for n in range(3)]


def test_one_event_dated_a_day_ahead_leaves_the_next_gate_its_events(tmp_path):
    """data.trained_through was the newest ts of all: one event dated a day ahead put it a day
    ahead, and the next gates found no event newer than it ("only 0 held-out event(s)"): every
    fit went through unjudged until that day came. It is the newest ts not ahead of the fit's
    clock now."""
    registry = ModelRegistry(tmp_path)
    older, log = _older_and_all()
    arch = {"dim": 16, "n_heads": 2, "max_len": 8}
    skewed = _a_day_ahead(1)[-1:]
    first, _ = Retrainer(registry, arch, QUICK, gate_tolerance=0.01).fit(older + skewed)
    assert registry.manifest(first)["data"]["trained_through"] == max(x.ts for x in older)
    _, metrics = Retrainer(registry, arch, QUICK, gate_tolerance=0.01).fit(log + skewed)
    gate = metrics["gate"]
    assert "undecided" not in gate and gate["held_out"] >= retraining.MIN_GATE_EVENTS, gate
    assert gate["current"] == first and gate["current_hr@10"] is not None, gate


def test_events_dated_ahead_of_the_fits_clock_are_trained_on_never_held_out(tmp_path, monkeypatch):
    """A user whose last event is dated ahead of the fit's clock is not held out (an earlier fit
    may have trained on it: its trained_through leaves such events out), and the fit trains on
    it; a clock injected: at a moment between CURRENT's data and the newest events."""
    registry = ModelRegistry(tmp_path)
    older, log = _older_and_all()
    arch = {"dim": 16, "n_heads": 2, "max_len": 8}
    first, _ = Retrainer(registry, arch, QUICK).fit(older)
    fitted = []

    def recording(sequences, *args, **kw):
        fitted.append(sequences)
        return training.train(sequences, *args, **kw)

    monkeypatch.setattr(retraining, "train", recording)
    cut = max(x.ts for x in older)
    ahead = _a_day_ahead(60)
    version, metrics = Retrainer(registry, arch, QUICK, gate_tolerance=0.01).fit(log + ahead)
    by_user = retraining.sequences_by_user(log)
    newer = {u for u, xs in by_user.items() if len(xs) >= 3 and xs[-1].ts > cut}
    assert metrics["gate"]["held_out"] == len(newer) >= retraining.MIN_GATE_EVENTS, metrics["gate"]
    assert all(fitted[0][f"ahead-{u}"] == ["i0", "i1", "i2"] for u in range(60))  # trained on, whole
    through = registry.manifest(version)["data"]["trained_through"]
    assert cut < through < min(x.ts for x in ahead), through

    registry.set_current(first)
    now = (cut + max(x.ts for x in log)) // 2  # a clock between CURRENT's data and the newest events
    fitted.clear()
    _, metrics = Retrainer(registry, arch, QUICK, gate_tolerance=1.0, clock=lambda: now).fit(log)
    by_ts = {u for u in newer if by_user[u][-1].ts <= now}
    assert 0 < len(by_ts) < len(newer) and metrics["gate"]["held_out"] == len(by_ts), metrics["gate"]
    assert all(fitted[0][u][-1] == by_user[u][-1].item_id for u in newer - by_ts)


def test_trained_through_is_the_newest_event_the_fit_trained_on_not_one_it_set_aside(tmp_path):
    """data.trained_through counted the held-out events the fit had set aside for the gate:
    the next gate never compared on them, though the version it judged had not trained on them."""
    registry = ModelRegistry(tmp_path)
    older, log = _older_and_all()
    arch = {"dim": 16, "n_heads": 2, "max_len": 8}
    Retrainer(registry, arch, QUICK).fit(older)
    second, metrics = Retrainer(registry, arch, QUICK, gate_tolerance=1.0).fit(log)
    fit_on, held = retraining.hold_out_newer(log, max(x.ts for x in older), seed=QUICK.seed)
    through = registry.manifest(second)["data"]["trained_through"]
    assert metrics["gate"]["held_out"] == len(held) and registry.pointed() == second
    assert through == max(x.ts for x in fit_on) < max(x.ts for x in log), through  # the newest event was set aside
    _, metrics = Retrainer(registry, arch, QUICK, gate_tolerance=1.0).fit(log)
    newer = {u for u, xs in retraining.sequences_by_user(log).items() if len(xs) >= 3 and xs[-1].ts > through}
    assert metrics["gate"]["held_out"] == len(newer) > 0, metrics["gate"]  # what the served version never saw


def test_the_gate_lets_a_fit_through_where_nothing_fair_can_be_compared(tmp_path):
    """On the very events CURRENT was fitted on (none newer), or under a CURRENT that does not say
    what it was fitted on (a version of an older streamrec train or retrain), the gate has nothing fair to compare on:
    the fit passes, and its record says why."""
    registry = ModelRegistry(tmp_path)
    older, _ = _older_and_all()
    arch = {"dim": 16, "n_heads": 2, "max_len": 8}
    Retrainer(registry, arch, QUICK).fit(older)
    again, metrics = Retrainer(registry, arch, QUICK, gate_tolerance=0.0).fit(older)
    gate = metrics["gate"]
    assert registry.pointed() == again and gate["passed"] and gate["current_hr@10"] is None
    assert gate["held_out"] == 0 and "only 0 held-out event(s) newer" in gate["undecided"], gate
    register_tiny(registry.root)  # a version whose manifest has no data.trained_through
    _, metrics = Retrainer(registry, arch, QUICK, gate_tolerance=0.0).fit(older)
    assert metrics["gate"]["passed"] and "does not say which events" in metrics["gate"]["undecided"], metrics["gate"]


def test_a_version_of_streamrec_train_says_what_it_was_fitted_on_so_the_next_gate_compares(tmp_path, monkeypatch):
    """streamrec train registered no data.trained_through: the first retrain gate after an
    operator's train was undecided ("does not say which events"), whatever the fit. It records
    the newest event it trained on, and the gate compares on the events after it; not one dated
    ahead of the clock (the log has a session dated a day ahead), after which there were none."""
    older, log = _older_and_all()
    otto = {"click": "clicks", "purchase": "orders"}
    dataset = tmp_path / "older.jsonl"  # one OTTO session a user: ts in milliseconds, as the events'
    dataset.write_bytes(b"\n".join(
        msgspec.json.encode({"session": user, "events": [{"aid": x.item_id, "ts": x.ts, "type": otto[x.kind]}
                                                         for x in xs]})
        for user, xs in retraining.sequences_by_user(older + _a_day_ahead(1)).items()))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the command's setting would outlive the test
    models = tmp_path / "models"
    result = CliRunner().invoke(_cli("train"), ["train", "--dataset", str(dataset), "--format", "otto", "--epochs", "1",
                                                "--dim", "16", "--max-len", "8", "--device", "cpu", "--serve-device",
                                                "cpu", "--no-progress", "--model-dir", str(models)],
                                env={"COLUMNS": "500"})
    assert result.exit_code == 0, result.output
    registry = ModelRegistry(models)
    trained = registry.pointed()
    assert registry.manifest(trained)["data"]["trained_through"] == max(x.ts for x in older)
    _, metrics = Retrainer(registry, architecture_of(registry), QUICK, gate_tolerance=1.0).fit(log)
    gate = metrics["gate"]
    assert "undecided" not in gate and gate["current"] == trained, gate
    assert gate["held_out"] >= retraining.MIN_GATE_EVENTS and gate["current_hr@10"] is not None, gate


def test_the_gate_counts_an_item_the_current_vocabulary_lacks_as_a_miss(tmp_path):
    """On a shifted stream (items CURRENT never saw) CURRENT cannot rank the held-out items: the fit replaces it."""
    registry = ModelRegistry(tmp_path)
    arch = {"dim": 16, "n_heads": 2, "max_len": 8}
    old_items = list(synthetic_interactions(n_events=600, n_users=60, n_items=40, seed=1))
    old, _ = Retrainer(registry, arch, QUICK).fit(old_items)
    # the shifted stream comes after CURRENT's data (and not after the clock: such events are never held out)
    later = max(x.ts for x in old_items) - min(x.ts for x in old_items) + 1
    shifted = [msgspec.structs.replace(x, item_id="new-" + x.item_id, ts=x.ts + later) for x in old_items]
    new, metrics = Retrainer(registry, arch, QUICK, gate_tolerance=0.0).fit(shifted)
    assert metrics["gate"]["current_hr@10"] == 0.0 and metrics["gate"]["passed"] and registry.pointed() == new != old


def test_scorer_rank_metrics_ranks_among_every_item_of_the_models_own_vocabulary():
    class Scorer:  # an exported model whose scores favour "a", then "b"
        vocab, max_len = Vocab(["a", "b", "c"]), 4

        def run_ids(self, seq, cand):
            return np.broadcast_to(np.array([9.0, 9.0, 3.0, 2.0, 1.0], np.float32), cand.shape)

    valid = [(["c"], "a"), (["c"], "zzz"), (["a", "b"], "c")]  # a hit, an item it lacks, rank 3
    assert scorer_rank_metrics(Scorer(), valid, k=2)["hr@2"] == 1 / 3
    assert scorer_rank_metrics(Scorer(), valid, k=3)["hr@3"] == 2 / 3


def test_retrain_gates_by_default_and_refuses_a_tolerance_that_is_no_share(tmp_path, monkeypatch):
    made = []

    class Recorder(retraining.Retrainer):
        def __init__(self, *args, **kw):
            made.append(kw.get("gate_tolerance", "missing"))
            super().__init__(*args, **kw)

    _fake_kafka(monkeypatch, FakeConsumer)
    monkeypatch.setattr(retraining, "Retrainer", Recorder)
    runner = CliRunner()
    for args in ([], ["--gate-tolerance", "0.2"], ["--no-gate"]):
        result = runner.invoke(_cli("retrain"), ["retrain", "--once", "--model-dir", str(tmp_path / "m"),
                                                 "--device", "cpu", *args])
        assert result.exit_code == 1, result.output  # nothing to train on
    assert made == [0.01, 0.2, None]
    for bad in ("-0.1", "1.5", "nan", "inf", "x"):
        refused = runner.invoke(_cli("retrain"), ["retrain", "--once", "--gate-tolerance", bad,
                                                  "--model-dir", str(tmp_path / "m")], env={"COLUMNS": "500"})
        text = " ".join(refused.output.split())
        assert refused.exit_code == 2 and "Invalid value for --gate-tolerance" in text.replace("'", ""), text
    assert len(made) == 3
    help_text = " ".join(runner.invoke(_cli("retrain"), ["retrain", "--help"], env={"COLUMNS": "500"}).output.split())
    assert "--gate-tolerance" in help_text and "--no-gate" in help_text and "held-out" in help_text, help_text


def test_a_fit_the_gate_holds_back_is_logged_once_with_both_figures_and_counts_as_no_new_current(tmp_path, monkeypatch,
                                                                                                 caplog):
    registry = ModelRegistry(tmp_path / "m")
    gate = {"metric": "hr@10", "held_out": 40, "tolerance": 0.01, "current": "v0001", "current_hr@10": 0.45,
            "new_hr@10": 0.125, "passed": False, "current_only": 14, "new_only": 1, "p_value": 0.00049}

    class Held:
        def __init__(self):
            self.registry = registry

        def fit(self, interactions, data, overrule=None):
            return "v0002", {"val_hr@10": 0.125, "best_epoch": 1, "gate": gate}

    window = retrain_cli.EventWindow()
    with caplog.at_level("INFO", logger="streamrec.retrain"):
        assert retrain_cli._fit(Held(), window, []) == (True, False)
    held = [r.getMessage() for r in caplog.records if "gate" in r.getMessage()]
    assert len(held) == 1 and "0.1250" in held[0] and "0.4500" in held[0] and "v0001 keeps serving" in held[0], held
    assert "14 event(s) only v0001 hit, 1 only the fit" in held[0] and "p = 0.00049" in held[0], held
    assert f"echo v0002 > {registry.root / 'CURRENT'}" in held[0] and "--no-gate" in held[0], held

    pruned = []
    _fake_kafka(monkeypatch, FakeConsumer)
    monkeypatch.setattr(retrain_cli, "_fit", lambda retrainer, events, base: (True, False))
    monkeypatch.setattr(retrain_cli, "_prune", lambda registry, keep: pruned.append(keep))
    result = CliRunner().invoke(_cli("retrain"), ["retrain", "--once", "--keep", "3", "--model-dir", str(registry.root),
                                                  "--device", "cpu"])
    assert result.exit_code == 1 and pruned == [3], result.output  # registered (pruned after), but not served


def test_a_fit_that_honours_an_erasure_current_does_not_replaces_it_whatever_the_gate_says(tmp_path, monkeypatch,
                                                                                            caplog):
    """With the gate, CURRENT could stay a version fitted before a forget request for as long as
    fits were held back, serving the erased user's events. A fit after a request that CURRENT's
    manifest does not cover (``data.erased_through``) now replaces it; the next one is gated again."""
    registry = ModelRegistry(tmp_path)
    older, log = _older_and_all()
    arch = {"dim": 16, "n_heads": 2, "max_len": 8}
    good, _ = Retrainer(registry, arch, QUICK).fit(older, {"erased_through": 100})
    monkeypatch.setattr(retraining, "train", _garbled_items)  # a fit the gate holds back
    retrainer = Retrainer(registry, arch, QUICK, gate_tolerance=0.01)
    window = retrain_cli.EventWindow()
    window.add_forget(encode(ForgetRequest(user_id="nobody", request_id="r1", ts=200)))
    with caplog.at_level("INFO", logger="streamrec.retrain"):
        assert retrain_cli._fit(retrainer, window, log) == (True, True)
    erasing = registry.pointed()
    manifest = registry.manifest(erasing)
    assert erasing != good and manifest["data"]["erased_through"] == 200 and not manifest["gate"]["passed"]
    assert good in manifest["gate"]["overruled"], manifest["gate"]
    [line] = [r.getMessage() for r in caplog.records if "would have been held back" in r.getMessage()]
    assert "honours the erasures" in line and erasing in line, line
    retrain_cli._fit(retrainer, window, log)  # nothing new to erase: gated (nothing newer than its data: it passes)
    assert "overruled" not in registry.manifest(registry.versions()[-1])["gate"]
