"""Framework integrations: ``stableopt.integrations.hf`` (Hugging Face Trainer, extra ``hf``)
and ``stableopt.integrations.lightning`` (PyTorch Lightning, extra ``lightning``).

Each is imported on its own (``from stableopt.integrations.hf import StableOptCallback``), so
that importing :mod:`stableopt` never needs ``transformers`` or ``lightning``.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from stableopt.optimizer import SafeOptimizer

__all__ = ["find_safe_optimizer"]


def find_safe_optimizer(optimizer: Any) -> SafeOptimizer | None:
    """The :class:`~stableopt.SafeOptimizer` inside ``optimizer``, or ``None``.

    Follows wrappers down to the real object: accelerate's ``AcceleratedOptimizer``
    (``.optimizer``) and Lightning's ``LightningOptimizer`` (``._optimizer``). The
    latter is itself an instance of the class it wraps (Lightning builds a subclass
    of it), so it is unwrapped before the ``isinstance`` test: methods that set
    attributes, called on the wrapper, would set them on the wrapper only.
    """
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        wrapped = optimizer.__dict__.get("_optimizer") if hasattr(optimizer, "__dict__") else None
        if isinstance(wrapped, Optimizer):
            optimizer = wrapped
            continue
        if isinstance(optimizer, SafeOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None
