"""stream/errors.py's some_of: the one wording of a list a message cannot name whole (the peer
reader's log line of forget requests, forget's users to send again, tail's items)."""

from __future__ import annotations

from stream.errors import some_of


def test_names_the_first_few_and_counts_the_rest_in_parentheses():
    assert some_of(list("abcdefg"), 5) == "a, b, c, d, e (and 2 more)"
    assert some_of(["u 1", "u2", "u3"], 2, repr, " ") == "'u 1' 'u2' (and 1 more)"
    assert some_of([str(n) for n in range(12_345)], 2) == "0, 1 (and 12,343 more)"


def test_a_list_that_fits_is_named_whole_and_an_empty_one_is_empty():
    assert some_of(["a", "b"], 2) == "a, b"
    assert some_of([], 5) == ""


def test_writes_only_the_items_it_names():
    written: list[int] = []

    def text(n: int) -> str:
        written.append(n)
        return f"#{n}"

    assert some_of(range(100_000), 3, text) == "#0, #1, #2 (and 99,997 more)"
    assert written == [0, 1, 2]
