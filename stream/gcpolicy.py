"""The worker's cyclic-garbage-collector policy: short pauses, never a walk of the whole heap.

A worker's heap is mostly long-lived: the online models, the Transformer session, Faust's
and aiokafka's services. CPython's generational collector walks the young objects every
``threshold0`` allocations and, every so often, everything older too. Measured in the worker
at 2,000 Taobao events/s (``bench/pipeline_bench.py``):

- with a first-generation threshold of 50,000 (this worker's setting before), each young
  collection paused the event loop 10–36 ms, every few seconds; a middle-generation one
  took 150 ms and a full one 300 ms or more, growing with the models. Every pause holds up
  the batch in hand and the ones queued behind it: the tail of event→recommendation latency.
- CPython's default threshold (700) keeps the pauses short but walks the long-lived heap so
  often that the step ran 1.2× slower (the reason for 50,000).

:func:`configure` keeps young collections small (``YOUNG_THRESHOLD``, about 2 ms each) and,
after each, moves the survivors to the permanent generation (:func:`gc.freeze`), which no
collection walks again. Objects that die are still freed at once by reference counting
(frozen or not), so memory does not grow; what a frozen object can no longer get is a cyclic
collection, if it later becomes part of an unreachable cycle. The objects that live through a
young collection here are model state and long-running services, which do not; measured
(with a 10,000 threshold): after 50,000 events, unfreezing and collecting everything found
103,948 unreachable objects, against 104,187 with the plain collector (both are the
worker's own shutdown). The ``streamrec_gc_frozen_objects`` gauge shows the frozen count:
it follows the live heap; one that only grows is a leak, and ``STREAMREC_GC_FREEZE=false``
turns the policy off.
"""

from __future__ import annotations

import gc

#: young collections of at most this many new container objects: ~2 ms each on this machine
YOUNG_THRESHOLD = 5_000
#: the thresholds without freezing (the worker's before this policy): fewer walks of the old
#: generations than CPython's default, longer pauses
PLAIN_THRESHOLDS = (50_000, 50, 100)


def _freeze_survivors(phase: str, info: dict) -> None:
    if phase == "stop" and info["generation"] == 0:
        gc.freeze()


def configure(freeze: bool = True) -> None:
    """Small young collections; with ``freeze``, their survivors are never walked again.

    Idempotent. Without ``freeze`` (the escape hatch), a larger threshold keeps the older
    generations from being walked too often, at the cost of longer pauses.
    """
    if _freeze_survivors in gc.callbacks:
        gc.callbacks.remove(_freeze_survivors)
    if freeze:
        gc.set_threshold(YOUNG_THRESHOLD, 10, 10)
        gc.callbacks.append(_freeze_survivors)
        gc.freeze()  # what start-up built (modules, settings, models) is long-lived
    else:
        gc.set_threshold(*PLAIN_THRESHOLDS)


__all__ = ["PLAIN_THRESHOLDS", "YOUNG_THRESHOLD", "configure"]
