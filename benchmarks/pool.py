"""Run many independent benchmark jobs in worker processes, with a progress bar.

The do-no-harm and LR-sensitivity benchmarks hand :func:`run_jobs` a picklable
top-level function and its argument tuples; each job runs in a ``spawn`` worker
(``jobs > 1``) or in this process (``jobs == 1``) with one torch thread, so that two
workers on two cores do not fight over OpenMP threads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = ["run_jobs"]

R = TypeVar("R")


def _progress(total: int, enabled: bool, unit: str) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm

        return tqdm(total=total, unit=unit, dynamic_ncols=True)
    except ImportError:
        return None


def _init_worker(threads: int) -> None:
    import logging

    import torch

    logging.getLogger("stableopt").setLevel(logging.ERROR)  # events are counted, not printed
    torch.set_num_threads(threads)


def run_jobs(
    function: Callable[..., R],
    jobs: Sequence[tuple[Any, ...]],
    *,
    workers: int = 1,
    threads: int = 1,
    progress: bool = True,
    label: Callable[[R], str] | None = None,
    unit: str = "run",
) -> list[R]:
    """``[function(*job) for job in jobs]``, ``workers`` processes at a time, in job order."""
    from concurrent.futures import ProcessPoolExecutor, as_completed

    started = time.perf_counter()
    bar = _progress(len(jobs), progress, unit)
    results: list[R | None] = [None] * len(jobs)
    finished = 0

    def report(index: int, result: R) -> None:
        nonlocal finished
        results[index] = result
        finished += 1
        if bar is not None:
            if label is not None:
                bar.set_postfix_str(label(result), refresh=False)
            bar.update(1)
        elif progress and (finished % 25 == 0 or finished == len(jobs)):
            print(f"[{finished}/{len(jobs)} {unit}s] {time.perf_counter() - started:.0f} s")

    try:
        if workers <= 1:
            _init_worker(threads)
            for index, job in enumerate(jobs):
                report(index, function(*job))
        else:
            import multiprocessing

            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                workers, mp_context=context, initializer=_init_worker, initargs=(threads,)
            ) as pool:
                futures = {pool.submit(function, *job): i for i, job in enumerate(jobs)}
                for future in as_completed(futures):
                    report(futures[future], future.result())
    finally:
        if bar is not None:
            bar.close()
    return [r for r in results if r is not None]
