"""Item id <-> embedding row mapping, saved next to each exported model as ``vocab.json``.

Row 0 is padding, row 1 is the **out-of-vocabulary row** and known items take rows 2...
The OOV row stands for "some rare item": at training time every item seen fewer than
``min_count`` times is mapped to it (inputs and targets), so it is trained like any item;
when no item fell under ``min_count`` (the default, 1), training sets it to the mean
embedding of the rarest 20% of the vocabulary. At serving time an item the model never saw (a new product, a rare one)
scores through that row: it gets a finite, usually modest score instead of a crash, and
the online models (which learn new items within seconds) carry it until the next training.
Unknown items in a user's history are kept as OOV tokens, so the sequence keeps its shape.

>>> v = Vocab.build(["a", "b", "a", "c", "a", "b"], min_count=2)
>>> v.rows(["a", "b", "c", "never-seen"])
[2, 3, 1, 1]
>>> len(v), v.item(2), "c" in v
(4, 'a', False)
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

PAD_ROW = 0
OOV_ROW = 1
FIRST_ITEM_ROW = 2
_FORMAT = "streamrec-vocab/1"


class Vocab:
    """Immutable mapping; ``len(vocab)`` is the number of embedding rows (with PAD and OOV)."""

    __slots__ = ("_items", "_rows")

    def __init__(self, items: Sequence[str]) -> None:
        self._items: tuple[str, ...] = tuple(items)
        if not all(type(it) is str for it in self._items):  # ids are text: a number would never match one
            raise ValueError("vocabulary items must be item ids (strings)")
        self._rows: dict[str, int] = {it: FIRST_ITEM_ROW + i for i, it in enumerate(self._items)}
        if len(self._rows) != len(self._items):
            raise ValueError("vocabulary items must be unique")

    @classmethod
    def build(cls, items: Iterable[str], min_count: int = 1) -> Vocab:
        """Items seen at least ``min_count`` times, most frequent first (ties by id: deterministic)."""
        counts = Counter(items)
        kept = [it for it, n in counts.items() if n >= min_count]
        kept.sort(key=lambda it: (-counts[it], it))
        return cls(kept)

    def __len__(self) -> int:
        return FIRST_ITEM_ROW + len(self._items)

    def __contains__(self, item: object) -> bool:
        return item in self._rows

    @property
    def items(self) -> tuple[str, ...]:
        return self._items

    def row(self, item: str) -> int:
        return self._rows.get(item, OOV_ROW)

    def rows(self, items: Iterable[str]) -> list[int]:
        get = self._rows.get
        return [get(it, OOV_ROW) for it in items]

    def item(self, row: int) -> str:
        if row < FIRST_ITEM_ROW:
            raise KeyError(f"row {row} is {'padding' if row == PAD_ROW else 'the OOV row'}, not an item")
        return self._items[row - FIRST_ITEM_ROW]

    def to_json(self) -> dict:
        return {"format": _FORMAT, "pad_row": PAD_ROW, "oov_row": OOV_ROW, "items": list(self._items)}

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json()), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            seen = data.get("format") if isinstance(data, dict) else f"a JSON {type(data).__name__}, not an object"
            raise ValueError(f"{path}: not a streamrec vocabulary (format {seen!r})")
        if not isinstance(data.get("items"), list) or not all(isinstance(item, str) for item in data["items"]):
            raise ValueError(f"{path}: not a streamrec vocabulary (its items are not a list of item ids)")
        return cls(data["items"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self._items == other._items

    def __hash__(self) -> int:
        return hash(self._items)

    def __repr__(self) -> str:
        return f"Vocab({len(self._items)} items + PAD + OOV)"


__all__ = ["FIRST_ITEM_ROW", "OOV_ROW", "PAD_ROW", "Vocab"]
