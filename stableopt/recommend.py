"""Plain-language advice from what a run went through, with the numbers behind it.

Each rule reads the counters of ``stats()``, the recent events and the scheduled
learning rates, and gives at most one :class:`Recommendation`:

==================  ============================================  ==========================================
kind                fires when (defaults)                         advice
==================  ============================================  ==========================================
``lower_lr``        >= 2 emergency LR cuts (``lr_cut`` events:    lower the peak LR towards the one the cuts
                    an update wrote non-finite weights, a run of  reached, or warm up longer; an absolute
                    failed steps, an absolute threshold)          threshold below the healthy norm: raise it
``clipping``        clipped on >= 50% of >= 20 good steps         check architecture / initialisation, lower
                                                                  the LR, or raise the clip threshold
``non_finite``      >= 1 step skipped for a NaN/Inf loss or       check the data; bf16 or loss scaling for
                    gradient, or a non-finite loss of             fp16 overflow
                    ``SafeLoss`` that bad weights do not explain
``size_mismatch``   >= 1 ``size_mismatches`` (from ``SafeLoss``)  check the input pipeline
``rollback``        >= 1 rollback                                 by its cause: the update's numerics (eps,
                                                                  fp16), kernels, hardware; or the batches of
                                                                  the failed steps
``spikes``          >= 3 spike skips that did not start a new     look at the batches of the isolated spikes at a
                    level                                         value the run never reached again (the
                                                                  evidence of bad batches); a level the run
                                                                  reached is not the data; runs of failures:
                                                                  lower the LR
``new_level``       >= 1 ``new_level`` event                      a level that lasted is a change of the training
                                                                  (not the data): if not intended, check what
                                                                  changed there; a level that did not last
                                                                  was a burst of bad batches
``plateau``         >= 1 plateau reduction (``plateau`` events;   decay the LR earlier or lengthen patience
                    ``PlateauLR`` is off unless turned on)
==================  ============================================  ==========================================

A healthy run gives none. Counters cover the whole run; events are the
monitor's recent ones (256 by default), which the examples, the causes and a few
counts (LR cuts, NaN/Inf skips, the spikes of each new level, plateau reductions)
come from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stableopt._checks import check_float, check_int
from stableopt.messages import skip_text
from stableopt.monitor import Event
from stableopt.outcomes import Cause, EventKind, SkipReason

__all__ = ["Recommendation", "format_recommendations", "recommend"]

_EXAMPLES = 5  # steps quoted per recommendation


@dataclass(frozen=True)
class Recommendation:
    """One piece of advice.

    Attributes:
        kind: which rule gave it: ``"lower_lr"``, ``"clipping"``, ``"non_finite"``,
            ``"size_mismatch"``, ``"rollback"``, ``"hot_lr"``, ``"data_fault"``,
            ``"transient_fault"``, ``"spikes"``, ``"new_level"`` or ``"plateau"``.
        message: the advice in plain language, with the numbers.
        evidence: the numbers behind it, by name (counts, rates, learning rates,
            gradient norms; ``steps`` lists are in ``message``).
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
    level_ratio: float = 10.0,
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
        min_spike_skips: spike skips that did not start a new level from which to
            advise on spikes (default 3, ``>= 1``).
        level_ratio: a last gradient norm within this factor below a new level's is
            still at that level; further below, the level did not last (default 10.0,
            the escalation's ``relearn_spread``; ``> 1``).
    """
    check_int("min_lr_cuts", min_lr_cuts, minimum=1)
    check_float("clip_rate", clip_rate, minimum=0.0, maximum=1.0, inclusive_min=False)
    check_int("min_good_steps", min_good_steps, minimum=1)
    check_int("min_spike_skips", min_spike_skips, minimum=1)
    check_float("level_ratio", level_ratio, minimum=1.0, inclusive_min=False)
    levels = _new_levels(events)
    rules = (
        _lower_lr(stats, events, lrs, min_lr_cuts),
        _clipping(stats, clip_rate, min_good_steps),
        _non_finite(stats, events),
        _size_mismatch(stats),
        _rollback(stats, events),
        _hot_lr(stats, events, lrs),
        _data_fault(events),
        _transient(stats, events),
        _spikes(stats, events, levels, min_spike_skips, level_ratio),
        _new_level(stats, levels, level_ratio),
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
    # the hot LR has its own advice; a policy of yours its own reasons
    cuts = [e for e in events if e.kind == EventKind.LR_CUT and _cause(e) not in ("hot", "policy")]
    if len(cuts) < min_cuts:
        return None
    deepest = min(e.data.get("new_factor", 1.0) for e in cuts)
    factor = float(stats.get("lr_factor", 1.0))
    by_cause = {cause: [e for e in cuts if _cause(e) == cause] for cause in _CAUSES}
    evidence = {
        "lr_cuts": float(len(cuts)),
        "weight_cuts": float(len(by_cause["weights"])),
        "failure_cuts": float(len(by_cause["failures"])),
        "threshold_cuts": float(len(by_cause["threshold"])),
        "deepest_factor": deepest,
        "lr_factor": factor,
    }
    causes = []
    if by_cause["weights"]:
        causes.append(f"{len(by_cause['weights'])} after an update wrote non-finite weights")
    if by_cause["failures"]:
        causes.append(f"{len(by_cause['failures'])} after {_failed_run_text(by_cause['failures'])}")
    thresholds = sorted(
        {
            name
            for e in by_cause["threshold"]
            if isinstance(e.cause, Cause) and (name := _THRESHOLD_NAMES.get(e.cause)) is not None
        }
    )
    if by_cause["threshold"]:
        causes.append(f"{len(by_cause['threshold'])} at {' or '.join(thresholds)}")
    now = (
        "the last cut is still in force"
        if stats.get("emergency_mode")
        else "it has recovered since"
    )
    if lrs:
        lr, cut_lr = max(lrs), max(lrs) * deepest
        evidence |= {"lr": lr, "cut_lr": cut_lr}
        lower = (
            f"Lower the peak learning rate (now {lr:.3g}; the deepest cut took it to "
            f"{lr:.3g} x {deepest:.3g} = {cut_lr:.3g}): try a value between {cut_lr:.3g} "
            f"and {lr:.3g}, or warm up for longer."
        )
    else:
        lower = (
            f"Lower the learning rate (the deepest cut took it to {deepest:.3g}x), or warm "
            "up for longer."
        )
    message = (
        f"The learning rate was cut {len(cuts)} times (steps {_steps(cuts)}: "
        f"{', '.join(causes)}; {now}, LR factor now {factor:.3g})."
    )
    if by_cause["weights"] or by_cause["failures"]:
        message += (
            " Those cuts came with rollbacks (see rollback): an accepted update had made the "
            "state bad; a bad batch alone is only skipped and never cuts."
        )
    if by_cause["threshold"]:
        message += (
            f" {' and '.join(thresholds)} is an absolute threshold you set on EmergencyLR "
            "(off by default): if ordinary steps are above it, it is too low for this run: "
            "raise it, or leave it off (None). If only bursts cross it:"
        )
        lower = lower[0].lower() + lower[1:]
    message += f" {lower}"
    return Recommendation("lower_lr", message, evidence)


def _hot_lr(
    stats: Mapping[str, Any], events: Sequence[Event], lrs: Sequence[float] | None
) -> Recommendation | None:
    cuts = [e for e in events if e.kind == EventKind.LR_CUT and _cause(e) == "hot"]
    if not cuts:
        return None
    factor = min(e.data.get("new_factor", 1.0) for e in cuts)
    evidence = {"hot_lr_cuts": float(len(cuts)), "hot_lr_factor": factor}
    climbs = [e for e in cuts if "climb" in e.data]
    climbed = ""
    if climbs:
        first = climbs[0].data
        climbed = (
            f" (at step {climbs[0].step}: a loss level of {first.get('level', math.nan):.4g}, "
            f"{first['climb']:.3g}x the {first.get('reference', math.nan):.4g} it started from)"
        )
        evidence["climb_ratio"] = float(first["climb"])
    message = (
        f"The loss climbed above where the run started and stayed there{climbed}: the learning "
        f"rate was too hot for this run. It was cut {len(cuts)} time(s) (steps {_steps(cuts)}), "
        f"each time back to the weights from before the climb; the factor on your schedule "
        f"is now {factor:.3g}."
    )
    if lrs:
        lr = max(lrs)
        evidence |= {"lr": lr, "cut_lr": lr * factor}
        message += (
            f" Start the next run with a peak LR near {lr * factor:.3g} ({lr:.3g} x "
            f"{factor:.3g}, the LR that trained after the cut), or warm up for longer."
        )
    else:
        message += (
            f" Start the next run near {factor:.3g}x this LR (the LR that trained after the "
            "cut), or warm up for longer."
        )
    return Recommendation("hot_lr", message, evidence)


def _data_fault(events: Sequence[Event]) -> Recommendation | None:
    faults = [e for e in events if e.kind == EventKind.DATA_FAULT]
    if not faults:
        return None
    batches = [e.labels["batch"] for e in faults if "batch" in e.labels]
    shown = "; ".join(f"[{b}]" for b in batches[:_EXAMPLES])
    more = f" and {len(batches) - _EXAMPLES} more" if len(batches) > _EXAMPLES else ""
    message = (
        f"{len(faults)} tagged batch(es) failed again when they came back (steps "
        f"{_steps(faults)}: {shown}{more}): the data reproduces the failure whatever the "
        "weights, so they were skipped without counting against the run. Leave those "
        "samples out: opt.ledger.save('bad_batches.json') writes them (bad_ids) for a "
        "sampler that skips them on the next run, and look at what they hold (NaN/Inf "
        "inputs, broken labels, a corrupt shard)."
    )
    return Recommendation("data_fault", message, {"data_faults": float(len(faults))})


def _transient(stats: Mapping[str, Any], events: Sequence[Event]) -> Recommendation | None:
    count = int(stats.get("transient_faults", 0))
    if count == 0:
        return None
    faults = [e for e in events if e.kind == EventKind.TRANSIENT_FAULT]
    by_device = dict(stats.get("transient_faults_by_device") or {})
    where = ", ".join(f"{device}: {n}" for device, n in sorted(by_device.items()))
    message = (
        f"{count} step(s) failed on their first evaluation and were healthy when re-run on "
        f"the same batch and RNG state (steps {_steps(faults)}; {where}): transient faults, "
        "possibly silent data corruption. The re-run's gradients were used, nothing was "
        "skipped. One is noise; several on one device point at that device: run its "
        "diagnostics (DCGM on NVIDIA GPUs) and watch stats()['transient_faults_by_device']."
    )
    evidence = {"transient_faults": float(count)}
    evidence |= {f"transient_faults/{d}": float(n) for d, n in by_device.items()}
    return Recommendation("transient_fault", message, evidence)


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
    # a step rolled back after a run of failures was skipped too: its cause leads its reason
    skips = [
        e for e in events if e.kind in (EventKind.SKIP, EventKind.ROLLBACK) and _is_non_finite(e)
    ]
    losses = int(stats.get("nonfinite_losses", 0) or 0)  # counted by SafeLoss, if used
    # With the lazy weight check, weights an update left non-finite make the next loss
    # NaN, and that step is rolled back, not skipped: the weights, not the data. (Checked
    # right after the update, the weights were found before the next loss.)
    found_late = sum(
        1
        for e in events
        if e.kind == EventKind.ROLLBACK
        and _cause(e) == "weights"
        and e.cause is not Cause.UPDATE_WROTE_NONFINITE
    )
    from_weights = min(losses, found_late)
    if not skips and losses == from_weights:
        return None
    evidence = {
        "non_finite_skips": float(len(skips)),
        "nonfinite_losses": float(losses),
        "losses_from_weights": float(from_weights),
        "skipped_steps": float(stats.get("skipped_steps", 0)),
        "steps": float(stats.get("steps", 0)),
    }
    overflow = (
        "and the loss for log(0) or division by zero; under fp16, overflow is the usual cause: "
        "train in bf16, or use loss scaling (torch.amp.GradScaler)."
    )
    if not skips:
        return Recommendation(
            "non_finite",
            f"SafeLoss saw {losses - from_weights} non-finite loss(es) that no training step "
            "was skipped for: losses computed without gradients (under torch.no_grad(), an "
            "evaluation) are counted but not given to the optimizer, so the NaN/Inf is in "
            f"that data or code. Check its inputs and labels for NaN/Inf {overflow}",
            evidence,
        )
    loss_text = f"; SafeLoss saw {losses} non-finite loss(es)" if losses else ""
    restored = [e for e in skips if e.kind == EventKind.ROLLBACK]
    if restored:
        after = (
            f"Each was skipped; {_failed_run_text(restored)} also restored the last snapshot "
            "and cut the LR (see rollback)."
        )
    else:
        after = "Each was skipped, and the weights and the LR were left as they were."
    return Recommendation(
        "non_finite",
        f"{len(skips)} step(s) were skipped for NaN/Inf values in the loss or the gradients "
        f"(steps {_steps(skips)}{loss_text}). {after} Check the data of those steps for "
        f"NaN/Inf inputs or labels {overflow}",
        evidence,
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
    recent = [e for e in events if e.kind == EventKind.ROLLBACK]
    weights = [e for e in recent if _cause(e) == "weights"]
    failures = [e for e in recent if _cause(e) == "failures"]
    hot = [e for e in recent if _cause(e) == "hot"]
    full = [e for e in recent if e.labels.get("scope", "all") == "all"]
    entry_wise = [e for e in recent if e.labels.get("scope") == "entries"]
    whole = [e for e in recent if e.labels.get("scope") == "corrupted"]
    lost = _steps_undone(full)
    entries = sum(int(e.data.get("entries", 0)) for e in entry_wise)
    evidence = {
        "rollbacks": float(rollbacks),
        "weight_rollbacks": float(len(weights)),
        "failure_rollbacks": float(len(failures)),
        "hot_lr_rollbacks": float(len(hot)),
        "full_restores": float(len(full)),
        "entry_restores": float(len(entry_wise)),
        "entries_restored": float(entries),
        "parameter_restores": float(len(whole)),
    }
    told = []
    if full:
        undone = ""
        if lost:
            evidence["steps_lost"] = float(sum(lost))
            undone = f"; {sum(lost):.0f} steps of training undone"
        told.append(
            f"the weights and optimizer state went back to the last snapshot {len(full)} "
            f"time(s) (steps {_steps(full)}{undone})"
        )
    if entry_wise:
        params = sum(int(e.data.get("params", 0)) for e in entry_wise)
        told.append(
            f"the NaN/Inf entries of the weights and state ({entries} entries of {params} "
            f"parameter(s) in all) were put back from the snapshot {len(entry_wise)} time(s) "
            f"(steps {_steps(entry_wise)}); every finite value was kept, so nothing of the "
            "training was undone"
        )
    if whole:
        undone_whole = sum(int(e.data.get("undone", 0)) for e in whole)
        told.append(
            f"the corrupted parameters went back to the snapshot whole {len(whole)} time(s) "
            f"(steps {_steps(whole)}; their last {undone_whole} update(s) undone in all)"
        )
    message = f"Restores: {'; '.join(told) if told else f'{rollbacks} (not in the recent events)'}."
    message += " By cause:"
    causes = []
    if weights:
        causes.append(
            f"{len(weights)} after an update left non-finite weights although its gradients "
            f"were finite (steps {_steps(weights)})"
        )
    if failures:
        last = failures[-1]
        last_cause = skip_text(_failed_for(last), last.data, last.labels)
        causes.append(
            f"{len(failures)} after {_failed_run_text(failures)} (steps {_steps(failures)}; "
            f"the last failed for: {last_cause}), so many that the state, not the inputs, "
            "was taken to be failing, and the LR was cut too"
        )
    if hot:
        causes.append(
            f"{len(hot)} when the LR was found too hot, back to the weights from before the "
            f"loss climbed (steps {_steps(hot)}; see hot_lr)"
        )
    message += (
        " "
        + ("; ".join(causes) if causes else "the causes are no longer in the recent events")
        + "."
    )
    if weights:
        message += (
            " For an update that writes non-finite weights, suspect its numerics: an eps too "
            "small for the dtype (fp16 Adam), a learning rate too high for the weights' scale, "
            "a custom kernel; if it recurs at random, the hardware."
        )
    if failures:
        message += (
            " If the failed steps were bad batches (a corrupt shard), the state was fine and "
            "the restore cost training: look at their batches (the skip events before each "
            "rollback)."
        )
    message += " Snapshotting more often (Rollback(every_steps=...)) loses less on each."
    return Recommendation("rollback", message, evidence)


def _spikes(
    stats: Mapping[str, Any],
    events: Sequence[Event],
    levels: Sequence[tuple[Event, list[Event]]],
    min_spike_skips: int,
    level_ratio: float,
) -> Recommendation | None:
    spikes = int(stats.get("spike_skips", 0))
    in_levels = {id(e) for _, level in levels for e in level}
    others = spikes - len(in_levels)
    if others < min_spike_skips:
        return None
    recent = [e for e in _spike_skips(events) if id(e) not in in_levels]
    failed = {e.step for e in events if e.kind in (EventKind.SKIP, EventKind.ROLLBACK)}
    isolated = [e for e in recent if e.step - 1 not in failed and e.step + 1 not in failed]
    # a spike the run has since reached (the last value of its signal within level_ratio
    # of it) was an early sight of the run's level, not a bad batch
    reached = [e for e in recent if _reached(e, stats, level_ratio)]
    alone = [e for e in isolated if e not in reached]  # the evidence of bad batches
    steps = int(stats.get("steps", 0))
    evidence = {
        "spike_skips": float(spikes),
        "level_spikes": float(len(in_levels)),
        "other_spikes": float(others),
        "isolated_spikes": float(len(isolated)),
        "reached_spikes": float(len(reached)),
        "bad_batch_spikes": float(len(alone)),
        "steps": float(steps),
    }
    rate = f"; 1 in {steps / others:.0f} steps" if steps >= others else ""
    message = (
        f"{others} step(s) were skipped as spikes that did not become a new level (steps "
        f"{_steps(recent)}{rate})."
    )
    if alone:
        message += (
            f" {len(alone)} of them came alone between healthy steps at a value the run has "
            f"not reached since (steps {_steps(alone)}): that is what a bad batch looks like "
            "(mislabelled or corrupt samples, a shard of another distribution, a data-loader "
            "bug): look at those batches; the guard kept them out of the weights."
        )
    if reached:
        message += (
            f" {len(reached)} were at a level the run has since reached (steps "
            f"{_steps(reached)}): not bad batches but the run moving up early; if skipping "
            "them costs progress, raise SpikeGuard(z_threshold=...)."
        )
    if len(recent) > len(isolated):
        message += (
            f" {len(recent) - len(isolated)} came next to other failing steps: if the loss "
            "jumps on ordinary batches, the training itself is unstable: lower the learning "
            "rate or warm up for longer."
        )
    if levels:
        level = levels[-1][1]
        message += (
            f" ({len(in_levels)} more were the first steps at a new level: the guard took "
            f"the new level after {len(level)} spikes at steps {_steps(level)}; see new_level.)"
        )
    return Recommendation("spikes", message, evidence)


def _reached(event: Event, stats: Mapping[str, Any], level_ratio: float) -> bool:
    """Whether the run's last value of the spike's signal is within ``level_ratio`` of it."""
    signal = "loss" if _failed_for(event) is SkipReason.LOSS_SPIKE else "grad_norm"
    value, last = event.data.get(signal), stats.get(signal)
    if value is None or last is None or not (math.isfinite(value) and value > 0):
        return False
    return math.isfinite(float(last)) and float(last) * level_ratio >= value


def _new_level(
    stats: Mapping[str, Any], levels: Sequence[tuple[Event, list[Event]]], level_ratio: float
) -> Recommendation | None:
    if not levels:
        return None
    count = max(int(stats.get("new_levels", 0) or 0), len(levels))
    event, spikes = levels[-1]
    norm = float(event.data.get("grad_norm", math.nan))
    first = spikes[0].step if spikes else event.step
    signals = {_SIGNALS.get(reason, "gradient norm") for e in spikes if (reason := _failed_for(e))}
    what = " and ".join(sorted(signals, reverse=True)) if spikes else "gradient norm"
    evidence = {
        "new_levels": float(count),
        "level_grad_norm": norm,
        "level_step": float(event.step),
    }
    if count == 1:
        message = f"The {what} moved to a new level at step {event.step}"
    else:
        where = _steps([e for e, _ in levels])
        message = (
            f"The {what} moved to a new level {count} times (steps {where}); the last at "
            f"step {event.step}"
        )
    message += (
        f" ({'' if what == 'gradient norm' else 'gradient norm '}about {norm:.3g}): the guard "
        f"took the new level after "
        f"{len(spikes)} spikes at steps {_steps(spikes)} (skipped), and trained on from "
        f"step {event.step + 1}."
    )
    last_norm = stats.get("grad_norm")
    last = float(last_norm) if last_norm is not None else math.nan
    ratio = last / norm if norm > 0 else math.nan
    if math.isfinite(ratio):
        evidence |= {"grad_norm": last, "ratio_to_level": ratio}
    lasted = not (math.isfinite(ratio) and ratio < 1.0 / level_ratio)
    evidence["lasted"] = float(lasted)
    if not lasted:
        # the evidence that points at the data: the level did not last
        message += (
            f" The gradient norm has since fallen back far below it (last {last:.3g}, "
            f"{ratio:.2g}x the level): it was a burst of bad batches, not a lasting change, "
            f"and any steps of it after step {event.step} were trained on: look at the "
            f"batches from step {first} on."
        )
        return Recommendation("new_level", message, evidence)
    if math.isfinite(ratio):
        message += f" It is still there (last gradient norm {last:.3g}): the run's new normal."
    message += (
        " A level that lasts is a change of the training, not of a few batches: a loss "
        "weight, a curriculum stage, an unfrozen block, the LR schedule, or the norm growing as "
        "the model trains. If it was not intended, look at what changed in the training "
        f"set-up at step {first}."
    )
    return Recommendation("new_level", message, evidence)


def _plateau(
    stats: Mapping[str, Any], events: Sequence[Event], lrs: Sequence[float] | None
) -> Recommendation | None:
    reductions = [e for e in events if e.kind == EventKind.PLATEAU]
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
        f"The loss stopped improving and PlateauLR reduced the LR {len(reductions)} time(s) "
        f"(steps {_steps(reductions)}; {lr_text}). A schedule that decays earlier (cosine, "
        "linear decay) would do this on purpose, with PlateauLR off (plateau=None, the "
        "default); if the loss still falls when reductions fire, raise "
        "PlateauLR(patience_steps=...); if it is flat at a high value, the model or the data "
        "is the limit, not the LR.",
        evidence,
    )


# -- helpers ----------------------------------------------------------------------------

#: What an LR cut or a rollback answered: an update that wrote non-finite weights, a run
#: of failed steps, an absolute threshold of EmergencyLR, or a loss that climbed (HotLR).
_CAUSES = ("weights", "failures", "threshold", "hot")

_THRESHOLD_NAMES = {
    Cause.GRAD_NORM_THRESHOLD: "grad_norm_threshold",
    Cause.LOSS_THRESHOLD: "loss_threshold",
}
_SPIKES = (SkipReason.LOSS_SPIKE, SkipReason.GRAD_NORM_SPIKE, SkipReason.NORM_STATS_SPIKE)
_SIGNALS = {
    SkipReason.LOSS_SPIKE: "loss",
    SkipReason.GRAD_NORM_SPIKE: "gradient norm",
    SkipReason.NORM_STATS_SPIKE: "running statistics",
}


def _cause(event: Event) -> str:
    """The cause of an ``lr_cut`` or ``rollback`` event, from its typed cause."""
    if event.cause is Cause.HOT_LR:
        return "hot"
    if event.cause in _THRESHOLD_NAMES:
        return "threshold"
    if event.cause is Cause.FAILED_STEPS:
        return "failures"
    if event.cause in (Cause.BUDGET_SPENT, Cause.RESTORES_FAILED):
        return "weights" if event.data.get("weights_failed") else "failures"
    if event.cause is Cause.POLICY:
        return "policy"
    return "weights"


def _failed_for(event: Event) -> SkipReason | None:
    """The skip reason of a skip event, or of the failing step a rollback followed."""
    if isinstance(event.cause, SkipReason):
        return event.cause
    value = event.labels.get("failed_for")
    try:
        return SkipReason(value) if value else None
    except ValueError:
        return None


def _failed_run_text(events: Sequence[Event]) -> str:
    """``"5 failed steps in a row"`` (the length the events carry), for escalation events."""
    lengths = {int(e.data["failures"]) for e in events if "failures" in e.data}
    if len(lengths) == 1:
        return f"{lengths.pop()} failed steps in a row"
    return "a run of failed steps"


def _spike_skips(events: Sequence[Event]) -> list[Event]:
    """The recent steps skipped as spikes (a rollback after failures names its cause)."""
    return [
        e
        for e in events
        if e.kind in (EventKind.SKIP, EventKind.ROLLBACK) and _failed_for(e) in _SPIKES
    ]


def _new_levels(events: Sequence[Event]) -> list[tuple[Event, list[Event]]]:
    """Each recent ``new_level`` event with the spike skips it took its level from.

    The spikes are the last ones at or before the event, as many as it counts
    (``data["spikes"]``), never one of an earlier level.
    """
    levels: list[tuple[Event, list[Event]]] = []
    spikes: list[Event] = []
    for event in events:
        if event.kind not in (EventKind.SKIP, EventKind.ROLLBACK, EventKind.NEW_LEVEL):
            continue
        if event.kind != EventKind.NEW_LEVEL:
            if _failed_for(event) in _SPIKES:
                spikes.append(event)
            continue
        n = int(event.data.get("spikes", 0))
        level = [s for s in spikes if s.step <= event.step][-n:] if n else []
        levels.append((event, level))
        spikes = []
    return levels


def _steps_undone(rollbacks: Sequence[Event]) -> list[float]:
    """The training steps each rollback undid: from its snapshot (or from the rollback
    before it, when that one already undid the steps in between) to its own step."""
    lost: list[float] = []
    previous = -math.inf
    for event in rollbacks:
        if "snapshot_step" in event.data:
            lost.append(event.step - max(event.data["snapshot_step"], previous))
        previous = event.step
    return lost


def _is_non_finite(event: Event) -> bool:
    """A step skipped for NaN/Inf in its loss or gradients (a rollback: one that followed a
    run of such steps; a rollback for non-finite weights is the weights, not the inputs)."""
    if _failed_for(event) in (
        SkipReason.NONFINITE_GRADS,
        SkipReason.NONFINITE_LOSS,
        SkipReason.ENGINE_OVERFLOW,
    ):
        return True
    grad_norm = event.data.get("grad_norm")
    return event.kind == EventKind.SKIP and grad_norm is not None and not math.isfinite(grad_norm)


def _steps(events: Sequence[Event]) -> str:
    steps = [str(e.step) for e in events]
    if len(steps) > _EXAMPLES:
        return ", ".join(steps[:_EXAMPLES]) + f", ... ({len(steps)} in all)"
    return ", ".join(steps) if steps else "not in the recent events"
