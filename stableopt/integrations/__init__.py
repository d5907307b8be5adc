"""Framework integrations: ``stableopt.integrations.hf`` (Hugging Face Trainer, extra ``hf``)
and ``stableopt.integrations.lightning`` (PyTorch Lightning, extra ``lightning``).

Each is imported on its own (``from stableopt.integrations.hf import StableOptCallback``), so
that importing :mod:`stableopt` never needs ``transformers`` or ``lightning``.
"""

from __future__ import annotations

from stableopt.optimizer import find_safe_optimizer

__all__ = ["find_safe_optimizer"]
