"""numpy's BLAS on one thread in the worker and in serve.

numpy's OpenBLAS runs a matrix product of any size on every core, and its threads then spin,
waiting for the next one. The worker's products are small and come every batch (the content
source's cosines: users x new items x 384): on 2 cores a 16 x 384 x 200 product took 93 µs in
the calling thread and 1,302 µs of CPU in all, and a worker at 800 events/s with the demo
catalogue spent 1,313 µs per event in threads other than its own (bench/paced_bench.py
--catalogue). A worker is one event loop on one core by design (several workers use several
cores), so its BLAS gets one thread; serve computes its requests in threads of its own.
"""

from __future__ import annotations

import logging

import numpy  # noqa: F401 - its BLAS must be loaded to be limited
from threadpoolctl import threadpool_info, threadpool_limits

log = logging.getLogger("streamrec.threads")


def one_blas_thread() -> int:
    """Limit every BLAS library loaded in this process to one thread, for the rest of its life;
    returns how many were limited (0 where threadpoolctl finds none)."""
    threadpool_limits(limits=1, user_api="blas")
    limited = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    log.debug("BLAS on one thread: %s", ", ".join(i["internal_api"] for i in limited) or "none loaded")
    return len(limited)
