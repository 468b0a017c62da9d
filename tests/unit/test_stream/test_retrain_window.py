"""`streamrec retrain`'s window reads the topics as the peers and replays do: the clock window
for a ``ts`` ahead (an erasure the workers refused for it must not erase here, an event they
refused must not be trained on), and a value whose decoding raises anything is skipped."""

from __future__ import annotations

from stream import retrain_cli
from stream.records import DEFAULT_BOUNDS, Bounds, ClickEvent, ForgetRequest, encode
from stream.retrain_cli import EventWindow

NOW = 1_700_000_000_000
AHEAD = NOW + 10 * DEFAULT_BOUNDS.max_future_ms


def click(n: int, user: str, ts: int) -> bytes:
    return encode(ClickEvent(event_id=f"e{n}", user_id=user, item_id=f"i{n}", ts=ts))


def test_a_ts_far_ahead_of_the_clock_is_refused_for_events_and_erasures():
    w = EventWindow(clock=lambda: NOW)
    w.add_event(click(1, "u1", NOW - 5))
    w.add_event(click(2, "u1", AHEAD))  # the workers dead-letter it (ts_out_of_window)
    w.add_forget(encode(ForgetRequest(user_id="u1", request_id="r1", ts=AHEAD)))  # refused by the workers too
    assert [x.item_id for x in w.interactions()] == ["i1"] and w.erased == {} and w.invalid == 2


def test_an_old_event_is_kept_whatever_the_age_limit():
    """Its age was the workers' to judge when it arrived (``Bounds.rereading``)."""
    w = EventWindow(bounds=Bounds(max_age_ms=60_000), clock=lambda: NOW)
    w.add_event(click(1, "u1", NOW - 86_400_000))
    assert len(w.events) == 1 and w.invalid == 0


def test_a_value_whose_decoding_raises_anything_is_skipped(monkeypatch):
    def buggy(*args):
        raise RecursionError("a decoder's bug")

    w = EventWindow(clock=lambda: NOW)
    monkeypatch.setattr(retrain_cli, "decode_event", buggy)
    monkeypatch.setattr(retrain_cli, "decode_forget", buggy)
    w.add_event(click(1, "u1", NOW))
    w.add_forget(encode(ForgetRequest(user_id="u1", request_id="r1", ts=NOW)))
    assert w.invalid == 2 and not w.events and not w.erased


def test_a_fit_the_registry_disk_refused_is_one_error_line_and_retrain_goes_on(caplog):
    """A full or read-only registry disk is the operator's to fix: one line each cycle, not a
    traceback (a bug in a fit still gets one)."""

    class Retrainer:
        def __init__(self, error):
            self.error = error

        def fit(self, interactions, data):
            raise self.error

    w = EventWindow(clock=lambda: NOW)
    w.add_event(click(1, "u1", NOW))
    with caplog.at_level("INFO", logger="streamrec.retrain"):
        assert retrain_cli._fit(Retrainer(OSError(28, "No space left on device")), w, []) == (False, False)
        assert retrain_cli._fit(Retrainer(RuntimeError("a bug")), w, []) == (False, False)
    disk, bug = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "No space left on device" in disk.getMessage() and disk.exc_info is None
    assert bug.exc_info is not None


def test_old_versions_the_registry_disk_would_not_delete_are_one_error_line_and_retrain_goes_on(caplog):
    class Registry:
        def prune(self, keep):
            raise PermissionError(13, "Permission denied", "models/v0001")

    with caplog.at_level("INFO", logger="streamrec.retrain"):
        retrain_cli._prune(Registry(), 5)
    [line] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "Permission denied" in line.getMessage() and "next fit tries again" in line.getMessage()
    assert line.exc_info is None
