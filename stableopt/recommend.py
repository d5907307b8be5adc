"""Plain-language advice from what a run went through, with the numbers behind it.

Each rule reads the counters of ``stats()``, the recent events and the scheduled
learning rates, and gives at most one :class:`Recommendation`:

==================  ============================================  ==========================================
kind                fires when (defaults)                         advice
==================  ============================================  ==========================================
``lower_lr``        >= 2 emergency LR cuts (``lr_cut`` events)    lower the peak LR towards the one the cuts
                                                                  reached, or warm up longer
``clipping``        clipped on >= 50% of >= 20 good steps         check architecture / initialisation, lower
                                                                  the LR, or raise the clip threshold
``non_finite``      >= 1 step skipped for a NaN/Inf loss or       check the data; bf16 or loss scaling for
                    gradient, or ``nonfinite_losses`` >= 1        fp16 overflow
``size_mismatch``   >= 1 ``size_mismatches`` (from ``SafeLoss``)  check the input pipeline
``rollback``        >= 1 rollback                                 numerics of the update (eps, fp16), kernels,
                                                                  hardware
``spikes``          >= 3 ``spike_skips``                          look at the batches of those steps; lower LR
``plateau``         >= 1 plateau reduction (``plateau`` events)   decay the LR earlier or lengthen patience
==================  ============================================  ==========================================

A healthy run gives none. Counters cover the whole run; events are the
monitor's recent ones (256 by default), which only the examples and a few
counts (LR cuts, plateau reductions, NaN/Inf skips) come from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stableopt._checks import check_float, check_int
from stableopt.monitor import Event

__all__ = ["Recommendation", "format_recommendations", "recommend"]

_EXAMPLES = 5  # steps quoted per recommendation


@dataclass(frozen=True)
class Recommendation:
    """One piece of advice.

    Attributes:
        kind: which rule gave it: ``"lower_lr"``, ``"clipping"``, ``"non_finite"``,
            ``"size_mismatch"``, ``"rollback"``, ``"spikes"`` or ``"plateau"``.
        message: the advice in plain language, with the numbers.
        evidence: the numbers behind it, by name (counts, rates, learning rates;
            ``steps`` lists are in ``message``).
    """

    kind: str
    message: str
    evidence: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


def recommend(
    stats: Mapping[str, Any],
    events: Sequence[Event],
    lrs: Sequence[float] | None = None,
    *,
    min_lr_cuts: int = 2,
    clip_rate: float = 0.5,
    min_good_steps: int = 20,
    min_spike_skips: int = 3,
) -> list[Recommendation]:
    """The advice for a run from its counters, events and (optionally) scheduled LRs.

    Args:
        stats: the counters and numbers of ``SafeOptimizer.stats()`` (a missing
            counter counts as 0).
        events: the run's events, oldest first.
        lrs: the scheduled LR of each parameter group (``group["lr"]``); without
            them the LR advice gives factors only.
        min_lr_cuts: emergency LR cuts from which to advise a lower LR (default 2, ``>= 1``).
        clip_rate: the share of good steps clipped from which clipping is "most
            steps" (default 0.5, in (0, 1]).
        min_good_steps: good steps needed before the clip rate means anything
            (default 20, ``>= 1``).
        min_spike_skips: spike skips from which to advise on spikes (default 3, ``>= 1``).
    """
    check_int("min_lr_cuts", min_lr_cuts, minimum=1)
    check_float("clip_rate", clip_rate, minimum=0.0, maximum=1.0, inclusive_min=False)
    check_int("min_good_steps", min_good_steps, minimum=1)
    check_int("min_spike_skips", min_spike_skips, minimum=1)
    rules = (
        _lower_lr(stats, events, lrs, min_lr_cuts),
        _clipping(stats, clip_rate, min_good_steps),
        _non_finite(stats, events),
        _size_mismatch(stats),
        _rollback(stats, events),
        _spikes(stats, events, min_spike_skips),
        _plateau(stats, events, lrs),
    )
    return [advice for advice in rules if advice is not None]


def format_recommendations(advice: Sequence[Recommendation]) -> str:
    """One numbered paragraph per recommendation, or a line saying there is none."""
    if not advice:
        return "No recommendations: no guard fired often enough to suggest a change."
    return "\n".join(f"{i}. {a.message}" for i, a in enumerate(advice, start=1))


# -- the rules ------------------------------------------------------------------------


def _lower_lr(
    stats: Mapping[str, Any], events: Sequence[Event], lrs: Sequence[float] | None, min_cuts: int
) -> Recommendation | None:
    cuts = [e for e in events if e.kind == "lr_cut"]
    if len(cuts) < min_cuts:
        return None
    deepest = min(e.data.get("new_factor", 1.0) for e in cuts)
    factor = float(stats.get("lr_factor", 1.0))
    evidence = {
        "lr_cuts": float(len(cuts)),
        "deepest_factor": deepest,
        "lr_factor": factor,
        "emergency_clips": float(stats.get("emergency_clips", 0)),
    }
    now = (
        "the last cut is still in force"
        if stats.get("emergency_mode")
        else "it has recovered since"
    )
    lr_text = "the learning rate"
    if lrs:
        lr, cut_lr = max(lrs), max(lrs) * deepest
        evidence |= {"lr": lr, "cut_lr": cut_lr}
        lr_text = (
            f"the peak learning rate (now {lr:.3g}; the cuts went down to "
            f"{lr:.3g} x {deepest:.3g} = {cut_lr:.3g} and training held there): "
            f"try a value between {cut_lr:.3g} and {lr:.3g}"
        )
    else:
        lr_text += f" (the cuts went down to {deepest:.3g}x and training held there)"
    return Recommendation(
        "lower_lr",
        f"The learning rate had to be cut {len(cuts)} times after exploding or non-finite "
        f"gradients (steps {_steps(cuts)}; {now}, LR factor now {factor:.3g}). "
        f"Lower {lr_text}, or warm up for longer.",
        evidence,
    )


def _clipping(
    stats: Mapping[str, Any], clip_rate: float, min_good_steps: int
) -> Recommendation | None:
    good, clips = int(stats.get("good_steps", 0)), int(stats.get("total_clips", 0))
    if good < min_good_steps or clips / good < clip_rate:
        return None
    rate = clips / good
    grad_norm, threshold = stats.get("grad_norm"), stats.get("clip_threshold")
    last = ""
    if grad_norm is not None and threshold is not None:
        last = f"; last gradient norm {float(grad_norm):.3g} against a threshold of {float(threshold):.3g}"
    evidence = {"total_clips": float(clips), "good_steps": float(good), "clip_rate": rate}
    for name, value in (("grad_norm", grad_norm), ("clip_threshold", threshold)):
        if value is not None:
            evidence[name] = float(value)
    return Recommendation(
        "clipping",
        f"Gradients were clipped on {100 * rate:.0f}% of the good steps ({clips} of {good}{last}): "
        "the threshold is the rule, not the exception, so every step trains at a reduced "
        "step size. Check the architecture and initialisation (missing normalisation, "
        "too-large initial weights or output scale), lower the learning rate, or raise "
        "the clip threshold.",
        evidence,
    )


def _non_finite(stats: Mapping[str, Any], events: Sequence[Event]) -> Recommendation | None:
    skips = [e for e in events if e.kind == "skip" and _is_non_finite(e)]
    losses = int(stats.get("nonfinite_losses", 0) or 0)  # counted by SafeLoss, if used
    if not skips and not losses:
        return None
    loss_text = f"; SafeLoss saw {losses} non-finite loss(es)" if losses else ""
    return Recommendation(
        "non_finite",
        f"{len(skips)} step(s) were skipped for NaN/Inf values in the loss or the gradients "
        f"(steps {_steps(skips)}{loss_text}). Check the data of those steps for NaN/Inf inputs "
        "or labels and the loss for log(0) or division by zero; under fp16, overflow is the "
        "usual cause: train in bf16, or use loss scaling (torch.amp.GradScaler).",
        {
            "non_finite_skips": float(len(skips)),
            "nonfinite_losses": float(losses),
            "skipped_steps": float(stats.get("skipped_steps", 0)),
            "steps": float(stats.get("steps", 0)),
        },
    )


def _size_mismatch(stats: Mapping[str, Any]) -> Recommendation | None:
    mismatches = int(stats.get("size_mismatches", 0) or 0)
    if mismatches == 0:
        return None
    steps = int(stats.get("steps", 0))
    return Recommendation(
        "size_mismatch",
        f"The prediction and target sizes differed {mismatches} time(s) in {steps} steps "
        "(SafeLoss trimmed them to fit). Check the input pipeline: padding and truncation, "
        "sequence lengths, label shifting, a last batch of another size (drop_last).",
        {"size_mismatches": float(mismatches), "steps": float(steps)},
    )


def _rollback(stats: Mapping[str, Any], events: Sequence[Event]) -> Recommendation | None:
    rollbacks = int(stats.get("rollbacks", 0))
    if rollbacks == 0:
        return None
    recent = [e for e in events if e.kind == "rollback"]
    lost = [e.step - e.data["snapshot_step"] for e in recent if "snapshot_step" in e.data]
    evidence = {"rollbacks": float(rollbacks)}
    steps_lost = ""
    if lost:
        evidence["steps_lost"] = float(sum(lost))
        steps_lost = f", {sum(lost):.0f} steps of training undone"
    return Recommendation(
        "rollback",
        f"An update left non-finite weights {rollbacks} time(s) (steps {_steps(recent)}"
        f"{steps_lost}) although its gradients were finite. Suspect the update's numerics: "
        "an eps too small for the dtype (fp16 Adam), a learning rate too high for the "
        "weights' scale, a custom kernel; if it recurs at random, the hardware. Snapshotting "
        "more often (Rollback(every_steps=...)) loses less on each.",
        evidence,
    )


def _spikes(
    stats: Mapping[str, Any], events: Sequence[Event], min_spike_skips: int
) -> Recommendation | None:
    spikes = int(stats.get("spike_skips", 0))
    if spikes < min_spike_skips:
        return None
    recent = [e for e in events if e.kind == "skip" and "spike" in e.reason]
    steps = int(stats.get("steps", 0))
    return Recommendation(
        "spikes",
        f"{spikes} step(s) were skipped as loss or gradient-norm spikes (steps {_steps(recent)}). "
        "Look at the batches of those steps (mislabelled or corrupt samples, a shard of "
        "another distribution); if the spikes are genuine, lower the learning rate, or raise "
        "SpikeGuard(z_threshold=...) if they are harmless.",
        {"spike_skips": float(spikes), "steps": float(steps)},
    )


def _plateau(
    stats: Mapping[str, Any], events: Sequence[Event], lrs: Sequence[float] | None
) -> Recommendation | None:
    reductions = [e for e in events if e.kind == "plateau"]
    if not reductions:
        return None
    factor = float(stats.get("lr_factor", 1.0))
    evidence = {"plateau_reductions": float(len(reductions)), "lr_factor": factor}
    lr_text = f"LR factor now {factor:.3g}"
    if lrs:
        evidence["effective_lr"] = max(lrs) * factor
        lr_text += f", effective LR {max(lrs) * factor:.3g}"
    return Recommendation(
        "plateau",
        f"The loss stopped improving and the LR was reduced {len(reductions)} time(s) "
        f"(steps {_steps(reductions)}; {lr_text}). A schedule that decays earlier (cosine, "
        "linear decay) would do this on purpose; if the loss still falls when reductions "
        "fire, raise PlateauLR(patience_steps=...); if it is flat at a high value, the model "
        "or the data is the limit, not the LR.",
        evidence,
    )


# -- helpers ----------------------------------------------------------------------------


def _is_non_finite(event: Event) -> bool:
    grad_norm = event.data.get("grad_norm")
    return "NaN/Inf" in event.reason or (grad_norm is not None and not math.isfinite(grad_norm))


def _steps(events: Sequence[Event]) -> str:
    steps = [str(e.step) for e in events]
    if len(steps) > _EXAMPLES:
        return ", ".join(steps[:_EXAMPLES]) + f", ... ({len(steps)} in all)"
    return ", ".join(steps) if steps else "not in the recent events"
