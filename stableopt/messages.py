"""The one place sentences are made: events, step outcomes, transitions and errors, in words.

Everything that decides works on typed data (:mod:`stableopt.outcomes`: an
:class:`~stableopt.outcomes.EventKind`, a cause, numbers, names); this module turns that
data into the sentence a person reads in the log, a sink, the report or
``opt.last_step.reason``, and is never read back. Each function takes the event's cause,
its ``data`` (numbers by name) and ``labels`` (names by name); a number that is absent is
left out of the sentence rather than guessed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from stableopt.outcomes import AnyCause, Cause, EventKind, SkipReason

__all__ = [
    "weights_text",
    "cause_text",
    "divergence_text",
    "event_text",
    "prefixed",
    "restore_text",
    "skip_text",
    "transition_text",
]

Data = Mapping[str, float]
Labels = Mapping[str, str]


def skip_text(cause: SkipReason | None, data: Data, labels: Labels = {}) -> str:  # noqa: B006
    """Why a step was skipped: ``gradient-norm spike (2.906e+04, robust z = 37.6 > 12)``."""
    grad_norm = data.get("grad_norm", math.nan)
    loss = data.get("loss")
    if cause is SkipReason.NONFINITE_GRADS and loss is not None and not math.isfinite(loss):
        return (
            f"the loss is NaN/Inf ({loss}), and so are the gradients computed from it "
            f"(gradient norm {grad_norm})"
        )
    if cause is SkipReason.NONFINITE_GRADS:
        return f"gradient norm is {grad_norm} (NaN/Inf in the gradients)"
    if cause is SkipReason.NONFINITE_LOSS:
        return f"the loss is NaN/Inf ({loss}) with finite gradients"
    if cause is SkipReason.AMP_OVERFLOW:
        return "GradScaler found Inf/NaN gradients at its scale (its own skip)"
    if cause is SkipReason.ENGINE_OVERFLOW:
        return "DeepSpeed found Inf/NaN in the gradients (its overflow check) and skipped the step"
    if cause is SkipReason.ABOVE_SKIP_LIMIT:
        return f"gradient norm {grad_norm:.4g} is above skip_above={data.get('skip_above')}"
    if cause is SkipReason.LOSS_SPIKE:
        return f"loss spike ({float(loss or 0.0):.4g}, {_spike_evidence(data)})"
    if cause is SkipReason.GRAD_NORM_SPIKE:
        return f"gradient-norm spike ({grad_norm:.4g}, {_spike_evidence(data)})"
    if cause is SkipReason.NORM_STATS_SPIKE:
        return (
            f"running-statistics spike (the running variance of `{labels.get('module', '?')}` "
            f"grew {data.get('growth', math.nan):.3g}x in the forward pass: a batch far outside "
            f"the data, its variance about {data.get('ratio', math.nan):g}x the running one or "
            f"more; gradient norm {grad_norm:.4g})"
        )
    if cause is SkipReason.RULE:
        return f"skip rule {labels.get('rule', '?')!r} (gradient norm {grad_norm:.4g})"
    return f"step rejected (gradient norm {grad_norm:.4g})"


def _spike_evidence(data: Data) -> str:
    """The spike guard's evidence: a robust z-score, or the early rule's ratio."""
    if "z" in data:
        return f"robust z = {data['z']:.3g} > {data.get('z_threshold', math.nan):g}"
    return (
        f"{data.get('ratio', math.nan):.3g}x the median of the first "
        f"{int(data.get('history', 0))} values, > early_ratio={data.get('early_ratio', math.nan):g}"
    )


def prefixed(data: Data, prefix: str) -> dict[str, float]:
    """The entries of ``data`` whose names start with ``prefix``, without it."""
    return {k[len(prefix) :]: v for k, v in data.items() if k.startswith(prefix)}


def cause_text(cause: AnyCause | None, data: Data, labels: Labels = {}) -> str:  # noqa: B006
    """A rollback's, an LR cut's or a stop's cause, in words."""
    grad_norm = data.get("grad_norm", math.nan)
    norm = f" (gradient norm {grad_norm:.4g})" if "grad_norm" in data else ""
    if cause is Cause.UPDATE_WROTE_NONFINITE:
        return f"the update left non-finite weights{norm}"
    if cause is Cause.NONFINITE_BETWEEN_STEPS:
        return f"non-finite weights appeared between steps (no update wrote them){norm}"
    if cause is Cause.NONFINITE_FOUND_LATE:
        return f"non-finite weights found (left by an earlier update){norm}"
    if cause is Cause.NONFINITE_AT_SNAPSHOT:
        return "non-finite weights found when taking a snapshot"
    if cause is Cause.FAILED_STEPS:
        failed = _skip_reason(labels.get("failed_for"))
        first = skip_text(failed, data, labels) + "; " if failed is not None else ""
        if data.get("weights_failed"):
            first = "the weights are not finite; "
        return f"{first}{_failed_run(data)}"
    if cause is Cause.HOT_LR:
        return "the LR is too hot (the loss climbed: see the LR cut)"
    if cause is Cause.GRAD_NORM_THRESHOLD:
        return (
            f"gradient norm {grad_norm:.4g} above "
            f"grad_norm_threshold={data.get('threshold', math.nan):g}"
        )
    if cause is Cause.LOSS_THRESHOLD:
        return f"loss above loss_threshold={data.get('threshold', math.nan):g}"
    if cause in (Cause.BUDGET_SPENT, Cause.RESTORES_FAILED):
        return transition_text(cause, data, labels)
    return str(cause.value) if cause is not None else "an intervention"


