"""Why a step failed, as data: the :class:`~stableopt.accounting.Evidence` of a verdict.

The gate says *that* a step failed and which bound it crossed (its
:class:`~stableopt.outcomes.SkipReason`); the stages that set the bounds say *why* in
numbers: the spike guard a robust z-score, the emergency clip its ``skip_above``, the
model's buffers which layer's statistics grew and by how much, a skip rule its name. The
events, the step's outcome and the ledger carry these numbers; the sentence is rendered
from them by :mod:`stableopt.messages`.
"""

from __future__ import annotations

from stableopt.accounting import Evidence
from stableopt.buffers import NORM_STATS_RATIO, ModelBuffers
from stableopt.outcomes import SkipReason
from stableopt.roles import EmergencyClipRole, SpikeRole
from stableopt.verdict import StepVerdict

__all__ = ["skip_evidence"]


def skip_evidence(
    verdict: StepVerdict,
    *,
    spike: SpikeRole | None,
    emergency_clip: EmergencyClipRole | None,
    buffers: ModelBuffers | None,
) -> Evidence:
    """The evidence of ``verdict``'s failure (read before the stages observe the step)."""
    data: dict[str, float] = {"grad_norm": verdict.grad_norm}
    labels: dict[str, str] = {}
    if verdict.loss is not None:
        data["loss"] = verdict.loss
    reason = verdict.skip_reason
    if reason is SkipReason.ABOVE_SKIP_LIMIT and emergency_clip is not None:
        if emergency_clip.skip_above is not None:
            data["skip_above"] = emergency_clip.skip_above
    elif reason is SkipReason.LOSS_SPIKE and spike is not None and verdict.loss is not None:
        data |= spike.evidence("loss", verdict.loss)
    elif reason is SkipReason.GRAD_NORM_SPIKE and spike is not None:
        data |= spike.evidence("grad_norm", verdict.grad_norm)
    elif reason is SkipReason.NORM_STATS_SPIKE and buffers is not None:
        module, growth = buffers.norm_stats_detail()
        data |= {"growth": growth, "ratio": NORM_STATS_RATIO}
        labels["module"] = module
    elif reason is SkipReason.RULE and verdict.rule is not None:
        labels["rule"] = verdict.rule
    return Evidence(reason, data, labels)
