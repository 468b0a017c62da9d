"""``streamrec produce --catalogue FILE``: send a catalogue as ItemEvents, keyed by item id.

The file is JSON Lines, one ItemEvent per line (docs/events.md), in UTF-8; ``ts`` may be left
out (each item is then stamped with the time it is sent). Every line passes the worker's door
(:func:`stream.decoding.decode_item`) before anything is sent, so a bad file is refused whole,
with the line number and the reason, rather than dead-lettered item by item:

>>> items = read_catalogue(['{"item_id": "i1", "title": "Down jacket"}', ''], now_ms=5)
>>> [(i.item_id, i.ts) for i in items]
[('i1', 5)]
>>> read_catalogue(['{"item_id": "i1"}'], now_ms=5)
Traceback (most recent call last):
...
stream.errors.StreamrecError: catalogue line 1: field `title` is missing (required)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from pathlib import Path

from aiokafka import AIOKafkaProducer

from online_models.datasets import DatasetError, bounded_lines
from online_models.search.synthetic import synthetic_catalogue
from stream.decoding import decode_item
from stream.errors import InvalidEvent, StreamrecError
from stream.records import DEFAULT_BOUNDS, Bounds, ItemEvent, encode


def read_catalogue(lines: Iterable[str], now_ms: int, bounds: Bounds = DEFAULT_BOUNDS) -> list[ItemEvent]:
    """The ItemEvents of JSON Lines ``lines`` (blank lines skipped; a missing ``ts`` is ``now_ms``),
    each within ``bounds`` (the workers' settings: a price over STREAMREC_MAX_PRICE is refused
    here as every worker would dead-letter it)."""
    items: list[ItemEvent] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise StreamrecError(f"catalogue line {number}: not JSON ({exc})") from None
        except RecursionError:
            raise StreamrecError(f"catalogue line {number}: nested too deeply") from None
        if isinstance(value, dict) and "ts" not in value:
            value["ts"] = now_ms
        try:
            items.append(decode_item(json.dumps(value, ensure_ascii=False).encode(), bounds))
        except InvalidEvent as exc:
            raise StreamrecError(f"catalogue line {number}: {exc.reason}") from None
        except UnicodeEncodeError:  # json.loads reads an escape such as \ud800 as half a character
            raise StreamrecError(f"catalogue line {number}: a string holds a lone surrogate escape (\\ud800 to "
                                 f"\\udfff without its pair), which is not a character") from None
    return items


def read_catalogue_file(path: Path, now_ms: int, bounds: Bounds = DEFAULT_BOUNDS) -> list[ItemEvent]:
    try:
        with open(path, encoding="utf-8") as f:  # a line at a time, each bounded: /dev/zero was a MemoryError
            return read_catalogue(bounded_lines(f, path, what="a JSON Lines catalogue"), now_ms, bounds)
    except DatasetError as exc:  # "FILE:N: a line longer than 1 MiB ..."
        raise StreamrecError(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise StreamrecError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except StreamrecError as exc:  # "catalogue line N: ...": which file, where several are given
        raise StreamrecError(f"{path}: {exc}") from None


def synthetic_items(seed: int, now_ms: int) -> list[ItemEvent]:
    """The synthetic shop's catalogue (online_models/search/synthetic.py) as ItemEvents."""
    return [ItemEvent(item_id=i.item_id, title=i.title, ts=now_ms, category_path=list(i.category_path), price=i.price)
            for i in synthetic_catalogue(seed=seed)]


async def send_catalogue(items: list[ItemEvent], producer: AIOKafkaProducer, topic: str) -> int:
    """Send ``items`` to ``topic`` keyed by item id with a started ``producer`` (the latest
    value per item wins once the topic is compacted); returns how many were acknowledged."""
    futures = [await producer.send(topic, key=item.item_id.encode(), value=encode(item)) for item in items]
    await asyncio.gather(*futures)
    return len(items)


__all__ = ["read_catalogue", "read_catalogue_file", "send_catalogue", "synthetic_items"]