def _failed_run(data: Data) -> str:
    return (
        f"{int(data.get('failures', 0))} steps in a row failed: the state, not the inputs, "
        "is failing"
    )


def _skip_reason(value: str | None) -> SkipReason | None:
    try:
        return SkipReason(value) if value else None
    except ValueError:
        return None


def transition_text(cause: AnyCause | None, data: Data, labels: Labels = {}) -> str:  # noqa: B006
    """Why the escalation moved: a rollback's or a stop's reason."""
    if cause is Cause.BUDGET_SPENT:
        return (
            f"{int(data.get('failures', 0))} consecutive steps were skipped or rolled back "
            f"(max_consecutive_failures={int(data.get('max_failures', 0))})"
        )
    if cause is Cause.RESTORES_FAILED:
        inner = "the weights are not finite" if data.get("weights_failed") else _failed_run(data)
        return (
            f"{inner}, and the restored state failed again right away "
            f"{int(data.get('restores', 0))} times in a row "
            f"(max_restore_failures={int(data.get('max_restores', 0))})"
        )
    if cause is Cause.FAILED_STEPS:
        return "the weights are not finite" if data.get("weights_failed") else _failed_run(data)
    if cause is Cause.SPIKES_AT_ONE_LEVEL:
        return (
            f"{int(data.get('spikes', 0))} spikes in a row at one level: taken as the run's new "
            "level (histories restart from it)"
        )
    return ""


def restore_text(data: Data, labels: Labels = {}) -> str:  # noqa: B006
    """What a rollback put back, from where."""
    snapshot = f"the snapshot of step {int(data.get('snapshot_step', 0))}"
    params = int(data.get("params", 0))
    scope = labels.get("scope", "all")
    if scope == "entries":
        entries = f"{int(data['entries'])} " if "entries" in data else ""
        return (
            f"the {entries}non-finite entries of {params} parameter(s) and of their state "
            f"restored from {snapshot}; every finite value kept"
        )
    if scope == "corrupted":
        return (
            f"{params} parameter(s) and their state restored to {snapshot}; every other "
            "parameter kept"
        )
    kept = "weights, buffers" if data.get("buffers") else "weights"
    return f"{kept} and optimizer state restored to {snapshot}"


