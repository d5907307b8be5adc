"""accelerate's ``step_was_skipped`` made to see our skips (no import of accelerate).

``accelerator.prepare(SafeOptimizer(...))`` wraps the optimizer in accelerate's
``AcceleratedOptimizer``, whose ``step_was_skipped`` knows only GradScaler's overflow skips,
and ``accelerator.optimizer_step_was_skipped`` (which the Hugging Face Trainer reads before
it steps its LR scheduler) asks that. Once accelerate is imported, the property is widened
to also ask the wrapped optimizer's own ``step_was_skipped`` when it has one (a
SafeOptimizer): an addition, never a change of what accelerate itself reports.
"""

from __future__ import annotations

import sys
from typing import Any

_patched = False


def ensure_patched() -> None:
    """Widen ``AcceleratedOptimizer.step_was_skipped`` once accelerate is loaded (cheap after)."""
    global _patched
    if _patched:
        return
    module = sys.modules.get("accelerate.optimizer")
    if module is None:
        return
    cls = getattr(module, "AcceleratedOptimizer", None)
    original = getattr(cls, "step_was_skipped", None) if cls is not None else None
    if not isinstance(original, property) or original.fget is None:
        _patched = True  # an accelerate we do not know: leave it alone
        return
    accelerate_says = original.fget

    def step_was_skipped(self: Any) -> bool:
        """Whether the optimizer step was skipped (accelerate's overflow skip, or the
        wrapped optimizer's own ``step_was_skipped``, e.g. a SafeOptimizer's)."""
        inner = getattr(self.optimizer, "step_was_skipped", False)
        return bool(accelerate_says(self)) or inner is True

    step_was_skipped.__wrapped__ = accelerate_says  # type: ignore[attr-defined]
    cls.step_was_skipped = property(step_was_skipped)  # type: ignore[union-attr]
    _patched = True
