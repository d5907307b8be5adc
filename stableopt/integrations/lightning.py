"""PyTorch Lightning integration (``pip install 'stableopt[lightning]'``).

A :class:`~stableopt.SafeOptimizer` returned from ``configure_optimizers`` trains as
is: Lightning calls ``optimizer.step(closure=...)``, the closure runs the forward, the
backward and Lightning's ``on_before_optimizer_step`` hooks, and ``step()`` inspects the
gradients and the closure's loss after it. A batch with a NaN loss or NaN gradients is
then a skipped step, which Lightning's automatic optimization cannot do on its own
(Lightning issue 4956). This module adds:

- :func:`log_stats`: ``self.log_dict`` of the optimizer's metrics from any hook;
- :class:`StableOptCallback`: that, once per optimizer step, and Lightning's own
  ``gradient_clip_val`` turned off while ours clips.

Lightning hands the module ``LightningOptimizer`` wrappers (``self.optimizers()``); they
pass the SafeOptimizer's ``param_groups`` through unchanged, so LR schedulers from
``configure_optimizers`` write the inner optimizer's groups. The helpers here unwrap them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "stableopt.integrations.lightning needs Lightning: pip install 'stableopt[lightning]'"
    ) from exc

from stableopt._checks import check_int
from stableopt.integrations import find_safe_optimizer
from stableopt.optimizer import SafeOptimizer
from stableopt.sinks._common import metric_values

__all__ = ["StableOptCallback", "log_stats"]

log = logging.getLogger(__name__)


def log_stats(
    module: pl.LightningModule,
    optimizer: Any = None,
    *,
    prefix: str = "stableopt/",
    **log_kwargs: Any,
) -> dict[str, float]:
    """Log the SafeOptimizer's metrics with ``module.log_dict``; return what was logged.

    The metrics are those of the sinks (``stableopt/system_health``,
    ``stableopt/skipped_steps``, ``stableopt/grad_norm``, ``stableopt/lr_factor``, ...;
    see :data:`stableopt.sinks._common.METRICS`), non-finite values left out, and
    ``stableopt/step_skipped``: 1.0 when the last step's update was left out (skipped or
    rolled back, :attr:`~stableopt.SafeOptimizer.last_step`), else 0.0. Call it
    from a training hook, e.g. ``on_train_batch_end``. Reading ``stats()`` syncs the
    device once.

    Args:
        module: the LightningModule that logs.
        optimizer: the SafeOptimizer, or a wrapper of it (``self.optimizers()``);
            default: the first SafeOptimizer among the trainer's optimizers.
        prefix: prefix of the metric names (default ``"stableopt/"``).
        **log_kwargs: passed to ``log_dict`` (default ``on_step=True, on_epoch=False``).

    Raises:
        TypeError: ``optimizer`` holds no SafeOptimizer (or, by default, the trainer
            has none).
    """
    if optimizer is None:
        safe = _first_safe(module.trainer.optimizers)
    else:
        safe = find_safe_optimizer(optimizer)
    if safe is None:
        got = "the trainer's optimizers" if optimizer is None else type(optimizer).__name__
        raise TypeError(
            f"log_stats needs a SafeOptimizer (or a wrapper of one), got {got}; "
            "return SafeOptimizer(...) from configure_optimizers"
        )
    values = {prefix + k: v for k, v in metric_values(safe.stats()).items()}
    if safe.last_step is not None:  # whether the last step's update is in the weights
        values[prefix + "step_skipped"] = float(safe.step_was_skipped)
    module.log_dict(values, **{"on_step": True, "on_epoch": False, **log_kwargs})
    return values


class StableOptCallback(pl.Callback):
    """Log a SafeOptimizer's metrics from Lightning; keep Lightning off our clipping.

    ``pl.Trainer(callbacks=[StableOptCallback()])`` with a module whose
    ``configure_optimizers`` returns a :class:`~stableopt.SafeOptimizer`:

    - **logs**: after every ``every_n_steps``-th optimizer step, :func:`log_stats`
      (``stableopt/<name>``; ``stableopt/<i>/<name>`` for the i-th of several
      SafeOptimizers): to ``trainer.callback_metrics`` at once, and to the loggers at
      the trainer's ``log_every_n_steps``.
    - **clipping**: Lightning clips to ``gradient_clip_val`` inside the closure,
      before ``step()`` sees the gradients, so our policies and guards would only see
      clipped ones. When the SafeOptimizer clips, ``on_fit_start`` sets
      ``trainer.gradient_clip_val = None`` and logs it.

    Skipped steps still count as Lightning steps (``trainer.global_step``) and advance
    ``interval="step"`` LR schedulers, exactly as in a plain loop that calls
    ``sched.step()`` every iteration (Lightning does the same after GradScaler's own skip);
    our LR factor multiplies the schedule. ``stableopt/step_skipped`` (1.0 or 0.0) says
    whether the last optimizer step's update was left out.

    Args:
        every_n_steps: log after every n-th optimizer step (default 1, ``>= 1``).
        optimizer: the SafeOptimizer (or a wrapper of it); default: every SafeOptimizer
            among the trainer's optimizers.
        prefix: prefix of the metric names (default ``"stableopt/"``).
        disable_trainer_clipping: turn ``gradient_clip_val`` off when ours clips.
        prog_bar: also show the metrics in the progress bar.
    """

    def __init__(
        self,
        every_n_steps: int = 1,
        *,
        optimizer: Any = None,
        prefix: str = "stableopt/",
        disable_trainer_clipping: bool = True,
        prog_bar: bool = False,
    ) -> None:
        self.optimizer: SafeOptimizer | None = None
        if optimizer is not None:
            self.optimizer = find_safe_optimizer(optimizer)
            if self.optimizer is None:
                raise TypeError(
                    f"optimizer must be a SafeOptimizer or None, got {type(optimizer).__name__}"
                )
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        self.every_n_steps = check_int("every_n_steps", every_n_steps, minimum=1)
        self.prefix = prefix
        self.disable_trainer_clipping = disable_trainer_clipping
        self.prog_bar = prog_bar
        self._last_logged_step = -1

    def _safes(self, trainer: pl.Trainer) -> list[SafeOptimizer]:
        # Looked up at each call rather than cached: the callback may serve another fit.
        if self.optimizer is not None:
            return [self.optimizer]
        found = (find_safe_optimizer(o) for o in trainer.optimizers)
        return [safe for safe in found if safe is not None]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        safes = self._safes(trainer)
        if not safes:
            log.warning(
                "StableOptCallback: no SafeOptimizer among the trainer's optimizers (%s); "
                "return SafeOptimizer(...) from configure_optimizers",
                [type(o).__name__ for o in trainer.optimizers],
            )
            return
        self._last_logged_step = -1
        clipping = [type(s.clip).__name__ for s in safes if s.clip is not None]
        clip_val = trainer.gradient_clip_val
        if self.disable_trainer_clipping and clipping and clip_val:
            log.info(
                "stableopt clips the gradients (%s): Lightning's own clipping is turned off "
                "(trainer.gradient_clip_val %s -> None) so that our policies see the raw gradients",
                ", ".join(clipping),
                clip_val,
            )
            trainer.gradient_clip_val = None

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        safes = self._safes(trainer)
        if not safes:
            return
        # Once per optimizer step: with gradient accumulation most batches do not step.
        steps = safes[0].monitor.counters["steps"]
        if steps == self._last_logged_step or steps % self.every_n_steps:
            return
        self._last_logged_step = steps
        for i, safe in enumerate(safes):
            prefix = self.prefix if len(safes) == 1 else f"{self.prefix}{i}/"
            log_stats(pl_module, safe, prefix=prefix, prog_bar=self.prog_bar)


def _first_safe(optimizers: Iterable[Any]) -> SafeOptimizer | None:
    for optimizer in optimizers:
        safe = find_safe_optimizer(optimizer)
        if safe is not None:
            return safe
    return None