def lr_change_text(kind: str, cause: AnyCause | None, data: Data, labels: Labels) -> str:
    """An LR factor's change and its cause."""
    old, new = data.get("old_factor", math.nan), data.get("new_factor", math.nan)
    if cause is Cause.HOT_LR and kind == EventKind.LR_CUT:
        text = (
            f"the loss level {data.get('level', math.nan):.4g} has stayed "
            f"{data.get('climb', math.nan):.3g}x above the level the run started from "
            f"({data.get('reference', math.nan):.4g}; margin {data.get('margin', math.nan):.3g}x) "
            f"for {int(data.get('patience', 0))} steps: the LR is too hot; LR factor cut "
            f"{old:.4g} -> {new:.4g}"
        )
        if "ceiling" in data:
            text += f" (it recovers to at most {data['ceiling']:.4g})"
        return text
    if cause is Cause.CALM_STEPS:
        return (
            f"{int(data.get('calm_steps', 0))} steps with the loss below the hot level: LR "
            f"factor {old:.4g} -> {new:.4g} (at most {data.get('ceiling', math.nan):.4g}, half "
            "the factor that failed)"
        )
    if cause is Cause.HEALTHY_STEPS:
        done = " (recovered)" if new == 1.0 else ""
        return (
            f"{int(data.get('healthy_steps', 0))} healthy steps: LR factor {old:.4g} -> "
            f"{new:.4g}{done}"
        )
    if cause is Cause.LOSS_PLATEAU:
        return (
            f"loss over the last {int(data.get('window', 0))} steps fell "
            f"{100 * data.get('decrease', math.nan):.2f}% (p={data.get('p', math.nan):.3g}); "
            f"progress needs {100 * data.get('threshold', math.nan):.2f}% at "
            f"p<{data.get('significance', math.nan):g}: LR factor {old:.4g} -> {new:.4g}"
        )
    if cause is Cause.POLICY:
        return f"LR policy {labels.get('policy', '?')!r}: LR factor {old:.4g} -> {new:.4g}"
    trigger = cause_text(cause, data, labels)
    if "triggers" in data:
        trigger += (
            f" ({int(data['triggers'])} triggers within {int(data.get('trigger_window', 0))} steps)"
        )
    return f"{trigger}: LR factor cut {old:.4g} -> {new:.4g}"


def event_text(kind: str, cause: AnyCause | None, data: Data, labels: Labels) -> str:
    """The sentence of an event of ``kind`` with ``cause``, ``data`` and ``labels``."""
    if kind == EventKind.SKIP:
        reproduced = (
            " (reproducible: the re-run on the same batch and RNG state failed again: the "
            "data or the state, not the device)"
            if data.get("reproduced")
            else ""
        )
        kept = "weights, buffers" if data.get("buffers") else "weights"
        return (
            f"{skip_text(_as_skip(cause), data, labels)}{reproduced}: step skipped, {kept} and "
            "optimizer state unchanged"
        )
    if kind == EventKind.ROLLBACK:
        why = cause_text(cause, data, labels)
        if labels.get("stopping"):
            why = f"stopping: {why}"
        return f"{why}: {restore_text(data, labels)}"
    if kind in (EventKind.LR_CUT, EventKind.LR_RECOVERY, EventKind.PLATEAU):
        return lr_change_text(kind, cause, data, labels)
    if kind == EventKind.DIVERGENCE:
        why = cause_text(cause, data, labels)
        if cause is not Cause.BUDGET_SPENT and cause is not Cause.RESTORES_FAILED:
            why = f"{why}, and rollback is off: nothing good to restore"
        return why
    if kind == EventKind.NEW_LEVEL:
        return (
            f"{transition_text(Cause.SPIKES_AT_ONE_LEVEL, data)}: gradient norm now about "
            f"{data.get('grad_norm', math.nan):.4g}"
        )
    if kind == EventKind.EMERGENCY_CLIP:
        return (
            f"gradient norm {data.get('grad_norm', math.nan):.4g} is above the emergency "
            f"threshold: clipped to {data.get('clip_threshold', math.nan):.4g}"
        )
    if kind == EventKind.TRANSIENT_FAULT:
        first = skip_text(
            _as_skip(_skip_reason(labels.get("first_cause"))), prefixed(data, "first_"), labels
        )
        return (
            f"transient fault (possible silent data corruption) on {labels.get('devices', '?')}: "
            f"the first evaluation of the step gave {first}; the re-run on the same batch and RNG "
            f"state is healthy (gradient norm {data.get('grad_norm', math.nan):.4g}): the step "
            "goes on with the re-run's gradients"
        )
    if kind == EventKind.DATA_FAULT:
        when = (
            f"; it failed first at step {int(data['first_step'])}" if "first_step" in data else ""
        )
        return (
            f"batch [{labels.get('batch', '')}] failed again "
            f"({skip_text(_as_skip(cause), data, labels)}{when}): a data fault, not the state: "
            "skipped without counting as a failure of the run (no rollback, no LR cut); leave "
            "its samples out (opt.ledger.bad_ids())"
        )
    if kind == EventKind.BUFFERS_RESTORED:
        return _buffers_text(cause, data, labels)
    if kind == EventKind.NONFINITE_LOSS:
        return (
            f"the loss is NaN/Inf ({int(data.get('nonfinite_losses', 0))} non-finite losses so "
            f"far, {int(data.get('since', 0))} since the last check; reported at the 1st, 2nd, "
            "4th, ...)"
        )
    if kind == EventKind.SIZE_MISMATCH:
        return (
            f"prediction {labels.get('pred_shape', '?')} and target "
            f"{labels.get('target_shape', '?')} differ in dim {int(data.get('dim', 0))}: both "
            f"trimmed to {int(data.get('length', 0))} "
            f"({int(data.get('size_mismatches', 0))} mismatches so far; reported at the 1st, "
            "2nd, 4th, 8th, ...)"
        )
    if kind == EventKind.CLIP and cause is SkipReason.GRAD_NORM_SPIKE:
        return (
            f"gradient-norm spike ({data.get('grad_norm', math.nan):.4g}, {_spike_evidence(data)}) "
            "with an ordinary loss: clipped to "
            f"{data.get('clip_threshold', math.nan):.4g} (scaled by "
            f"{data.get('clip_coefficient', math.nan):.3g}) instead of skipped"
        )
    if kind == EventKind.CLIP:
        if "clip_coefficient" in data:
            return (
                f"gradient norm {data.get('grad_norm', math.nan):.4g} above the clip threshold "
                f"{data.get('clip_threshold', math.nan):.4g}: scaled by "
                f"{data['clip_coefficient']:.3g}"
            )
        return (
            f"gradient norm {data.get('grad_norm', math.nan):.4g}: units over their limit rescaled"
        )
    return str(kind)


