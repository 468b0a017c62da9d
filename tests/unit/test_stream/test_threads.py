"""numpy's BLAS on one thread in the worker and serve (stream/threads.py)."""

from __future__ import annotations

from threadpoolctl import threadpool_info

from stream.threads import one_blas_thread


def test_numpys_blas_runs_on_one_thread_after_it():
    assert one_blas_thread() >= 1  # numpy's OpenBLAS at least
    assert [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"] == [1] * one_blas_thread()
