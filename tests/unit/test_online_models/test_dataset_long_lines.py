"""A log with a line past MAX_LINE_CHARS (``-d /dev/zero``, a binary file) is refused by file and
line, without the whole line in memory: it was read whole, into a MemoryError under a memory limit."""

import json
import tracemalloc

import pytest

from online_models.datasets import DatasetError, read_interactions, read_otto
from stream.errors import StreamrecError
from stream.produce_catalogue import read_catalogue_file

MAX_LINE_CHARS = 1 << 20  # the bound: 1 MiB of characters

FORMATS = ("taobao", "yoochoose", "otto")


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_file_without_line_breaks_is_refused_reading_one_bounded_line(tmp_path, fmt):
    path = tmp_path / "zeros.log"
    size = 8 * MAX_LINE_CHARS
    with path.open("wb") as fh:  # 8 MiB of NUL, as -d /dev/zero reads, with no line break
        fh.truncate(size)
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match=rf"^{path}:1: a line longer than 1 MiB") as caught:
            list(read_interactions(path, fmt, limit=10))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < size / 2, f"{peak:,} bytes traced while refusing {caught.value}: the file was read whole"


def test_the_long_line_is_named_by_its_number(tmp_path):
    path = tmp_path / "sessions.jsonl"
    good = json.dumps({"session": 1, "events": [{"aid": 2, "ts": 3, "type": "clicks"}]})
    path.write_text(f"{good}\n{good}\n{'x' * (MAX_LINE_CHARS + 1)}\n{good}\n", encoding="utf-8")
    read = read_otto(path)
    assert [x.item_id for x in (next(read), next(read))] == ["2", "2"]
    with pytest.raises(DatasetError, match=rf"^{path}:3: a line longer than 1 MiB"):
        next(read)


def test_a_line_of_exactly_the_bound_is_read(tmp_path):
    path = tmp_path / "sessions.jsonl"
    line = json.dumps({"session": 1, "events": [{"aid": 2, "ts": 3, "type": "orders"}]})
    line += " " * (MAX_LINE_CHARS - len(line))
    path.write_text(f"{line}\r\n", encoding="utf-8")
    assert [(x.item_id, x.kind) for x in read_otto(path)] == [("2", "purchase")]


def test_a_catalogue_without_line_breaks_is_refused_by_file_and_line(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text('{"item_id": "i1", "title": "Down jacket"}\n' + "\0" * (MAX_LINE_CHARS + 1), encoding="utf-8")
    with pytest.raises(StreamrecError, match=rf"^{path}:2: a line longer than 1 MiB .*: not a JSON Lines catalogue$"):
        read_catalogue_file(path, now_ms=5)