def _as_skip(cause: AnyCause | None) -> SkipReason | None:
    return cause if isinstance(cause, SkipReason) else None


def _buffers_text(cause: AnyCause | None, data: Data, labels: Labels) -> str:
    more = int(data.get("modules", 1)) - 1
    what = f"the {labels.get('kind', 'buffers')} of `{labels.get('module', '?')}`"
    if more > 0:
        what += f" and {more} more module(s)"
    if cause is Cause.SKIPPED_BATCH:
        return (
            f"{what} became NaN/Inf in the forward pass of the skipped batch: restored to "
            "their values before it (the model equals one that never saw the batch)"
        )
    return (
        f"{what} became NaN/Inf in the forward pass of this step although its loss and "
        "gradients were finite (NaN/Inf in inputs the loss does not count, such as padding): "
        "restored to their values before it; the update was kept"
    )


def weights_text(
    weights_are_good: bool, snapshot_step: int | None = None, undone: int = 0, last_good: int = 0
) -> str:
    """What the weights are when a run stops: those after the last good step, those of a
    snapshot (``snapshot_step``: how many good updates were undone), or NaN/Inf ones."""
    if not weights_are_good:
        return "The weights hold NaN/Inf values: there was no snapshot to restore them from."
    if snapshot_step is not None:
        return (
            f"The weights are those of the snapshot of step {snapshot_step}: {undone} good "
            f"update(s) after it were undone (the last good step was step {last_good})."
        )
    return f"The weights are those after the last good step (step {last_good})."


def divergence_text(
    why: str, weights: str, counters: Mapping[str, object], events: Sequence[Any]
) -> str:
    """The message of a :class:`~stableopt.DivergenceError`: why, what the ``weights`` are
    (:func:`weights_text`), the ``counters`` and the last ``events``."""
    counted = ", ".join(f"{k}={v}" for k, v in counters.items())
    recent = "; ".join(f"step {e.step} {e.kind}: {e.reason}" for e in events[-5:])
    return f"stableopt: {why}. {weights} Counters: {counted}. Last events: {recent}"
