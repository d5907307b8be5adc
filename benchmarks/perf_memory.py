"""Memory and sync measurement of the overhead benchmark (see :mod:`benchmarks.perf`).

Tensor bytes, not process RSS: persistent bytes are ``numel * element_size`` summed
over the tensors an optimizer or a stage holds; the transient peak of one step comes
from the profiler's allocation events on the CPU and from
``torch.cuda.max_memory_allocated`` on a GPU.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = ["count_syncs", "optimizer_state_bytes", "tensor_bytes", "tensors_in", "transient_peak"]


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def tensors_in(root: Any) -> list[Tensor]:
    """Every distinct tensor reachable from ``root`` through containers and attributes."""
    found: dict[int, Tensor] = {}
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, type)):
            continue
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            found[id(obj)] = obj
        elif isinstance(obj, Mapping):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset, deque)):
            stack.extend(obj)
        elif isinstance(obj, (nn.Module, Optimizer)) or callable(obj):
            continue  # never walk into the model or the inner optimizer
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return list(found.values())


def optimizer_state_bytes(optimizer: Optimizer) -> int:
    return tensor_bytes(
        t for s in optimizer.state.values() for t in s.values() if isinstance(t, Tensor)
    )


def transient_peak(step: Callable[[], None], device: str) -> int | None:
    """Bytes allocated during ``step`` above what was allocated before it, at the peak."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    try:  # the profiler's raw allocation events, in order (a private API)
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]  # type: ignore[union-attr]
    except AttributeError:
        return None
    allocated = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        allocated += event.nbytes()
        peak = max(peak, allocated)
    return peak


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2: the profiler's C++ side logs two lines per use."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def count_syncs(step: Callable[[], None]) -> int:
    """Blocking CUDA syncs in one call of ``step`` (CUDA only)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)
