"""docs/events.md cannot rot: its examples are decoded, and its dead letters recomputed."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from online_models.search.text import MODEL_NAME
from stream.catalogue_dlq import embedding_failed
from stream.decoding import (
    decode_event,
    decode_forget,
    decode_impression,
    decode_item,
    decode_search,
)
from stream.errors import DEAD_LETTER_CODES, InvalidEvent
from stream.records import (
    MAX_EVENT_BYTES,
    decode_dead_letter,
    decode_recommendation,
)
from stream.tail import recommendation_line, tombstone_line

ROOT = Path(__file__).resolve().parents[3]
DOC = (ROOT / "docs" / "events.md").read_text()
BLOCKS = [json.loads(b) for b in re.findall(r"```json\n(.*?)\n```", DOC, re.S)]
SEARCHES = [b for b in BLOCKS if b.get("type") == "search"]
ITEMS = [b for b in BLOCKS if "title" in b]
EVENTS = [b for b in BLOCKS if "type" in b and "reason" not in b and b not in SEARCHES]
LETTERS = [b for b in BLOCKS if "reason" in b]
RECOMMENDATIONS = [b for b in BLOCKS if "items" in b]
FORGETS = [b for b in BLOCKS if "request_id" in b]
IMPRESSIONS = [b for b in BLOCKS if "item_ids" in b]
CODES = list(DEAD_LETTER_CODES)


def test_every_block_is_accounted_for():
    assert len(EVENTS) == 3 and len(RECOMMENDATIONS) == 1 and len(FORGETS) == 1 and len(IMPRESSIONS) == 1
    assert len(SEARCHES) == 1 and len(ITEMS) == 1
    assert len(BLOCKS) == (len(EVENTS) + len(LETTERS) + len(RECOMMENDATIONS) + len(FORGETS) + len(IMPRESSIONS)
                           + len(SEARCHES) + len(ITEMS))


def test_search_and_item_examples_decode():
    (search,) = SEARCHES
    (item,) = ITEMS
    assert decode_search(json.dumps(search, ensure_ascii=False).encode()).query == search["query"]
    assert decode_item(json.dumps(item).encode()).category_path == item["category_path"]


def test_impression_example_decodes_and_names_the_recommendations_list():
    (example,) = IMPRESSIONS
    (rec,) = RECOMMENDATIONS
    assert decode_impression(json.dumps(example).encode()).rec_id == rec["rec_id"]
    assert [letter["code"] for letter in LETTERS] == CODES  # one example per code, in the table's order


@pytest.mark.parametrize("example", EVENTS, ids=lambda e: e["event_id"])
def test_event_examples_are_valid(example):
    assert decode_event(json.dumps(example).encode()).type == example["type"]


@pytest.mark.parametrize("letter", LETTERS, ids=lambda d: d["code"])
def test_dead_letter_examples_are_what_the_decoder_says(letter):
    decode_dead_letter(json.dumps(letter).encode())
    if letter["code"] == "oversize":  # its raw value is cut short in the doc
        assert re.fullmatch(rf"the value is (\d+) bytes, over the {MAX_EVENT_BYTES}-byte limit; it was not parsed", letter["reason"])
        return
    raw = base64.b64decode(letter["raw"]) if letter["raw_encoding"] == "base64" else letter["raw"].encode()
    if letter["code"] == "processing_error":  # a valid event: its reason is the worker's (stream/pipeline.py)
        decode_event(raw)
        assert re.fullmatch(r"the event is valid, but .+ raised [A-Za-z]+Error: .+; the other events of its batch were applied",
                            letter["reason"])
        return
    if letter["code"] == "embedding_failed":  # a valid item: its reason is the catalogue feed's, which the example names
        item = decode_item(raw)
        error = re.search(r"raised RuntimeError: (.+?) \(the text model embeds other texts\)", letter["reason"]).group(1)
        problem = embedding_failed(item.item_id, RuntimeError(error), "worker-2:4711", MODEL_NAME)
        assert problem.reason == letter["reason"]
        return
    with pytest.raises(InvalidEvent) as info:
        decode_event(raw)
    assert (info.value.code, info.value.reason) == (letter["code"], letter["reason"])


def test_recommendation_example_and_its_tail_line():
    (example,) = RECOMMENDATIONS
    line = recommendation_line(decode_recommendation(json.dumps(example).encode()))
    assert f"```text\n{line}\n```" in DOC


def test_forget_example_and_its_tombstone_line():
    (example,) = FORGETS
    request = decode_forget(json.dumps(example).encode())
    assert f"```text\n{tombstone_line(request.user_id.encode())}\n```" in DOC


def test_schema_files_named_exist():
    for path in re.findall(r"`(stream/schemas/[a-z_]+\.json)`", DOC):
        assert (ROOT / path).is_file(), path
