"""The stages of one optimizer, by slot: what the pipeline reads, observes and checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field

from stableopt.roles import (
    EmergencyClipRole,
    EmergencyLRRole,
    EscalationRole,
    HotLRRole,
    LedgerRole,
    LRPolicy,
    PlateauRole,
    RerunRole,
    RollbackRole,
    SkipRule,
    SpikeRole,
)
from stableopt.stages.base import ClipPolicy, Stage

__all__ = ["Slots"]


@dataclass
class Slots:
    """Every stage of a :class:`~stableopt.SafeOptimizer` (``None``: off), and the lists of
    skip rules and LR policies of your own."""

    escalation: EscalationRole
    clip: ClipPolicy | None = None
    emergency_clip: EmergencyClipRole | None = None
    spike: SpikeRole | None = None
    emergency_lr: EmergencyLRRole | None = None
    hot_lr: HotLRRole | None = None
    plateau: PlateauRole | None = None
    rollback: RollbackRole | None = None
    rerun: RerunRole | None = None
    ledger: LedgerRole | None = None
    skip_rules: list[SkipRule] = field(default_factory=list)
    lr_policies: list[LRPolicy] = field(default_factory=list)

    def named(self) -> dict[str, Stage | None]:
        """Every stage by the name its state is saved under (the list slots as
        ``skip_rules/<name>`` and ``lr_policies/<name>``)."""
        stages: dict[str, Stage | None] = {
            "clip": self.clip,
            "emergency_clip": self.emergency_clip,
            "spike": self.spike,
            "emergency_lr": self.emergency_lr,
            "hot_lr": self.hot_lr,
            "plateau": self.plateau,
            "rollback": self.rollback,
            "escalation": self.escalation,
            "rerun": self.rerun,
            "ledger": self.ledger,
        }
        stages |= {f"skip_rules/{rule.name}": rule for rule in self.skip_rules}
        stages |= {f"lr_policies/{policy.name}": policy for policy in self.lr_policies}
        return stages

    def judging(self) -> dict[str, Stage]:
        """The stages whose histories judge a step (they go back with a full restore)."""
        judging: dict[str, Stage | None] = {
            "clip": self.clip,
            "emergency_clip": self.emergency_clip,
            "spike": self.spike,
        }
        judging |= {f"skip_rules/{rule.name}": rule for rule in self.skip_rules}
        return {name: stage for name, stage in judging.items() if stage is not None}

    def observers(self) -> list[Stage]:
        """What each finished step's numbers go to first (the LR policies of your own get
        them through the LR control, which reports their changes)."""
        stages = [self.clip, self.emergency_clip, self.spike, self.plateau, *self.skip_rules]
        return [stage for stage in stages if stage is not None]
