"""Finding the modules that hold an optimizer's parameters, for :mod:`stableopt.buffers`.

Two ways, in order:

1. **The calling code.** ``SafeOptimizer(torch.optim.AdamW(model.parameters()))`` is
   written where ``model`` is at hand: a local of the calling frame (a script's
   ``model``, a function's argument), or an attribute of one (a Trainer's ``self.model``,
   a LightningModule's ``self``). The frames above the constructor are searched, a dozen
   at most, and the outermost modules holding any of the parameters are the roots.
2. **The first forward pass.** Otherwise a global forward pre-hook looks at each module
   called, once per module, outermost first, until a ``step()`` comes after a root was
   found; then it is removed. Inside a compiled region it does nothing (so it breaks no
   graph): a model only ever called compiled, and out of sight of the calling code, is
   not found this way (the first ``step()`` then says so).
"""

from __future__ import annotations

import sys
import types
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["discovery_hook", "modules_in_frames"]


def modules_in_frames(param_ids: set[int], depth: int) -> list[nn.Module]:
    """The outermost modules holding any of ``param_ids`` among the locals of the ``depth``
    frames above the caller and the modules those locals hold as attributes (one level)."""
    found: dict[int, nn.Module] = {}
    frame: types.FrameType | None = sys._getframe(1)
    try:
        for _ in range(depth):
            if frame is None:
                break
            for value in list(frame.f_locals.values()):
                for candidate in _candidates(value):
                    if id(candidate) not in found and any(
                        id(p) in param_ids for p in candidate.parameters()
                    ):
                        found[id(candidate)] = candidate
            frame = frame.f_back
    finally:
        del frame
    modules = list(found.values())
    inner = {id(m) for outer in modules for m in outer.modules() if m is not outer}
    return [m for m in modules if id(m) not in inner]


def _candidates(value: Any) -> list[nn.Module]:
    if isinstance(value, nn.Module):
        return [value]
    if isinstance(value, (type, types.ModuleType)) or not hasattr(value, "__dict__"):
        return []
    try:
        attributes = list(vars(value).values())
    except TypeError:
        return []
    return [a for a in attributes if isinstance(a, nn.Module)]


def discovery_hook(owner: Any, seen: Callable[[Any, nn.Module], None]) -> RemovableHandle:
    """A global forward pre-hook that calls ``seen(owner, module)`` for each module called,
    while ``owner`` lives (it holds ``owner`` by a weak reference, and goes with it)."""
    ref = weakref.ref(owner)

    def hook(module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():
            return
        target = ref()
        if target is not None:
            seen(target, module)

    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    weakref.finalize(owner, handle.remove)  # a global hook must not outlive its owner
    # torch.compile(module) warns on every call while any global hook exists that the hook
    # fires an extra time, for the compiled wrapper: this one is idempotent
    warnings.filterwarnings(
        "ignore",
        message=r"Using `torch.compile\(module\)` when there are global hooks",
        category=UserWarning,
    )
    return handle
