"""The LR-sensitivity sweep's methods: plain AdamW, the usual guards, SPAM, StableSPAM, SafeOptimizer.

``adamw``, ``adamw+clip`` (``clip_grad_norm_(1.0)``), ``zclip`` (the ``zclip`` package's
``ZClip()`` defaults) and ``safe`` (``SafeOptimizer(AdamW)`` defaults with ``SafeLoss``)
are the stability benchmark's own runners (:mod:`benchmarks.stability_methods`), so
both benchmarks wire them identically. ``spam`` and ``stablespam`` are
``pytorch_optimizer.SPAM`` / ``StableSPAM`` (the ``pytorch-optimizer`` package) with
the package's defaults and AdamW's default decoupled weight decay of 0.01 (both
packages' optimizers are Adam variants with decoupled decay; AdamW's 0.01 keeps the
comparison to AdamW about the guard alone).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim import Optimizer

from benchmarks.stability_methods import METHODS as STABILITY_METHODS
from benchmarks.stability_methods import _Runner, zclip_status

__all__ = ["SWEEP_METHODS", "sweep_unavailable"]

WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default


class _Spam(_Runner):
    name = "spam"

    def make_optimizer(self, lr: float) -> Optimizer:
        from pytorch_optimizer import SPAM

        optimizer: Optimizer = SPAM(self.params, lr=lr, weight_decay=WEIGHT_DECAY)
        return optimizer


class _StableSpam(_Runner):
    name = "stablespam"

    def make_optimizer(self, lr: float) -> Optimizer:
        from pytorch_optimizer import StableSPAM

        optimizer: Optimizer = StableSPAM(self.params, lr=lr, weight_decay=WEIGHT_DECAY)
        return optimizer


SWEEP_METHODS: dict[str, type[_Runner]] = {
    "adamw": STABILITY_METHODS["adamw"],
    "adamw+clip": STABILITY_METHODS["adamw+clip"],
    "zclip": STABILITY_METHODS["zclip"],
    "spam": _Spam,
    "stablespam": _StableSpam,
    "safe": STABILITY_METHODS["safe"],
}


def _pytorch_optimizer_status() -> str | None:
    try:
        from pytorch_optimizer import SPAM, StableSPAM

        for cls in (SPAM, StableSPAM):
            cls([nn.Parameter(torch.zeros(2, 2))], lr=1e-3)
    except Exception as error:  # any failure to import or build: report it, do not fake it
        return f"{type(error).__name__}: {error} (install: pip install --no-deps pytorch-optimizer)"
    return None


def sweep_unavailable() -> dict[str, str]:
    """The sweep's methods whose package is missing here, and why."""
    why_zclip = zclip_status()
    why_spam = _pytorch_optimizer_status()
    status = {"zclip": why_zclip, "spam": why_spam, "stablespam": why_spam}
    return {method: why for method, why in status.items() if why is not None}
