"""Hot LR: lower the learning rate when the loss climbs above where the run started.

A learning rate that is too high rarely produces a NaN: the loss jumps up within a few
updates and stays there, far above the loss the run started from, while every step is
finite and no gradient norm is an outlier against its (equally inflated) neighbours.
This stage watches for exactly that and answers it the way a person would: go back to
the last snapshot taken before the climb and lower the LR factor. Decided on the host
from the losses the steps have already read (no extra sync); the factor applies as a
multiplier around the update (:mod:`stableopt.stages.lr_factor`).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from typing import Any

from stableopt._checks import check_float, check_int
from stableopt.outcomes import Cause, EventKind
from stableopt.stages._window import MAD_TO_STD
from stableopt.stages.base import StepNumbers
from stableopt.stages.lr_factor import LRChange

__all__ = ["HotLR"]


class HotLR:
    """Cut the LR when the loss level stays far above the level the run started from.

    **What it measures.** Losses of accepted steps only, on a log scale (the rule needs a
    positive loss: a cross-entropy, a squared error; a loss at or below 0 is passed
    over, and an optimizer group with ``maximize=True`` turns it off). The *reference*
    is the median of the first ``reference_steps`` accepted losses (the loss before any
    update and just after the first ones: the earliest the LR can be judged from, and a
    median, so that one lucky sample of a tiny batch is not the yardstick). The *level*
    is the median of the last ``window`` accepted losses; the *noise* is the robust spread
    (1.4826 MAD) of the last ``noise_window`` log-losses. The loss is *elevated* when

        log(level) - log(reference) > max(log(ratio), noise_z * noise)

    i.e. the level is more than ``ratio`` times the starting one and more than
    ``noise_z`` noise units above it. The first loss alone is a second reference (an LR
    hot enough to ruin the model in one update leaves the median of the first losses
    already high): the level is also elevated when it exceeds the first loss by
    ``ratio`` and by ``first_noise_z`` noise units, a wider margin because one sample is
    a noisier yardstick than a median. ``patience`` elevated steps in a row are a cut.

    **What it does.** The factor is multiplied by ``factor``; the response restores the
    last snapshot (taken before the climb: no snapshot is taken while the loss is
    elevated) and the watch goes on from the restored weights, against the same
    reference; a new level of the loss that the escalation accepts (a loss re-weighted
    x1e4 on purpose) is a new reference. The cut stays (the LR was too hot for this
    run; the user's schedule keeps running underneath). With ``recovery_after_steps``
    set, the factor recovers (``recovery_growth`` every ``recovery_every_steps``
    accepted, not elevated steps, after ``recovery_after_steps`` of them) but never
    above half the factor that failed, so a run does not cycle between a too-hot LR
    and a cut (multiplicative decrease, bounded increase). Every cut and recovery is an
    event with the numbers behind it.

    Why these defaults: on the do-no-harm benchmark's 50 healthy runs (25 configurations x 2
    seeds, 1000 steps, batch sizes 1 to 256, SGD to Adagrad, losses from 1e-5 to 1e4) the
    largest excess was 1.2x the margin (batch-2 SGD, for fewer than ``patience`` steps in a
    row) and no run was cut. On the LR sweep's character LM every LR from 30x plain AdamW's
    best upward is caught within 31 steps; ``factor=0.03`` gave a hot-side LR sensitivity of
    0.42 (warm-up + cosine) and 0.46 (constant LR), against 0.50 and 0.53 with 0.1, 0.52 and
    1.06 with 0.1 and recovery (the recovered LR climbed again), and 1.01 and 1.24 for plain
    AdamW; the loss at the best LR is unchanged. See ``docs/lr.md``.

    Args:
        factor: multiplier per cut (default 0.03, in (0, 1)).
        ratio: the level must exceed ``ratio`` x the reference (default 2.0, ``> 1``).
        noise_z: and ``noise_z`` noise units above it (default 3.0, ``>= 0``).
        first_noise_z: the noise units by which the level must exceed the *first* loss, the
            second reference (default 8.0, ``>= 0``).
        window: accepted losses in the level's median (default 8, ``>= 1``).
        noise_window: log-losses the noise is measured over (default 32, ``>= 4``).
        patience: elevated steps in a row that make a cut (default 8, ``>= 1``).
        reference_steps: accepted losses the reference is the median of (default 3, ``>= 1``).
        recovery_after_steps: calm steps after a cut before the factor recovers (default
            ``None``: it does not: an LR that made the loss climb above the start is too
            hot for the run, and the schedule's own decay goes on under the cut; ``>= 1``).
        recovery_every_steps: calm steps between recovery increments (default 50, ``>= 1``).
        recovery_growth: factor multiplier per increment (default 2.0, ``> 1``).
        min_lr: the effective LR is never cut below this (default 0.0, ``>= 0``).
    """

    name = "hot_lr"

    def __init__(
        self,
        factor: float = 0.03,
        ratio: float = 2.0,
        noise_z: float = 3.0,
        first_noise_z: float = 8.0,
        window: int = 8,
        noise_window: int = 32,
        patience: int = 8,
        reference_steps: int = 3,
        recovery_after_steps: int | None = None,
        recovery_every_steps: int = 50,
        recovery_growth: float = 2.0,
        min_lr: float = 0.0,
    ) -> None:
        self.cut_factor = check_float(
            "factor", factor, minimum=0.0, maximum=1.0, inclusive_min=False
        )
        if self.cut_factor == 1.0:
            raise ValueError("factor must be < 1 (a cut), got 1.0")
        self.ratio = check_float("ratio", ratio, minimum=1.0, inclusive_min=False)
        self.noise_z = check_float("noise_z", noise_z, minimum=0.0)
        self.first_noise_z = check_float("first_noise_z", first_noise_z, minimum=0.0)
        self.window = check_int("window", window, minimum=1)
        self.noise_window = check_int("noise_window", noise_window, minimum=4)
        self.patience = check_int("patience", patience, minimum=1)
        self.reference_steps = check_int("reference_steps", reference_steps, minimum=1)
        self.recovery_after_steps = (
            None
            if recovery_after_steps is None
            else check_int("recovery_after_steps", recovery_after_steps, minimum=1)
        )
        self.recovery_every_steps = check_int(
            "recovery_every_steps", recovery_every_steps, minimum=1
        )
        self.recovery_growth = check_float(
            "recovery_growth", recovery_growth, minimum=1.0, inclusive_min=False
        )
        self.min_lr = check_float("min_lr", min_lr, minimum=0.0)
        self.factor = 1.0
        self.ceiling = 1.0  # the factor never recovers above this
        self.cuts = 0
        self.calm_steps = 0  # accepted, not elevated steps since the last cut
        self._logs: deque[float] = deque(maxlen=max(self.noise_window, self.window))
        self._first: list[float] = []  # the first accepted log-losses since the (re)start
        self.reference: float | None = None  # log of the reference level
        self.streak = 0  # elevated steps in a row

    @property
    def is_elevated(self) -> bool:
        """Whether the last accepted loss left the level elevated (no snapshot is taken then)."""
        return self.streak > 0

    def restart(self) -> None:
        """Forget the recent losses (the weights they came from were restored); keep the
        reference: the restored run is judged against the same start."""
        self._logs.clear()
        self.streak = 0

    def rebase(self, *_: Any) -> None:
        """Forget the reference too: the loss has a new scale (a new level the escalation
        accepted), and the next accepted losses are the new start."""
        self.restart()
        self._first = []
        self.reference = None

    def excess(self) -> tuple[float, float, float] | None:
        """``(log(level) - log(reference), margin, reference)`` against the reference that
        is exceeded the most (relative to its margin), or ``None`` before a full window."""
        if self.reference is None or len(self._logs) < self.window:
            return None
        logs = list(self._logs)
        level = statistics.median(logs[-self.window :])
        noise = logs[-self.noise_window :]
        center = statistics.median(noise)
        spread = MAD_TO_STD * statistics.median(abs(v - center) for v in noise)
        floor = math.log(self.ratio)
        candidates = [(level - self.reference, max(floor, self.noise_z * spread), self.reference)]
        first = self._first[0]
        candidates.append((level - first, max(floor, self.first_noise_z * spread), first))
        return max(candidates, key=lambda c: c[0] / c[1])

    def update(self, loss: float | None, maximize: bool = False) -> LRChange | None:
        """Take an accepted step's loss: a cut (kind ``LR_CUT``, cause ``HOT_LR``: the response
        restores the snapshot), a recovery (``LR_RECOVERY``) or ``None``."""
        if maximize or loss is None or not math.isfinite(loss):
            return None
        if loss <= 0.0:
            return None  # no log scale: such a loss says nothing here
        value = math.log(loss)
        self._logs.append(value)
        if self.reference is None:
            self._first.append(value)
            if len(self._first) >= self.reference_steps:
                self.reference = statistics.median(self._first)
        measured = self.excess()
        elevated = measured is not None and measured[0] > measured[1]
        self.streak = self.streak + 1 if elevated else 0
        if self.streak >= self.patience:
            assert measured is not None
            return self._cut(measured)
        if elevated:
            return None
        return self._recover()

    def _cut(self, measured: tuple[float, float, float]) -> LRChange:
        excess, margin, log_reference = measured
        reference = math.exp(log_reference)
        level = reference * math.exp(excess)
        old = self.factor
        self.ceiling = min(self.ceiling, old / 2.0)
        self.factor = old * self.cut_factor
        self.cuts += 1
        self.calm_steps = 0
        self.restart()
        data = {
            "level": level,
            "climb": math.exp(excess),
            "reference": reference,
            "margin": math.exp(margin),
            "patience": float(self.patience),
        }
        if self.recovery_after_steps is not None:
            data["ceiling"] = self.ceiling
        return LRChange(EventKind.LR_CUT, Cause.HOT_LR, old, self.factor, data)

    def _recover(self) -> LRChange | None:
        if self.recovery_after_steps is None or self.factor >= self.ceiling:
            return None
        self.calm_steps += 1
        past = self.calm_steps - self.recovery_after_steps
        if past < 0 or past % self.recovery_every_steps != 0:
            return None
        old = self.factor
        self.factor = min(self.ceiling, old * self.recovery_growth)
        return LRChange(
            EventKind.LR_RECOVERY,
            Cause.CALM_STEPS,
            old,
            self.factor,
            {"calm_steps": float(self.calm_steps), "ceiling": self.ceiling},
        )

    def observe(self, numbers: StepNumbers) -> None:
        """Nothing to take: accepted losses reach this policy through :meth:`update`."""

    def state_dict(self) -> dict[str, Any]:
        """Factor, ceiling, the watch's windows and reference, as plain numbers."""
        return {
            "factor": self.factor,
            "ceiling": self.ceiling,
            "cuts": self.cuts,
            "calm_steps": self.calm_steps,
            "logs": list(self._logs),
            "first": list(self._first),
            "reference": self.reference,
            "streak": self.streak,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.factor = float(state_dict["factor"])
        self.ceiling = float(state_dict["ceiling"])
        self.cuts = int(state_dict["cuts"])
        self.calm_steps = int(state_dict["calm_steps"])
        self._logs = deque(
            (float(v) for v in state_dict["logs"]), maxlen=max(self.noise_window, self.window)
        )
        self._first = [float(v) for v in state_dict["first"]]
        reference = state_dict["reference"]
        self.reference = None if reference is None else float(reference)
        self.streak = int(state_dict["streak"])

    def __repr__(self) -> str:
        return (
            f"HotLR(factor={self.cut_factor:g}, ratio={self.ratio:g}, noise_z={self.noise_z:g}, "
            f"window={self.window}, patience={self.patience})"
        )
