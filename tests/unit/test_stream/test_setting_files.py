"""Files that settings name (STREAMREC_VARIANTS, STREAMREC_QUERY_STUDENT) are read only where
they are files: a device (``/dev/zero``) was read for ever at start, the process's memory growing
by hundreds of MB a second, and a file far too big for an experiment was read whole. And
STREAMREC_MODEL_DIR that cannot be looked at is said with the setting's name."""

from __future__ import annotations

import os
import threading
import time

import pytest

import stream.errors
from stream.app import check_model_dir
from stream.errors import ConfigError
from stream.experiments import load_experiment
from stream.settings import Settings
from stream.shell import query_student

MAX_EXPERIMENT_BYTES = 1 << 20  # stream.experiments.MAX_EXPERIMENT_BYTES
DEVICE = "/dev/null"  # a character device that ends (/dev/zero, which does not, is refused the same way)


@pytest.mark.skipif(not os.path.exists(DEVICE), reason="no /dev/null")
def test_an_experiment_file_that_is_a_device_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"^STREAMREC_VARIANTS='/dev/null': cannot be the experiment file: a character "
                                          r"device, not a file$"):
        load_experiment(DEVICE)


@pytest.mark.skipif(not os.path.exists(DEVICE), reason="no /dev/null")
def test_a_query_student_that_is_a_device_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"^STREAMREC_QUERY_STUDENT=/dev/null: cannot read a query student there "
                                          r"\(a character device, not a file\)"):
        query_student(Settings.from_env({"STREAMREC_QUERY_STUDENT": DEVICE}))


def test_an_experiment_file_past_its_limit_is_not_read_whole(tmp_path):
    big = tmp_path / "arms.toml"
    with open(big, "wb") as f:
        f.truncate(MAX_EXPERIMENT_BYTES + 1)  # sparse: no disk
    with pytest.raises(ConfigError, match=f"cannot be the experiment file: more than {MAX_EXPERIMENT_BYTES:,} bytes"):
        load_experiment(big)


def test_a_pipe_is_read_as_a_shell_hands_one_over():
    read, write = os.pipe()  # what <(cat arms.toml) names
    os.write(write, b"arms = [")
    os.close(write)
    try:
        with pytest.raises(ConfigError, match="not valid TOML"):  # read, then parsed
            load_experiment(f"/dev/fd/{read}")
    finally:
        os.close(read)


def test_a_named_pipe_nothing_writes_to_is_refused_after_a_while_not_waited_on_for_ever(tmp_path, monkeypatch):
    # opening one blocks until a writer opens it: the worker sat at its start, silent, for ever
    monkeypatch.setattr(stream.errors, "PIPE_QUIET_S", 0.3)
    fifo = tmp_path / "arms.toml"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"cannot be the experiment file: a pipe: nothing came from it in 0\.3 s "
                                          r"\(is a program writing to it\?\)$"):
        load_experiment(fifo)
    assert time.monotonic() - started < 10


def test_a_named_pipe_is_read_once_a_program_writes_it(tmp_path):
    fifo = tmp_path / "arms.toml"
    os.mkfifo(fifo)

    def writer() -> None:
        with open(fifo, "wb") as f:  # blocks until the reader has opened it
            f.write(b"name = 'x'\n")  # valid TOML alone
            f.flush()
            time.sleep(0.2)  # the rest comes later: read to the pipe's end, not to its first bytes
            f.write(b"arms = [")

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    with pytest.raises(ConfigError, match=r"not valid TOML: .* \(at end of document\)$"):  # both writes read, then parsed
        load_experiment(fifo)
    thread.join(5)


def test_a_model_dir_that_cannot_be_looked_at_is_said_with_the_setting_s_name(tmp_path):
    # a name past the file system's 255 bytes: Path.exists raises, and the worker and serve said
    # only the path (thousands of characters) and "file name too long", not which setting it was
    long = tmp_path / ("x" * 300)
    with pytest.raises(ConfigError, match=r"^STREAMREC_MODEL_DIR=.{1,210}: cannot be looked at: file name too long$"):
        check_model_dir(Settings.from_env({"STREAMREC_MODEL_DIR": str(long)}))


def test_a_model_dir_that_is_a_loop_of_links_is_said_not_taken_for_a_folder_to_make(tmp_path):
    # exists() answers False for a loop: the worker and serve started with "no model registered"
    # and looked there every 5 s for ever
    loop = tmp_path / "models"
    loop.symlink_to(loop)
    with pytest.raises(ConfigError, match=r"^STREAMREC_MODEL_DIR=.*models: cannot be looked at: too many levels of symbolic links"):
        check_model_dir(Settings.from_env({"STREAMREC_MODEL_DIR": str(loop)}))
