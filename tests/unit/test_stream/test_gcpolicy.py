"""The worker's garbage-collector policy (stream/gcpolicy.py) and its gauge."""

from __future__ import annotations

import gc
import weakref

import pytest
from prometheus_client import CollectorRegistry

from stream import gcpolicy
from stream.prometheus import Metrics
from stream.settings import Settings


@pytest.fixture
def restore_gc():
    threshold = gc.get_threshold()
    yield
    gcpolicy.configure(freeze=False)
    gc.unfreeze()
    gc.set_threshold(*threshold)


class Node:
    def __init__(self) -> None:
        self.peer = self  # a cycle: only the cyclic collector can free it


def test_survivors_of_a_young_collection_are_frozen(restore_gc):
    gcpolicy.configure(freeze=True)
    assert gc.get_threshold()[0] == gcpolicy.YOUNG_THRESHOLD
    before = gc.get_freeze_count()
    kept = [[i] for i in range(100)]  # containers, so the collector tracks them
    gc.collect(0)
    assert gc.get_freeze_count() >= before + len(kept)
    young = {id(x) for x in gc.get_objects(0)}
    assert not young & {id(x) for x in kept}


def test_young_cycles_are_still_collected(restore_gc):
    gcpolicy.configure(freeze=True)
    node = weakref.ref(Node())  # unreachable at once: the next young collection frees it
    assert node() is not None
    gc.collect(0)
    assert node() is None


def test_configure_is_idempotent_and_can_be_turned_off(restore_gc):
    gcpolicy.configure(freeze=True)
    gcpolicy.configure(freeze=True)
    assert gc.callbacks.count(gcpolicy._freeze_survivors) == 1
    gcpolicy.configure(freeze=False)
    assert gcpolicy._freeze_survivors not in gc.callbacks
    before = gc.get_freeze_count()
    kept = [[i] for i in range(100)]
    gc.collect(0)
    # nothing frozen: the count does not grow by the 100 survivors (a frozen object freed
    # meanwhile, by another test's thread still running, lowers it: CI saw 29 fewer)
    assert gc.get_freeze_count() <= before
    assert kept


def test_the_gauge_holds_the_frozen_count_as_last_counted_not_a_walk_at_each_scrape(restore_gc):
    gcpolicy.configure(freeze=True)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    # the count as the metrics took it (frozen objects freed by another test's thread still
    # running move the live count by a few meanwhile: CI saw 3)
    counted = registry.get_sample_value("streamrec_gc_frozen_objects")
    assert counted > 0 and abs(gc.get_freeze_count() - counted) < 50
    kept = [[i] for i in range(100)]
    gc.collect(0)  # the survivors (100 lists at least) are frozen: the count grows, the gauge waits for the next count
    assert gc.get_freeze_count() > counted + 50
    assert registry.get_sample_value("streamrec_gc_frozen_objects") == counted
    metrics.count_frozen()
    assert abs(registry.get_sample_value("streamrec_gc_frozen_objects") - gc.get_freeze_count()) < 50
    assert registry.get_sample_value("streamrec_gc_frozen_objects") > counted + 50
    assert kept


def test_the_setting_defaults_on_and_reads_false():
    assert Settings.from_env({}).gc_freeze is True
    assert Settings.from_env({"STREAMREC_GC_FREEZE": "false"}).gc_freeze is False
